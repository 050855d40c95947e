"""from_peft_adapters: saved PEFT LoRA adapters become FLix features; a mixed batch applying any
set of them per example equals PEFT with exactly that set of adapters active."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import flix_kernels as fk  # noqa: E402
from _models import train_steps, tiny_llama, token_ids  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)

# Three adapters with different ranks, alphas, targets and scale rules (rsLoRA, per-module patterns).
ADAPTERS = {
    "fr": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "qa": dict(r=2, lora_alpha=5, use_rslora=True, target_modules=["k_proj", "down_proj", "q_proj"],
               rank_pattern={"down_proj": 3}, alpha_pattern={"q_proj": 3.0}),
    "de": dict(r=3, lora_alpha=16, lora_dropout=0.1, target_modules=["o_proj", "up_proj", "v_proj"]),
}


def save_adapter(base, out_dir, seed, config=None, safe=True, **lora_kwargs):
    """A PEFT adapter on a copy of ``base`` with random nonzero A and B, saved to ``out_dir``."""
    config = config or peft.LoraConfig(**lora_kwargs)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(str(out_dir), safe_serialization=safe)
    return str(out_dir)


@pytest.fixture
def setup(seed, tmp_path):
    """(base model, {name: adapter folder}) for the three ADAPTERS."""
    base = tiny_llama(seed)
    dirs = {name: save_adapter(base, tmp_path / name, seed + i + 1, **kw) for i, (name, kw) in enumerate(ADAPTERS.items())}
    return base, dirs


def peft_reference(base, dirs, sets, ids):
    """Logits of each example with PEFT's own LoRA layers and exactly its set of adapters active."""
    names = list(dirs)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs[names[0]], adapter_name=names[0]).eval()
    for name in names[1:]:
        ref.load_adapter(dirs[name], adapter_name=name)
    out = []
    with torch.no_grad():
        for b, active in enumerate(sets):
            if active:
                ref.base_model.set_adapter(list(active))  # LoRA layers add every active adapter's update
                out.append(ref(input_ids=ids[b:b + 1]).logits[0])
            else:
                with ref.disable_adapter():
                    out.append(ref(input_ids=ids[b:b + 1]).logits[0])
    return torch.stack(out), ref


def flix_logits(model, space, examples, ids):
    with torch.no_grad(), fk.use_routing(model, fk.Routing(space.encode(examples), space)):
        return model(ids).logits


def assert_changes_output(base, ids, logits, sets):
    with torch.no_grad():
        plain = base(ids).logits
    for b, active in enumerate(sets):
        if active:
            assert not torch.allclose(logits[b], plain[b], atol=1e-3), f"example {b}: adapters {active} change nothing"


def test_default_single_group_mixed_batch_equals_peft(setup, seed):
    base, dirs = setup
    model = copy.deepcopy(base)
    space = fk.from_peft_adapters(model, dirs)
    assert space == fk.FeatureSpace({"adapter": ["fr", "qa", "de"]}, 4)  # padded to the largest rank (fr: 4)
    sets = [["fr"], [], ["qa"], ["de"], ["qa"], ["fr"]]
    ids = token_ids(len(sets), 7, torch.Generator().manual_seed(seed))
    got = flix_logits(model, space, [{"adapter": s[0]} if s else {} for s in sets], ids)
    want, ref = peft_reference(base, dirs, sets, ids)
    torch.testing.assert_close(got, want, **TOL)
    assert_changes_output(base, ids, got, sets)
    # PEFT's own mixed batch (one adapter per example) agrees too.
    with torch.no_grad():
        mixed = ref(input_ids=ids, adapter_names=[s[0] if s else "__base__" for s in sets]).logits
    torch.testing.assert_close(got, mixed, **TOL)
    # Only the FLix adapters train; layers on the union of the adapters' targets.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    layers = fk.flix_layers(model)
    assert len(trainable) == 2 * len(layers) and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert {n.rpartition(".")[2] for n, _ in layers} == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}


