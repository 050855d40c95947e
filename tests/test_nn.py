import math

import pytest
import torch
import torch.nn as nn

import flix_kernels as fk
from conftest import assert_close, random_feature_ids
from flix_kernels.reference import flix_linear_reference


def space():
    return fk.FeatureSpace({"language": ["en", "fr", "sw", "yo"], "task": ["qa", "mt"]}, {"language": 8, "task": 2})


def test_from_linear_keeps_the_module_and_equals_base_at_init(seed):
    torch.manual_seed(seed)
    lin = nn.Linear(13, 7)
    layer = fk.FLixLinear.from_linear(lin, space(), alpha=16)
    assert layer.base_layer is lin and layer.base_layer.weight is lin.weight  # no copy
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    assert layer.lora_A.shape == (36, 13) and layer.lora_B.shape == (7, 36)
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel() and torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(4, 5, 13)
    r = fk.Routing(random_feature_ids(layer.space, 4, torch.Generator().manual_seed(seed)), layer.space)
    assert torch.equal(layer(x, r), lin(x))


def test_forward_matches_oracle_with_per_feature_scales(seed):
    gen = torch.Generator().manual_seed(seed)
    s = space()
    for use_rslora in (False, True):
        layer = fk.FLixLinear(11, 9, s, alpha=6.0, use_rslora=use_rslora, dtype=torch.float64)
        nn.init.normal_(layer.lora_B, generator=gen)
        expected = [6.0 / (math.sqrt(r) if use_rslora else r) for r in s.ranks]
        assert torch.allclose(layer.scaling.double(), torch.tensor(expected, dtype=torch.float64))
        ids = random_feature_ids(s, 3, gen)
        x = torch.randn(3, 4, 11, generator=gen, dtype=torch.float64)
        out = layer(x, fk.Routing(ids, s))
        ref = flix_linear_reference(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B,
                                    ids, s.rank_offsets, torch.tensor(expected, dtype=torch.float64))
        assert_close(out, ref)


def test_gradients_reach_only_the_adapters(seed):
    torch.manual_seed(seed)
    s = space()
    layer = fk.FLixLinear(6, 5, s)
    nn.init.normal_(layer.lora_B)
    r = fk.Routing(random_feature_ids(s, 2, torch.Generator().manual_seed(seed), p_absent=0.0), s)
    layer(torch.randn(2, 3, 6), r).pow(2).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad.abs().sum() > 0


