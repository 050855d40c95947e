"""save_adapters / load_adapters: round trips, every error path, no unpickling, atomic writes."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn as nn

import flix_kernels as fk
import flix_kernels.serialization as ser
from flix_kernels.serialization import CONFIG_FILE, TENSORS_FILE
from _models import adapter_state, make_space, mixed_routing, randomize_adapters, tiny_llama, tiny_mlp, token_ids


def trained_mlp(seed, targets="all-linear", space=None, dims=(12, 20, 16, 7), **inject_kw):
    """A tiny MLP with FLix layers holding random (nonzero) adapters."""
    model = tiny_mlp(seed, dims=dims)
    fk.inject(model, space or make_space(), target_modules=targets, **inject_kw)
    randomize_adapters(model, torch.Generator().manual_seed(seed + 1))
    return model


def outputs(model, seed, space=None):
    gen = torch.Generator().manual_seed(seed + 2)
    space = space or make_space()
    x = torch.randn(4, 3, 12, generator=gen)
    with torch.no_grad(), fk.use_routing(model, mixed_routing(space, 4, gen)):
        return model(x)


def assert_same_adapters(model, expected: dict):
    got = adapter_state(model)
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        assert torch.equal(got[k], expected[k]), k


def assert_only_save_files(folder):
    assert sorted(os.listdir(folder)) == sorted([CONFIG_FILE, TENSORS_FILE])


def save(model, folder):
    fk.save_adapters(model, str(folder))
    return str(folder)


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------

def test_round_trip_restores_adapters_bit_for_bit(seed, tmp_path):
    model = trained_mlp(seed, alpha=5.0, use_rslora=True, dropout=0.1)
    path = save(model, tmp_path / "adapters")
    assert_only_save_files(path)

    other = tiny_mlp(seed)  # same base weights, default hyper-parameters, other adapters
    fk.inject(other, make_space(), target_modules="all-linear")
    randomize_adapters(other, torch.Generator().manual_seed(seed + 7))
    names = fk.load_adapters(other, path)
    assert names == ["fc1", "fc2", "fc3"]
    assert_same_adapters(other, adapter_state(model))
    for (_, a), (_, b) in zip(fk.flix_layers(model), fk.flix_layers(other)):
        assert (b.alpha, b.use_rslora, b.dropout) == (5.0, True, 0.1)
        assert torch.equal(a.scaling, b.scaling)
        assert b.lora_A.requires_grad and b.lora_B.requires_grad
    model.eval(), other.eval()
    assert torch.equal(outputs(other, seed), outputs(model, seed))
    assert_only_save_files(path)


def test_load_into_model_without_flix_layers_injects_them(seed, tmp_path):
    model = trained_mlp(seed, targets=["fc1", "fc3"], alpha=3.0)
    path = save(model, tmp_path)
    fresh = tiny_mlp(seed)
    assert fk.load_adapters(fresh, path) == ["fc1", "fc3"]
    assert [n for n, _ in fk.flix_layers(fresh)] == ["fc1", "fc3"]
    assert type(fresh.fc2) is nn.Linear
    assert_same_adapters(fresh, adapter_state(model))
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [
        "fc1.lora_A", "fc1.lora_B", "fc3.lora_A", "fc3.lora_B"]
    assert torch.equal(outputs(fresh, seed), outputs(model, seed))


def test_load_into_fresh_model_keeps_the_saved_adapter_dtype(seed, tmp_path):
    """float32 adapters on a bfloat16 base (adapter_dtype=float32): the config records dtype float32,
    and loading into a fresh bfloat16 model must give back the same float32 tensors, not rounded ones."""
    model = tiny_mlp(seed, dtype=torch.bfloat16)
    fk.inject(model, make_space(), target_modules="all-linear", adapter_dtype=torch.float32)
    randomize_adapters(model, torch.Generator().manual_seed(seed))
    path = save(model, tmp_path)
    with open(os.path.join(path, CONFIG_FILE)) as f:
        assert json.load(f)["layers"]["fc1"]["dtype"] == "float32"
    fresh = tiny_mlp(seed, dtype=torch.bfloat16)
    fk.load_adapters(fresh, path)
    assert_same_adapters(fresh, adapter_state(model))


class SharedLinear(nn.Module):
    """One nn.Linear reachable under two names (``enc`` and ``dec``), applied twice."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Linear(12, 12)
        self.dec = self.enc

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