def test_one_group_per_adapter_applies_any_set(setup, seed):
    base, dirs = setup
    model = copy.deepcopy(base)
    space = fk.from_peft_adapters(model, dirs, group=None)
    assert space.group_ranks == {"fr": 4, "qa": 3, "de": 3}  # each adapter's own (largest) rank
    sets = [[], ["fr"], ["qa"], ["de"], ["fr", "qa"], ["qa", "de"], ["fr", "de"], ["fr", "qa", "de"]]
    ids = token_ids(len(sets), 6, torch.Generator().manual_seed(seed))
    got = flix_logits(model, space, [{n: n for n in s} for s in sets], ids)
    want, _ = peft_reference(base, dirs, sets, ids)
    torch.testing.assert_close(got, want, **TOL)
    assert_changes_output(base, ids, got, sets)
    # Default scale: the adapters' alphas differ (8, 5, 16), so the largest; rsLoRA only if all use it.
    layer = fk.flix_layers(model)[0][1]
    assert layer.alpha == 16.0 and layer.use_rslora is False and layer.dropout == pytest.approx(0.1)


def test_user_space_keys_padding_and_untargeted_modules(setup, seed):
    base, dirs = setup
    space = fk.FeatureSpace({"language": ["en", "fr", "de"], "task": ["qa", "mt"]}, {"language": 5, "task": 4})
    model = copy.deepcopy(base)
    keys = {"language=fr": dirs["fr"], ("language", "de"): dirs["de"], "qa": dirs["qa"]}
    assert fk.from_peft_adapters(model, keys, space, alpha=7.0, use_rslora=True) is space
    examples = [{"language": "fr"}, {"language": "fr", "task": "qa"}, {}, {"task": "qa"},
                {"language": "de", "task": "qa"}, {"language": "en"}, {"language": "en", "task": "mt"}]
    sets = [["fr"], ["fr", "qa"], [], ["qa"], ["de", "qa"], [], []]  # en and mt: fresh features, B = 0
    ids = token_ids(len(examples), 5, torch.Generator().manual_seed(seed))
    got = flix_logits(model, space, examples, ids)
    want, _ = peft_reference(base, dirs, sets, ids)
    torch.testing.assert_close(got, want, **TOL)
    assert_changes_output(base, ids, got, sets)

    offs = space.rank_offsets
    fr, qa, en = space.index("language", "fr"), space.index("task", "qa"), space.index("language", "en")
    k_proj = model.get_submodule("model.layers.0.self_attn.k_proj")  # targeted by qa, not by fr
    q_proj = model.get_submodule("model.layers.1.self_attn.q_proj")  # fr (rank 4 of 5), qa (rank 2 of 4)
    assert k_proj.alpha == 7.0 and k_proj.use_rslora
    assert not k_proj.lora_A[offs[fr]:offs[fr + 1]].any() and not k_proj.lora_B[:, offs[fr]:offs[fr + 1]].any()
    assert not q_proj.lora_A[offs[fr] + 4:offs[fr + 1]].any() and not q_proj.lora_B[:, offs[fr] + 4:offs[fr + 1]].any()
    assert not q_proj.lora_A[offs[qa] + 2:offs[qa + 1]].any()
    assert q_proj.lora_A[offs[fr]:offs[fr] + 4].abs().min() > 0 and q_proj.lora_A[offs[en]:offs[en + 1]].any()
    assert not q_proj.lora_B[:, offs[en]:offs[en + 1]].any()  # a fresh feature: LoRA init


def test_matching_scale_imports_tensors_unchanged(seed, tmp_path):
    base = tiny_llama(seed)
    path = save_adapter(base, tmp_path / "a", seed, r=4, lora_alpha=8, target_modules=["v_proj"])
    model = copy.deepcopy(base)
    space = fk.from_peft_adapters(model, {"a": path}, group=None)
    saved = load_file(os.path.join(path, "adapter_model.safetensors"))
    for name, layer in fk.flix_layers(model):
        assert torch.equal(layer.lora_A, saved[f"base_model.model.{name}.lora_A.weight"])
        assert torch.equal(layer.lora_B, saved[f"base_model.model.{name}.lora_B.weight"])  # no scale folded in
    assert space.total_rank == 4


