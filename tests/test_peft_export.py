"""export_peft: a FLix feature set exported as a plain PEFT LoRA reproduces the FLix model."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import flix_kernels as fk  # noqa: E402
from _models import make_space, randomize_adapters, tiny_llama, tiny_mlp, token_ids, uniform_routing  # noqa: E402

RANKS = {"language": 4, "task": 2}


def flix_llama(seed, use_rslora, alpha=5.0, targets="all-linear"):
    """(base, FLix model) where base is an untouched copy of the model before inject."""
    base = tiny_llama(seed)
    model = copy.deepcopy(base)
    fk.inject(model, make_space(RANKS), target_modules=targets, alpha=alpha, use_rslora=use_rslora)
    randomize_adapters(model, torch.Generator().manual_seed(seed + 1), b_scale=0.2)
    return base, model


@pytest.mark.parametrize("features", [{"task": "mt"}, {"language": "fr"}, {"language": "sw", "task": "qa"}],
                         ids=["task", "language", "language+task"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_model_reproduces_the_flix_feature_set(seed, tmp_path, use_rslora, features):
    base, model = flix_llama(seed, use_rslora)
    space = make_space(RANKS)
    ids = token_ids(3, 7, torch.Generator().manual_seed(seed))
    with torch.no_grad(), fk.use_routing(model, uniform_routing(space, features, 3)):
        expected = model(ids).logits

    out_dir = str(tmp_path / "peft")
    assert fk.export_peft(model, features, out_dir) == out_dir
    assert sorted(os.listdir(out_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(out_dir, "adapter_config.json")) as f:
        config = json.load(f)
    rank = sum(RANKS[g] for g in features)
    assert config["r"] == rank and config["lora_alpha"] == rank
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), out_dir).eval()
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n)
    assert n_lora == len(fk.flix_layers(model))
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
        base_logits = base(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the feature set changes the output


def test_export_of_a_subset_of_layers(seed, tmp_path):
    base, model = flix_llama(seed, use_rslora=False, alpha=3.0, targets=["q_proj", "down_proj"])
    features = {"language": "en", "task": "mt"}
    ids = token_ids(2, 5, torch.Generator().manual_seed(seed))
    with torch.no_grad(), fk.use_routing(model, uniform_routing(make_space(RANKS), features, 2)):
        expected = model(ids).logits
    fk.export_peft(model, features, str(tmp_path))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("features, match", [({}, "at least one feature"),
                                              ({"language": "de"}, "unknown feature 'de'"),
                                              ({"dialect": "x"}, "unknown feature group"),
                                              ({"language": "en", "task": "chat"}, "unknown feature 'chat'")])
def test_export_with_empty_or_unknown_features_raises(seed, tmp_path, features, match):
    model = tiny_mlp(seed)
    fk.inject(model, make_space(RANKS), target_modules="all-linear")
    with pytest.raises(ValueError, match=match):
        fk.export_peft(model, features, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_export_of_model_without_flix_layers_raises(seed, tmp_path):
    with pytest.raises(ValueError, match="no FLix layers"):
        fk.export_peft(tiny_mlp(seed), {"language": "en"}, str(tmp_path))
