"""FLix layers through PEFT: get_peft_model(model, flix_lora_config(...)) gives routable, trainable
FLix layers that save and load through PEFT and match a float64 per-feature reference."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import flix_kernels as fk  # noqa: E402
from flix_kernels.integrations.peft_layer import FLixLoraConfig, FLixLoraLinear  # noqa: E402
from _models import train_steps, make_space, randomize_adapters, tiny_llama, token_ids  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
TARGETS = ["q_proj", "v_proj", "down_proj"]
EXAMPLES = [{"language": "fr"}, {}, {"language": "sw", "task": "qa"}, {"task": "mt"}, {"language": "en", "task": "mt"}]


def flix_peft_model(base, seed, space=None, randomize=True, **config_kwargs):
    kw = dict(target_modules=TARGETS, lora_alpha=5.0, alpha_pattern={"v_proj": 2.0}, task_type="CAUSAL_LM")
    config = fk.flix_lora_config(space or make_space(), **{**kw, **config_kwargs})
    model = peft.get_peft_model(copy.deepcopy(base), config)
    if randomize:
        randomize_adapters(model, torch.Generator().manual_seed(seed + 1), b_scale=0.3)
    return model


def routed_logits(model, space, examples, ids):
    with torch.no_grad(), fk.use_routing(model, fk.Routing(space.encode(examples), space)):
        return model(input_ids=ids).logits


def reference_logits(base, peft_model, space, examples, ids):
    """The base model in float64 plus, at every FLix layer, a loop over each example's features
    adding ``alpha / r_k * B_k A_k x`` (``alpha / sqrt(r_k)`` with rsLoRA)."""
    ref = copy.deepcopy(base).double()
    feats = [space.feature_ids(e) for e in examples]
    offs = space.rank_offsets

    def make_hook(A, B, alpha, rslora):
        def hook(module, inputs, out):
            x, delta = inputs[0], torch.zeros_like(out)
            for b, ks in enumerate(feats):
                for k in ks:
                    r = offs[k + 1] - offs[k]
                    s = alpha / (r ** 0.5 if rslora else r)
                    delta[b] += s * (x[b] @ A[offs[k]:offs[k + 1]].T) @ B[:, offs[k]:offs[k + 1]].T
            return out + delta
        return hook

    for name, layer in fk.flix_layers(peft_model):
        module = ref.get_submodule(name.removeprefix("base_model.model."))
        module.register_forward_hook(make_hook(layer.lora_A.detach().double(), layer.lora_B.detach().double(),
                                               layer.alpha, layer.use_rslora))
    with torch.no_grad():
        return ref(ids).logits


@pytest.mark.parametrize("use_rslora", [False, True])
def test_get_peft_model_gives_routed_flix_layers(seed, use_rslora):
    base, space = tiny_llama(seed), make_space()
    model = flix_peft_model(base, seed, randomize=False, use_rslora=use_rslora)
    layers = fk.flix_layers(model)
    assert len(layers) == 2 * len(TARGETS)
    assert all(isinstance(layer, FLixLoraLinear) and isinstance(layer, peft.tuners.tuners_utils.BaseTunerLayer)
               for _, layer in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n, _ in layers for p in ("lora_A", "lora_B")}
    assert model.peft_config["default"].r == space.total_rank
    alphas = {n.rpartition(".")[2]: layer.alpha for n, layer in layers}
    assert alphas == {"q_proj": 5.0, "v_proj": 2.0, "down_proj": 5.0}  # alpha_pattern reaches the layers
    assert all(layer.use_rslora == use_rslora for _, layer in layers)

    ids = token_ids(len(EXAMPLES), 6, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(routed_logits(model, space, EXAMPLES, ids), base(ids).logits)  # B = 0 at init
    randomize_adapters(model, torch.Generator().manual_seed(seed + 1), b_scale=0.3)
    got = routed_logits(model, space, EXAMPLES, ids)
    torch.testing.assert_close(got.double(), reference_logits(base, model, space, EXAMPLES, ids), **TOL)
    with torch.no_grad():
        assert not torch.allclose(got[0], base(ids).logits[0], atol=1e-3)
    fk.set_routing(model, fk.Routing(space.encode(EXAMPLES), space))  # set_routing works on the PeftModel too
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, got, rtol=0, atol=0)


def test_training_through_peft(seed):
    base, space = tiny_llama(seed), make_space()
    model = flix_peft_model(base, seed).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_ids(len(EXAMPLES), 8, torch.Generator().manual_seed(seed))
    routing = fk.Routing(space.encode(EXAMPLES), space)
    losses = train_steps(model, routing, ids, opt)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n


def test_save_pretrained_and_load_round_trip(seed, tmp_path):
    base, space = tiny_llama(seed), make_space()
    model = flix_peft_model(base, seed).eval()
    ids = token_ids(len(EXAMPLES), 6, torch.Generator().manual_seed(seed))
    expected = routed_logits(model, space, EXAMPLES, ids)
    model.save_pretrained(str(tmp_path))
    with open(tmp_path / "adapter_config.json") as f:
        config = json.load(f)
    assert config["flix_space"] == space.to_dict() and config["r"] == space.total_rank
    assert config["peft_type"] == "LORA" and config["alpha_pattern"] == {"v_proj": 2.0}
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    layers = dict(fk.flix_layers(model))
    assert set(saved) == {f"{n}.{p}" for n in layers for p in ("lora_A", "lora_B")}
    assert all(torch.equal(saved[f"{n}.lora_B"], layer.lora_B) for n, layer in layers.items())

    loaded = fk.load_flix_peft(copy.deepcopy(base), str(tmp_path))
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False, as in PEFT
    torch.testing.assert_close(routed_logits(loaded, space, EXAMPLES, ids), expected, rtol=0, atol=0)
    assert {n.rpartition(".")[2]: l.alpha for n, l in fk.flix_layers(loaded)}["v_proj"] == 2.0

    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True,
                                           config=FLixLoraConfig.from_pretrained(str(tmp_path)))
    assert {n for n, p in again.named_parameters() if p.requires_grad} == set(saved)
    torch.testing.assert_close(routed_logits(again.eval(), space, EXAMPLES, ids), expected, rtol=0, atol=0)


def test_plain_from_pretrained_without_the_config_builds_plain_lora(seed, tmp_path):
    """Documented PEFT limit: the custom-module mapping is not saved, so PEFT alone builds plain LoRA (and warns)."""
    base = tiny_llama(seed)
    flix_peft_model(base, seed).save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match="flix_space"):
        plain = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert not fk.flix_layers(plain)


def test_disable_adapter_gives_the_base_model(seed):
    base, space = tiny_llama(seed), make_space()
    model = flix_peft_model(base, seed)
    ids = token_ids(len(EXAMPLES), 5, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = base(ids).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)  # no routing needed
    assert not torch.allclose(routed_logits(model, space, EXAMPLES, ids)[0], want[0], atol=1e-3)


def test_merge_through_peft(seed):
    base, space = tiny_llama(seed), make_space()
    model = flix_peft_model(base, seed)
    features = {"language": "fr", "task": "qa"}
    ids = token_ids(2, 5, torch.Generator().manual_seed(seed))
    expected = routed_logits(model, space, [features] * 2, ids)
    mixed = routed_logits(model, space, EXAMPLES[:2], ids)
    with pytest.raises(NotImplementedError, match="flix_kernels.merge"):
        model.merge_and_unload()
    fk.merge(model, features)
    model.unmerge_adapter()  # PEFT's unmerge reaches FLix layers
    assert all(layer.merged is None for _, layer in fk.flix_layers(model))
    torch.testing.assert_close(routed_logits(model, space, EXAMPLES[:2], ids), mixed, **TOL)
    fk.merge(model, features)
    merged = model.merge_and_unload()
    assert not fk.flix_layers(merged) and type(merged).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, **TOL)


def test_half_precision_base_gets_float32_adapters(seed):
    base, space = tiny_llama(seed).to(torch.bfloat16), make_space()
    model = flix_peft_model(base, seed, randomize=False)
    layer = fk.flix_layers(model)[0][1]
    assert layer.lora_A.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    randomize_adapters(model, torch.Generator().manual_seed(seed), b_scale=0.3)
    ids = token_ids(len(EXAMPLES), 4, torch.Generator().manual_seed(seed))
    logits = routed_logits(model, space, EXAMPLES, ids)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(use_dora=True), "use_dora=True is not supported"),
    (dict(rank_pattern={"q_proj": 2}), "rank_pattern=.* ranks come from the FeatureSpace"),
    (dict(bias="all"), "bias='all' is not supported"),
    (dict(lora_bias=True), "lora_bias=True is not supported"),
    (dict(init_lora_weights="olora"), "init_lora_weights='olora' is not supported"),
], ids=["dora", "rank-pattern", "bias", "lora-bias", "olora"])
def test_unsupported_options_raise(kwargs, match):
    with pytest.raises(NotImplementedError, match=match):
        fk.flix_lora_config(make_space(), target_modules=["q_proj"], **kwargs)


def test_unsupported_targets_and_second_adapter_raise(seed):
    base = tiny_llama(seed)
    with pytest.raises(NotImplementedError, match="'model.embed_tokens' has type Embedding; FLix layers adapt linear"):
        flix_peft_model(base, seed, target_modules=["q_proj", "embed_tokens"])
    model = flix_peft_model(base, seed)
    with pytest.raises(NotImplementedError, match="already has a FLix adapter; one FLix adapter per model"):
        model.add_adapter("second", fk.flix_lora_config(make_space(), target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="needs flix_space"):
        FLixLoraConfig(target_modules=["q_proj"])


def test_flix_config_on_a_plain_lora_model_adds_plain_lora(seed):
    """Documented PEFT limit: layers that are already LoRA layers get a plain LoRA adapter, not FLix."""
    model = peft.get_peft_model(copy.deepcopy(tiny_llama(seed)), peft.LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("flix", fk.flix_lora_config(make_space(), target_modules=["q_proj"]))
    assert not fk.flix_layers(model)
    assert "flix" in model.base_model.model.model.layers[0].self_attn.q_proj.lora_A


def test_load_errors(seed, tmp_path):
    base = tiny_llama(seed)
    plain = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"]))
    plain.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="no flix_space: not a FLix adapter"):
        fk.load_flix_peft(copy.deepcopy(base), str(tmp_path / "plain"))
    flix_dir = tmp_path / "flix"
    flix_peft_model(base, seed).save_pretrained(str(flix_dir))
    with pytest.raises(ValueError, match="FLix adapter saved through PEFT; load it with flix_kernels.load_flix_peft"):
        fk.from_peft_adapters(copy.deepcopy(base), {"x": str(flix_dir)})
    tensors = load_file(str(flix_dir / "adapter_model.safetensors"))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(flix_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"lacks the FLix tensors \\['{dropped}'\\]"):
        fk.load_flix_peft(copy.deepcopy(base), str(flix_dir))
    os.remove(flix_dir / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        fk.load_flix_peft(copy.deepcopy(base), str(flix_dir))


def test_gpt2_conv1d(seed):
    """transformers' Conv1D (GPT-2) becomes a FLix layer through get_peft_model and matches the float64 reference."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2,
                                                                n_head=2)).eval()
    space = make_space()
    kw = dict(target_modules=["c_attn", "c_fc"], alpha_pattern={}, task_type=None, fan_in_fan_out=True)
    model = flix_peft_model(base, seed, space, **kw)
    assert len(fk.flix_layers(model)) == 4
    ids = token_ids(len(EXAMPLES), 5, torch.Generator().manual_seed(seed), vocab=50)
    got = routed_logits(model, space, EXAMPLES, ids)
    torch.testing.assert_close(got.double(), reference_logits(base, model, space, EXAMPLES, ids), **TOL)
    with torch.no_grad():
        assert not torch.allclose(got[0], base(ids).logits[0], atol=1e-3)