def test_imported_features_train(setup, seed):
    base, dirs = setup
    model = copy.deepcopy(base).train()
    space = fk.from_peft_adapters(model, dirs, group=None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    sets = [["fr"], ["qa", "de"], ["fr", "qa", "de"], []]
    routing = fk.Routing(space.encode([{n: n for n in s} for s in sets]), space)
    ids = token_ids(len(sets), 8, torch.Generator().manual_seed(seed))
    losses = train_steps(model, routing, ids, opt)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, f"{n}: trained={not torch.equal(p, before[n])}"
    # Padding rows and modules an adapter does not target stay exactly zero.
    offs, fr = space.rank_offsets, space.index("fr", "fr")
    k_proj = model.get_submodule("model.layers.0.self_attn.k_proj")
    assert not k_proj.lora_A[offs[fr]:offs[fr + 1]].any() and not k_proj.lora_B[:, offs[fr]:offs[fr + 1]].any()
    qa = space.index("qa", "qa")
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")  # qa has rank 2 there, 3 in the space
    assert not q_proj.lora_A[offs[qa] + 2:offs[qa + 1]].any() and q_proj.lora_A[offs[qa]:offs[qa] + 2].abs().min() > 0


def test_import_into_existing_flix_layers(setup, seed):
    base, dirs = setup
    space = fk.FeatureSpace({"language": ["fr", "sw"], "task": ["qa"]}, {"language": 4, "task": 3})
    model = copy.deepcopy(base)
    fk.inject(model, space, target_modules="all-linear", alpha=2.0)
    with pytest.raises(ValueError, match="their own alpha"):
        fk.from_peft_adapters(model, {"fr": dirs["fr"]}, space, alpha=8.0)
    with pytest.raises(ValueError, match="another FeatureSpace"):
        fk.from_peft_adapters(model, {"fr": dirs["fr"]})
    sw = space.index("language", "sw")
    o = space.rank_offsets
    gate = model.get_submodule("model.layers.0.mlp.gate_proj")
    sw_before = gate.lora_A[o[sw]:o[sw + 1]].clone()
    fk.from_peft_adapters(model, {"fr": dirs["fr"], "qa": dirs["qa"]}, space)
    assert torch.equal(gate.lora_A[o[sw]:o[sw + 1]], sw_before)  # features not imported are untouched
    examples, sets = [{"language": "fr", "task": "qa"}, {"language": "sw"}, {"task": "qa"}], [["fr", "qa"], [], ["qa"]]
    ids = token_ids(3, 5, torch.Generator().manual_seed(seed))
    want, _ = peft_reference(base, {k: dirs[k] for k in ("fr", "qa")}, sets, ids)
    torch.testing.assert_close(flix_logits(model, space, examples, ids), want, **TOL)


# -- errors: every refusal names the adapter and leaves the model untouched --------------------

@pytest.mark.parametrize("lora_kwargs, match", [
    (dict(use_dora=True, target_modules=["q_proj"]), "adapter 'bad'.*use_dora=True is not supported"),
    (dict(bias="all", target_modules=["q_proj"]), "adapter 'bad'.*bias='all' is not supported"),
    (dict(bias="lora_only", target_modules=["q_proj"]), "adapter 'bad'.*bias='lora_only'"),
    (dict(modules_to_save=["lm_head"], target_modules=["q_proj"]), "adapter 'bad'.*modules_to_save"),
    (dict(target_modules=["embed_tokens", "q_proj"]), "adapter 'bad'.*embedding LoRA"),
    (dict(lora_bias=True, target_modules=["q_proj"]), "adapter 'bad'.*lora_bias"),
], ids=["dora", "bias-all", "bias-lora-only", "modules-to-save", "embedding", "lora-bias"])
def test_unsupported_lora_features_raise(seed, tmp_path, lora_kwargs, match):
    base = tiny_llama(seed)
    good = save_adapter(base, tmp_path / "good", seed, r=2, target_modules=["q_proj"])
    bad = save_adapter(base, tmp_path / "bad", seed + 1, r=2, **lora_kwargs)
    model = copy.deepcopy(base)
    with pytest.raises(NotImplementedError, match=match):
        fk.from_peft_adapters(model, {"good": good, "bad": bad})
    assert not fk.flix_layers(model)


def test_non_lora_adapter_raises(seed, tmp_path):
    base = tiny_llama(seed)
    ia3 = save_adapter(base, tmp_path / "ia3", seed, config=peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                           feedforward_modules=["down_proj"]))
    with pytest.raises(NotImplementedError, match="adapter 'x'.*peft_type 'IA3' is not supported"):
        fk.from_peft_adapters(copy.deepcopy(base), {"x": ia3})