def test_dropout_only_in_training(seed):
    torch.manual_seed(seed)
    s = space()
    layer = fk.FLixLinear(32, 8, s, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    r = fk.Routing([[0, 4], [1, -1]], s)
    x = torch.randn(2, 3, 32)
    layer.eval()
    a, b = layer(x, r), layer(x, r)
    assert torch.equal(a, b)
    layer.train()
    c = layer(x, r)
    assert not torch.allclose(a, c)


def test_no_routing_raises_with_instructions():
    layer = fk.FLixLinear(4, 4, space())
    with pytest.raises(RuntimeError, match=r"set_routing\(model, routing\)"):
        layer(torch.randn(2, 4))


def test_init_options_and_errors(seed):
    torch.manual_seed(seed)
    s = fk.FeatureSpace({"a": ["x", "y"]}, 64)
    g = fk.FLixLinear(512, 4, s, init="gaussian")
    assert abs(g.lora_A.std().item() - 1 / 64) < 1e-3
    lo = fk.FLixLinear(512, 4, s)
    bound = 1 / math.sqrt(512)  # kaiming_uniform(a=sqrt(5)) on fan_in=512
    assert lo.lora_A.abs().max() <= bound and lo.lora_A.abs().max() > 0.9 * bound
    with pytest.raises(ValueError, match="init must be one of"):
        fk.FLixLinear(4, 4, s, init="pissa")
    with pytest.raises(ValueError, match="dropout"):
        fk.FLixLinear(4, 4, s, dropout=1.5)
    with pytest.raises(TypeError, match="nn.Linear"):
        fk.FLixLinear.from_linear(nn.Conv1d(2, 2, 1), s)
    with pytest.raises(TypeError, match="FeatureSpace"):
        fk.FLixLinear(4, 4, {"a": ["x"]})


def test_adapter_dtype_and_repr():
    s = space()
    layer = fk.FLixLinear.from_linear(nn.Linear(8, 8, dtype=torch.bfloat16), s, adapter_dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    nn.init.normal_(layer.lora_B)
    out = layer(torch.randn(2, 8, dtype=torch.bfloat16), fk.Routing([[1, 5], [-1, 4]], s))
    assert out.dtype == torch.bfloat16
    assert "total_rank=36" in repr(layer)


def test_state_dict_keeps_the_plain_linear_names():
    """The base parameters keep nn.Linear's names (a plain model loads them); the adapters are extra keys."""
    layer = fk.FLixLinear(4, 3, space())
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]
    assert layer.state_dict()["weight"].data_ptr() == layer.base_layer.weight.data_ptr()
    assert list(fk.FLixLinear(4, 3, space(), bias=False).state_dict()) == ["weight", "lora_A", "lora_B"]
    # named_parameters (what optimizers and FSDP see) keep the module structure
    assert [n for n, _ in layer.named_parameters()] == ["lora_A", "lora_B", "base_layer.weight", "base_layer.bias"]


def _filled(seed: int, **kw) -> fk.FLixLinear:
    torch.manual_seed(seed)
    layer = fk.FLixLinear(6, 5, space(), **kw)
    nn.init.normal_(layer.lora_B)
    return layer


@pytest.mark.parametrize("old_names", [False, True], ids=["plain_keys", "base_layer_keys"])
def test_load_state_dict_takes_plain_and_base_layer_keys(seed, old_names):
    src, dst = _filled(seed), _filled(seed + 1)
    state = src.state_dict()
    if old_names:  # checkpoints written before the plain names (base_layer.weight, ...) still load
        state = {("base_layer." + k if k in ("weight", "bias") else k): v for k, v in state.items()}
    assert not dst.load_state_dict(state).missing_keys
    for name, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[name], value), name
    # a plain nn.Linear state dict loads into the base (the adapters are reported missing)
    lin = nn.Linear(6, 5)
    result = dst.load_state_dict(lin.state_dict(), strict=False)
    assert torch.equal(dst.base_layer.weight, lin.weight) and torch.equal(dst.base_layer.bias, lin.bias)
    assert sorted(result.missing_keys) == ["lora_A", "lora_B"] and not result.unexpected_keys


def test_load_state_dict_reports_missing_base_keys_by_their_plain_names(seed):
    layer = _filled(seed)
    result = layer.load_state_dict({"lora_A": layer.lora_A.detach(), "lora_B": layer.lora_B.detach()}, strict=False)
    assert sorted(result.missing_keys) == ["bias", "weight"]
    model = nn.Sequential(_filled(seed))
    result = model.load_state_dict({"0.weight": model[0].weight.detach()}, strict=False)
    assert sorted(result.missing_keys) == ["0.bias", "0.lora_A", "0.lora_B"]


def test_load_state_dict_with_both_names_of_one_weight_raises(seed):
    layer = _filled(seed)
    state = {**layer.state_dict(), "base_layer.weight": torch.zeros(5, 6)}
    with pytest.raises(RuntimeError, match="both 'weight' and 'base_layer.weight'"):
        layer.load_state_dict(state)


def test_state_dict_of_a_merged_layer_holds_the_unmerged_weight(seed):
    """A checkpoint means base + adapters whatever the merge state (loading it never applies a
    feature set twice); loading into a merged layer raises."""
    layer = _filled(seed)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge([1, 4])
    state = layer.state_dict()
    assert torch.equal(state["weight"], w0) and not torch.equal(layer.base_layer.weight, w0)
    with pytest.raises(RuntimeError, match="merged.*unmerge"):
        layer.load_state_dict(state)
    with pytest.raises(RuntimeError, match="merged.*unmerge"):  # adapters alone would leave the merge stale
        layer.load_state_dict({"lora_A": state["lora_A"], "lora_B": state["lora_B"]}, strict=False)
    layer.unmerge()
    layer.load_state_dict(state)
    assert torch.equal(layer.base_layer.weight, w0)


def test_state_dict_round_trips_through_deepcopy_and_pickle(seed, tmp_path):
    import copy
    layer = _filled(seed)
    for clone in (copy.deepcopy(layer), torch.load(_saved(layer, tmp_path), weights_only=False)):
        assert list(clone.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]
        clone.load_state_dict(layer.state_dict())