def test_load_into_fresh_model_with_a_shared_linear_wraps_every_occurrence(seed, tmp_path):
    """inject gives a Linear shared by two names one FLix layer under both names; loading the save into a
    fresh copy of the model must do the same, or the second use of the module runs without its adapters."""
    model = SharedLinear(seed)
    assert fk.inject(model, make_space(), target_modules="all-linear") == ["enc", "dec"]
    assert model.enc is model.dec and isinstance(model.dec, fk.FLixLinear)
    randomize_adapters(model, torch.Generator().manual_seed(seed))
    path = save(model, tmp_path)
    fresh = SharedLinear(seed)
    fk.load_adapters(fresh, path)
    assert isinstance(fresh.enc, fk.FLixLinear) and fresh.dec is fresh.enc
    assert torch.equal(outputs(fresh, seed), outputs(model, seed))


def test_llama_round_trip_gives_the_same_logits(seed, tmp_path):
    gen = torch.Generator().manual_seed(seed)
    space = make_space()
    model = tiny_llama(seed)
    fk.inject(model, space, target_modules=["q_proj", "v_proj", "down_proj"], alpha=12.0)
    randomize_adapters(model, gen, b_scale=0.2)
    path = save(model, tmp_path)
    fresh = tiny_llama(seed)
    assert fk.load_adapters(fresh, path) == [n for n, _ in fk.flix_layers(model)]
    ids = token_ids(3, 6, gen)
    routing = fk.Routing(space.encode([{"language": "fr", "task": "mt"}, {"task": "qa"}, {"language": "sw"}]), space)
    with torch.no_grad():
        with fk.use_routing(model, routing):
            expected = model(ids).logits
        with fk.use_routing(fresh, routing):
            got = fresh(ids).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(got, tiny_llama(seed)(ids).logits, atol=1e-3)


def test_saving_again_overwrites_and_leaves_no_temp_files(seed, tmp_path):
    first, second = trained_mlp(seed), trained_mlp(seed + 100)
    save(first, tmp_path)
    save(second, tmp_path)
    assert_only_save_files(tmp_path)
    fresh = tiny_mlp(seed)
    fk.load_adapters(fresh, str(tmp_path))
    assert_same_adapters(fresh, adapter_state(second))


def test_save_of_model_without_flix_layers_raises(seed, tmp_path):
    with pytest.raises(ValueError, match="no FLix layers"):
        fk.save_adapters(tiny_mlp(seed), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# error paths
# ---------------------------------------------------------------------------------------------

def _edit_config(path, edit):
    cfg_path = os.path.join(path, CONFIG_FILE)
    with open(cfg_path) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def test_load_from_missing_folder_or_config_raises(seed, tmp_path):
    model = trained_mlp(seed)
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        fk.load_adapters(model, str(tmp_path / "does-not-exist"))
    path = save(model, tmp_path / "a")
    os.remove(os.path.join(path, CONFIG_FILE))
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        fk.load_adapters(model, path)


def test_load_without_tensors_file_raises(seed, tmp_path):
    model = trained_mlp(seed)
    path = save(model, tmp_path)
    os.remove(os.path.join(path, TENSORS_FILE))
    with pytest.raises(FileNotFoundError, match=TENSORS_FILE):
        fk.load_adapters(model, path)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2"])
def test_config_that_is_not_json_raises(seed, tmp_path, text):
    model = trained_mlp(seed)
    path = save(model, tmp_path)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        f.write(text)
    with pytest.raises(ValueError, match="not valid JSON"):
        fk.load_adapters(model, path)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(format="peft"), "not a flix_kernels adapter config"),
    (lambda c: c.pop("format"), "not a flix_kernels adapter config"),
    (lambda c: c.update(format_version=99), "format_version 99"),
    (lambda c: c.pop("layers"), "'layers'"),
    (lambda c: c.update(space=[1]), "'space'"),
])
def test_config_with_wrong_format_raises(seed, tmp_path, edit, match):
    model = trained_mlp(seed)
    path = save(model, tmp_path)
    _edit_config(path, edit)
    with pytest.raises(ValueError, match=match):
        fk.load_adapters(model, path)