def test_pickled_adapter_is_refused(seed, tmp_path):
    base = tiny_llama(seed)
    path = save_adapter(base, tmp_path / "bin", seed, safe=False, r=2, target_modules=["q_proj"])
    assert os.path.isfile(os.path.join(path, "adapter_model.bin"))
    with pytest.raises(NotImplementedError, match="adapter 'old'.*never unpickles.*save_pretrained"):
        fk.from_peft_adapters(copy.deepcopy(base), {"old": path})


def test_base_mutating_init_is_refused(seed, tmp_path):
    base = tiny_llama(seed)
    path = save_adapter(base, tmp_path / "p", seed, r=2, target_modules=["q_proj"])
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg["init_lora_weights"] = "pissa"
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(NotImplementedError, match="adapter 'p'.*init_lora_weights='pissa' changes the base"):
        fk.from_peft_adapters(copy.deepcopy(base), {"p": path})


def test_rank_larger_than_the_feature_raises(setup):
    base, dirs = setup
    space = fk.FeatureSpace({"language": ["fr"]}, 3)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"adapter 'fr'.*rank 4 at module .*feature language='fr' has rank 3"):
        fk.from_peft_adapters(model, {"fr": dirs["fr"]}, space)
    assert not fk.flix_layers(model)


@pytest.mark.parametrize("key, match", [("x", "ambiguous"), ("b=y", "unknown feature 'y'"), ("y", "names no feature"),
                                        (("a", "z"), "unknown feature 'z'")])
def test_bad_feature_keys_raise(setup, key, match):
    base, dirs = setup
    space = fk.FeatureSpace({"a": ["x"], "b": ["x", "c=x"]}, 4)
    with pytest.raises(ValueError, match=match):
        fk.from_peft_adapters(copy.deepcopy(base), {key: dirs["fr"]}, space)


def test_two_adapters_for_one_feature_raise(setup):
    base, dirs = setup
    space = fk.FeatureSpace({"a": ["x"]}, 4)
    with pytest.raises(ValueError, match="both name feature a='x'"):
        fk.from_peft_adapters(copy.deepcopy(base), {"x": dirs["fr"], "a=x": dirs["qa"]}, space)


def test_adapter_for_another_model_raises(setup, seed):
    _, dirs = setup
    shallow = tiny_llama(seed, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"adapter 'fr'.*adapts module 'model.layers.1.self_attn.[qv]_proj', which "):
        fk.from_peft_adapters(shallow, {"fr": dirs["fr"]})
    narrow = tiny_llama(seed, intermediate_size=40)
    with pytest.raises(ValueError, match=r"adapter 'qa'.*down_proj' is \(40 -> 32\) but the adapter has lora_A \(3, 48\)"):
        fk.from_peft_adapters(narrow, {"qa": dirs["qa"]})
    assert not fk.flix_layers(shallow) and not fk.flix_layers(narrow)


def test_missing_files_raise(tmp_path, seed):
    base = tiny_llama(seed)
    with pytest.raises(FileNotFoundError, match="adapter 'a'.*not a local folder"):
        fk.from_peft_adapters(base, {"a": str(tmp_path / "nowhere")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter 'a': no adapter_model.safetensors"):
        fk.from_peft_adapters(base, {"a": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match="non-empty dict"):
        fk.from_peft_adapters(base, {})


def test_gpt2_conv1d_fan_in_fan_out(seed, tmp_path):
    """GPT-2's Conv1D (fan_in_fan_out=True) adapters import and match PEFT."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2,
                                                                n_head=2)).eval()
    path = save_adapter(base, tmp_path / "g", seed, r=2, lora_alpha=4, fan_in_fan_out=True,
                        target_modules=["c_attn", "c_fc"])
    model = copy.deepcopy(base)
    space = fk.from_peft_adapters(model, {"g": path})
    ids = token_ids(2, 5, torch.Generator().manual_seed(seed), vocab=50)
    got = flix_logits(model, space, [{"adapter": "g"}, {}], ids)
    want, _ = peft_reference(base, {"g": path}, [["g"], []], ids)
    torch.testing.assert_close(got, want, **TOL)
    assert_changes_output(base, ids, got, [["g"], []])