def _saved(module, tmp_path):
    path = tmp_path / "module.pt"
    torch.save(module, path)
    return path


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0, 0.0, -1.0])
def test_alpha_must_be_finite_and_positive(alpha):
    with pytest.raises(ValueError, match=f"alpha must be a finite number > 0, got {alpha!r}"):
        fk.FLixLinear(4, 3, space(), alpha=alpha)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        fk.FLixLinear.from_linear(nn.Linear(4, 3), space(), alpha=alpha)
    layer = fk.FLixLinear(4, 3, space(), alpha=4)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        layer.set_scaling(alpha)
    assert layer.alpha == 4.0 and layer.scaling.tolist() == pytest.approx([0.5] * 4 + [2.0] * 2)


@pytest.mark.parametrize("alpha,dtype,use_rslora", [(1e300, None, False), (1e39, torch.float32, True),
                                                    (1e6, torch.float16, False), (3e5, torch.float16, True)])
def test_alpha_whose_scale_overflows_the_adapter_dtype_is_refused(alpha, dtype, use_rslora):
    """alpha / r_k (or / sqrt(r_k)) must be finite in the adapters' dtype: an infinite scale makes a
    fresh layer (B = 0) output inf * 0 = NaN instead of its base."""
    s = fk.FeatureSpace({"g": ["a", "b"]}, rank=4)
    with pytest.raises(ValueError, match="overflows"):
        fk.FLixLinear(16, 16, s, alpha=alpha, adapter_dtype=dtype, use_rslora=use_rslora)
    with pytest.raises(ValueError, match="overflows"):
        fk.inject(nn.Sequential(nn.Linear(16, 16)), s, target_modules=["0"], alpha=alpha, adapter_dtype=dtype,
                  use_rslora=use_rslora)
    layer = fk.FLixLinear(16, 16, s, alpha=8, adapter_dtype=dtype)
    with pytest.raises(ValueError, match="overflows"):
        layer.set_scaling(alpha, use_rslora)
    assert layer.alpha == 8.0 and torch.isfinite(layer.scaling).all()
    x = torch.randn(3, 16)
    out = layer(x, routing=fk.Routing(s.encode([{"g": "a"}] * 3), s))
    torch.testing.assert_close(out, layer.base_layer(x))  # a fresh layer is its base


def test_a_failed_inject_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).half())
    before = [type(m) for m in model]
    with pytest.raises(ValueError, match="overflows"):
        fk.inject(model, space(), target_modules="all-linear", alpha=1e6)  # fits fp32, not the fp16 layer's
    assert [type(m) for m in model] == before and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("flag", ["false", "true", 2, None])
def test_use_rslora_must_be_a_bool(flag):
    with pytest.raises(TypeError, match="use_rslora must be True or False"):
        fk.FLixLinear(4, 3, space(), use_rslora=flag)


@pytest.mark.parametrize("alpha", ["8", None, True, torch.tensor(8.0)])
def test_alpha_must_be_a_number(alpha):
    with pytest.raises(TypeError, match="alpha must be a number"):
        fk.FLixLinear(4, 3, space(), alpha=alpha)


def test_merged_forward_with_another_routing_says_what_works(seed):
    layer = _filled(seed)
    s = layer.space
    layer.merge([1, 4])
    other = fk.Routing([[2, 4]] * 3, s)
    with pytest.raises(RuntimeError) as e:
        layer(torch.randn(3, 6), other)
    msg = str(e.value)
    assert "{language='fr', task='qa'}" in msg
    assert "flix_kernels.set_routing(model, None)" in msg and "flix_kernels.unmerge(model)" in msg
    layer.set_routing(other)
    with pytest.raises(RuntimeError, match=r"set_routing\(model, None\)"):
        layer(torch.randn(3, 6))
    layer.set_routing(None)
    layer(torch.randn(3, 6))  # what the message says works