def test_config_that_is_not_an_object_raises(seed, tmp_path):
    model = trained_mlp(seed)
    path = save(model, tmp_path)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(["flix_kernels.adapters"], f)
    with pytest.raises(ValueError, match="not a flix_kernels adapter config"):
        fk.load_adapters(model, path)


@pytest.mark.parametrize("other_kw", [dict(alpha=3.0), dict(targets=["fc1", "fc2"]), dict(use_rslora=True)])
def test_tensors_from_a_different_save_are_detected(seed, tmp_path, other_kw):
    model = trained_mlp(seed)
    path = save(model, tmp_path / "a")
    other = save(trained_mlp(seed + 1, **other_kw), tmp_path / "b")
    shutil.copy(os.path.join(other, TENSORS_FILE), os.path.join(path, TENSORS_FILE))
    target = trained_mlp(seed + 2)
    before = adapter_state(target)
    with pytest.raises(ValueError, match="different saves"):
        fk.load_adapters(target, path)
    assert_same_adapters(target, before)


def test_edited_config_no_longer_matches_its_tensors(seed, tmp_path):
    model = trained_mlp(seed)
    path = save(model, tmp_path)
    _edit_config(path, lambda c: c["layers"]["fc2"].update(alpha=1.0))
    with pytest.raises(ValueError, match="different saves"):
        fk.load_adapters(model, path)


def test_file_layer_missing_from_model_raises(seed, tmp_path):
    path = save(trained_mlp(seed), tmp_path)  # fc1, fc2, fc3
    partial = trained_mlp(seed, targets=["fc1"])
    with pytest.raises(ValueError, match=r"layers the model lacks.*fc2"):
        fk.load_adapters(partial, path)
    with pytest.raises(ValueError, match=r"fc2.*not nn.Linear \(or Conv1D\) modules"):
        fk.load_adapters(nn.Sequential(), path)
    renamed = nn.Module()
    renamed.fc1, renamed.fc3, renamed.proj = nn.Linear(12, 20), nn.Linear(16, 7), nn.Linear(20, 16)
    with pytest.raises(ValueError, match=r"fc2.*not nn.Linear \(or Conv1D\) modules"):
        fk.load_adapters(renamed, path)
    assert not fk.flix_layers(renamed)


def test_model_layer_missing_from_file_raises_only_when_strict(seed, tmp_path):
    saved = trained_mlp(seed, targets=["fc1", "fc3"])
    path = save(saved, tmp_path)
    model = trained_mlp(seed + 1)  # fc1, fc2, fc3
    before = adapter_state(model)
    with pytest.raises(ValueError, match=r"fc2.*no adapters.*strict=False"):
        fk.load_adapters(model, path)
    assert_same_adapters(model, before)
    with pytest.warns(UserWarning, match=r"skipped 1 FLix layer.*'fc2'.*left as they were"):
        assert fk.load_adapters(model, path, strict=False) == ["fc1", "fc3"]
    after, expected = adapter_state(model), adapter_state(saved)
    for k in after:
        assert torch.equal(after[k], expected[k] if not k.startswith("fc2.") else before[k]), k


@pytest.mark.parametrize("other_space, match", [
    (make_space(languages=("en", "fr", "de")), "values of group 'language'"),
    (make_space({"language": 4, "task": 3}), "rank of group 'task'"),
    (make_space({"language": 2, "task": 2}), "rank of group 'language'"),
    (fk.FeatureSpace({"task": ["qa", "mt"], "language": ["en", "fr", "sw"]}, {"language": 4, "task": 2}),
     "groups differ"),
])
def test_other_feature_space_raises(seed, tmp_path, other_space, match):
    path = save(trained_mlp(seed), tmp_path)
    model = trained_mlp(seed, space=other_space)
    before = adapter_state(model)
    with pytest.raises(ValueError, match="FeatureSpace differs") as info:
        fk.load_adapters(model, path)
    assert info.match(match)
    assert_same_adapters(model, before)


