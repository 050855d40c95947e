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


def test_state_dict_holds_adapters_and_base():
    layer = fk.FLixLinear(4, 3, space())
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias", "lora_A", "lora_B"}


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