def test_training_a_merged_layer_raises_but_inference_works(seed):
    """A merged layer has no adapter path: backward of a training forward (train mode, grad enabled,
    trainable adapters) would give the adapters no gradient, so it raises; forwards (in any mode)
    and backward in eval mode or with frozen adapters work."""
    layer = _filled(seed)
    x = torch.randn(3, 6)
    layer.merge([1, 4])
    layer.train()
    y = layer(x)  # the forward itself is fine: e.g. an evaluation loss in a model left in train mode
    assert torch.equal(y, layer.base_layer(x))
    with pytest.raises(RuntimeError, match=r"backward through a FLix layer with feature set \{language='fr', "
                                           r"task='qa'\} merged.*unmerge\(model\) before training"):
        y.sum().backward()
    with torch.no_grad():
        layer(x)  # e.g. generate() in a model left in train mode
    layer.eval()
    y = layer(x.requires_grad_(True))  # eval with grad: gradients of the input, e.g. attribution
    y.sum().backward()
    assert x.grad is not None
    layer.train()
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    layer(x)  # frozen adapters: training something else through the merged weights
    layer.unmerge()
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)
    layer(x, fk.Routing([[1, 4]] * 3, layer.space)).sum().backward()
    assert layer.lora_B.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_merge_rounds_once_and_unmerge_restores_exactly(seed, dtype):
    """The merged weight is W + delta rounded once to W's dtype (delta in float32, float64 for
    float64 weights); unmerge restores the original bits in every dtype."""
    torch.manual_seed(seed)
    layer = fk.FLixLinear(64, 48, space(), dtype=dtype, adapter_dtype=torch.float32)
    nn.init.normal_(layer.lora_B, std=0.3)
    w0 = layer.base_layer.weight.detach().clone()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    delta = layer.delta_weight([0, 5], acc)
    layer.merge([0, 5])
    assert torch.equal(layer.base_layer.weight, (w0.to(acc) + delta).to(dtype))
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)


def test_merge_unmerge_layer(seed):
    torch.manual_seed(seed)
    s = space()
    layer = fk.FLixLinear(10, 6, s)
    nn.init.normal_(layer.lora_B)
    w0 = layer.base_layer.weight.detach().clone()
    r = fk.Routing([[2, 5]] * 3, s)
    x = torch.randn(3, 4, 10)
    expected = layer(x, r)
    layer.merge([2, 5])
    assert torch.allclose(layer(x, r), expected, atol=1e-5)
    assert torch.allclose(layer(x), expected, atol=1e-5)  # merged needs no routing
    with pytest.raises(RuntimeError, match="merged into its weights"):
        layer(x, fk.Routing([[2, 4]] * 3, s))
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6)


def test_torch_compile_forward_and_backward_match_eager(seed):
    """torch.compile runs the layer (the torch backend's metadata step is a graph break, so no
    fullgraph here) and matches eager, gradients included, across batches without recompiling."""
    torch.manual_seed(seed)
    s = space()
    layer = fk.FLixLinear(16, 8, s)
    nn.init.normal_(layer.lora_B)
    r = fk.Routing([[0, 4], [1, -1], [-1, 5]], s)
    x = torch.randn(3, 5, 16)
    compiled = torch.compile(layer, backend="aot_eager")
    out = compiled(x, r)
    assert torch.allclose(out, layer(x, r), atol=1e-6)
    out.square().sum().backward()
    gA = layer.lora_A.grad.clone()
    layer.lora_A.grad = None
    layer(x, r).square().sum().backward()
    assert torch.allclose(gA, layer.lora_A.grad, atol=1e-5)


def test_scales_stay_exact_when_the_module_is_cast(seed):
    s = fk.FeatureSpace({"a": ["x", "y"], "b": ["z"]}, {"a": 3, "b": 7})
    layer = fk.FLixLinear(8, 8, s, alpha=16)
    layer.to(torch.bfloat16)
    assert layer.scaling.dtype == torch.float32
    assert layer.scaling.tolist() == pytest.approx([16 / 3, 16 / 3, 16 / 7], rel=1e-7)
    assert layer.lora_A.dtype == torch.bfloat16
    layer.to(torch.float64)
    assert layer.scaling.dtype == torch.float64


def test_autocast_mixed_precision_runs_and_keeps_autocast_dtype(seed):
    torch.manual_seed(seed)
    s = space()
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    fk.inject(model, s, target_modules="all-linear")
    for _, layer in fk.flix_layers(model):
        nn.init.normal_(layer.lora_B, std=0.1)
    r = fk.Routing([[0, 4], [2, 5]], s)
    x = torch.randn(2, 3, 16)
    with fk.use_routing(model, r):
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16  # what autocast gives for a plain nn.Linear
        torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().sum().backward()
    assert all(layer.lora_B.grad is not None for _, layer in fk.flix_layers(model))