def test_two_saves_with_identical_configs_cannot_be_mixed(seed, tmp_path):
    """Two checkpoints of one model share every hyper-parameter; their files must still pair up."""
    model = trained_mlp(seed)
    first = save(model, tmp_path / "step1")
    randomize_adapters(model, torch.Generator().manual_seed(seed + 7))
    second = save(model, tmp_path / "step2")
    shutil.copy(os.path.join(second, TENSORS_FILE), os.path.join(first, TENSORS_FILE))
    with pytest.raises(ValueError, match="come from different saves"):
        fk.load_adapters(trained_mlp(seed), first)


def test_failed_load_leaves_a_model_without_flix_layers_untouched(seed, tmp_path):
    path = save(trained_mlp(seed), tmp_path)
    model = tiny_mlp(seed, dims=(12, 24, 16, 7))
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match="does not match the model's"):
        fk.load_adapters(model, path)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before
    assert fk.flix_layers(model) == []


@pytest.mark.parametrize("injected", [True, False])
def test_shape_mismatch_raises(seed, tmp_path, injected):
    path = save(trained_mlp(seed), tmp_path)  # dims (12, 20, 16, 7)
    if injected:
        model = trained_mlp(seed, dims=(12, 24, 16, 7))
    else:
        model = tiny_mlp(seed, dims=(12, 24, 16, 7))
    R = make_space().total_rank
    with pytest.raises(ValueError, match=rf"fc1\.lora_B: saved shape \(20, {R}\) does not match the model's \(24, {R}\)"):
        fk.load_adapters(model, path)


def test_missing_tensor_key_raises(seed, tmp_path):
    path = save(trained_mlp(seed), tmp_path)
    t_path = os.path.join(path, TENSORS_FILE)
    with safetensors.safe_open(t_path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "fc2.lora_A"}
    safetensors.torch.save_file(tensors, t_path, metadata=meta)
    with pytest.raises(ValueError, match=r"lacks tensor 'fc2\.lora_A'"):
        fk.load_adapters(trained_mlp(seed), path)


# ---------------------------------------------------------------------------------------------
# no unpickling
# ---------------------------------------------------------------------------------------------

def test_tensors_file_is_plain_safetensors(seed, tmp_path):
    model = trained_mlp(seed)
    path = save(model, tmp_path)
    with safetensors.safe_open(os.path.join(path, TENSORS_FILE), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        expected = adapter_state(model)
        assert keys == set(expected)
        for k in keys:
            assert torch.equal(f.get_tensor(k), expected[k])
    with open(os.path.join(path, CONFIG_FILE)) as f:
        assert json.loads(meta["flix_config"]) == json.load(f)
    with open(os.path.join(path, TENSORS_FILE), "rb") as f:
        head = f.read(9)
    assert head[8:9] == b"{"  # 8-byte little-endian header size, then the JSON header: not a pickle/zip


class _Payload:
    """Unpickling this creates a marker folder: proof that something unpickled the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickle_in_place_of_the_tensors_file_is_rejected_without_unpickling(seed, tmp_path, monkeypatch):
    model = trained_mlp(seed)
    path = save(model, tmp_path / "adapters")
    marker = str(tmp_path / "unpickled")
    state = adapter_state(model)
    state["payload"] = _Payload(marker)
    torch.save(state, os.path.join(path, TENSORS_FILE))

    calls = []
    real_load, real_loads = pickle.load, pickle.loads
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append("torch.load"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: (calls.append("pickle.load"), real_load(*a, **k))[1])
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: (calls.append("pickle.loads"), real_loads(*a, **k))[1])

    target = trained_mlp(seed + 1)
    before = adapter_state(target)
    with pytest.raises(ValueError, match=rf"{TENSORS_FILE} is not a valid safetensors file"):
        fk.load_adapters(target, path)
    assert not os.path.exists(marker)
    assert calls == []
    assert_same_adapters(target, before)


# ---------------------------------------------------------------------------------------------
# atomicity
# ---------------------------------------------------------------------------------------------

def test_failed_tensor_write_keeps_the_previous_save(seed, tmp_path, monkeypatch):
    first = trained_mlp(seed)
    path = save(first, tmp_path)
    second = trained_mlp(seed + 1, alpha=2.0)  # other tensors and another config

    def half_write(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(ser, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        fk.save_adapters(second, path)
    assert_only_save_files(path)

    fresh = tiny_mlp(seed)
    fk.load_adapters(fresh, path)
    assert_same_adapters(fresh, adapter_state(first))
    assert all(layer.alpha == 8.0 for _, layer in fk.flix_layers(fresh))
    assert torch.equal(outputs(fresh, seed), outputs(first, seed))


def test_failed_config_write_keeps_a_loadable_save(seed, tmp_path, monkeypatch):
    """An interrupted save (here: the JSON write fails) must leave a folder that loads, not tensors of
    the new save next to the config of the old one."""
    first = trained_mlp(seed)
    path = save(first, tmp_path)
    second = trained_mlp(seed + 1, alpha=2.0)

    def failing_dump(obj, fp, *args, **kwargs):
        fp.write("{")
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", failing_dump)  # however the config is written, its write fails
    with pytest.raises(OSError, match="disk full"):
        fk.save_adapters(second, path)
    assert_only_save_files(path)
    monkeypatch.undo()
    fresh = tiny_mlp(seed)
    fk.load_adapters(fresh, path)
    assert_same_adapters(fresh, adapter_state(first))


def test_strict_false_skips_mismatched_layers_both_ways_and_names_them(seed, tmp_path):
    saved = trained_mlp(seed, targets=["fc1", "fc2"])
    path = save(saved, tmp_path)
    model = trained_mlp(seed + 1, targets=["fc2", "fc3"])  # lacks fc1 (in the file), has fc3 (not in it)
    before = adapter_state(model)
    with pytest.raises(ValueError, match=r"layers the model lacks.*fc1.*strict=False"):
        fk.load_adapters(model, path)
    assert_same_adapters(model, before)
    with pytest.warns(UserWarning, match=r"skipped 1 saved layer.*'fc1'.*1 FLix layer.*'fc3'"):
        assert fk.load_adapters(model, path, strict=False) == ["fc2"]
    after, expected = adapter_state(model), adapter_state(saved)
    for k in after:
        assert torch.equal(after[k], expected[k] if k.startswith("fc2.") else before[k]), k


def test_strict_false_injects_only_the_saved_layers_a_fresh_model_has(seed, tmp_path):
    saved = trained_mlp(seed)  # fc1, fc2, fc3
    path = save(saved, tmp_path)
    partial = nn.Module()
    partial.fc1, partial.fc3 = nn.Linear(12, 20), nn.Linear(16, 7)
    with pytest.warns(UserWarning, match=r"skipped 1 saved layer.*'fc2'"):
        assert fk.load_adapters(partial, path, strict=False) == ["fc1", "fc3"]
    assert [n for n, _ in fk.flix_layers(partial)] == ["fc1", "fc3"]
    expected = adapter_state(saved)
    for n, layer in fk.flix_layers(partial):
        assert torch.equal(layer.lora_A, expected[f"{n}.lora_A"]) and torch.equal(layer.lora_B, expected[f"{n}.lora_B"])


def test_strict_false_with_no_matching_layer_still_raises(seed, tmp_path):
    path = save(trained_mlp(seed, targets=["fc1"]), tmp_path)
    with pytest.raises(ValueError, match=r"no layer of .* matches the model"):
        fk.load_adapters(nn.Sequential(nn.Linear(3, 3)), path, strict=False)
    other = trained_mlp(seed, targets=["fc3"])
    with pytest.raises(ValueError, match=r"no layer of .* matches the model.*FLix layers \['fc3'\]"):
        fk.load_adapters(other, path, strict=False)


@pytest.mark.parametrize("alpha", [float("nan"), 0.0, -1.0])
def test_a_saved_bad_alpha_raises_before_the_model_changes(seed, tmp_path, alpha):
    saved = trained_mlp(seed)
    dict(fk.flix_layers(saved))["fc2"].alpha = alpha  # as a file written by hand or by an older version
    path = save(saved, tmp_path)
    fresh = tiny_mlp(seed)
    with pytest.raises(ValueError, match=r"layer 'fc2': alpha must be a finite number > 0"):
        fk.load_adapters(fresh, path)
    assert not fk.flix_layers(fresh)
    model = trained_mlp(seed + 1)
    before = adapter_state(model)
    with pytest.raises(ValueError, match=r"layer 'fc2': alpha must be a finite number > 0"):
        fk.load_adapters(model, path)
    assert_same_adapters(model, before)
