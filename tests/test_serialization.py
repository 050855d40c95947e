"""save_adapters / load_adapters: round trips, every error path, no unpickling, atomic writes.

Crash safety (interrupting a save at every step, kill -9, concurrent saves) is tested in
test_serialization_crash.py."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import warnings

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
    """Edit flix_config.json alone (the human-readable copy), as by hand."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    with open(cfg_path) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def _rewrite(path, edit_config=None, edit_tensors=None, metadata=None):
    """Rewrite a save as a hand-made or corrupt file would be: the config stored in the tensors
    file edited by ``edit_config(cfg)`` (the JSON copy kept equal to it, so only the edit shows),
    the tensors by ``edit_tensors(dict)``, or the raw ``metadata`` replaced."""
    t_path = os.path.join(path, TENSORS_FILE)
    with safetensors.safe_open(t_path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["flix_config"])
    if edit_config is not None:
        edit_config(cfg)
    if edit_tensors is not None:
        edit_tensors(tensors)
    if metadata is None:
        metadata = {"flix_config": json.dumps(cfg, sort_keys=True)}
    safetensors.torch.save_file(tensors, t_path, metadata=metadata)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(cfg, f)


def save_id(path):
    with open(os.path.join(path, CONFIG_FILE)) as f:
        return json.load(f)["save_id"]


def test_load_from_missing_folder_raises(seed, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"no {TENSORS_FILE} in .*does-not-exist.*not a flix_kernels adapter folder"):
        fk.load_adapters(trained_mlp(seed), str(tmp_path / "does-not-exist"))


def test_missing_json_copy_loads_from_the_tensors_file_with_a_warning(seed, tmp_path):
    """The tensors file carries the whole config: without flix_config.json it still loads, and says so."""
    model = trained_mlp(seed, alpha=3.0, use_rslora=True)
    path = save(model, tmp_path / "a")
    os.remove(os.path.join(path, CONFIG_FILE))
    fresh = tiny_mlp(seed)
    with pytest.warns(UserWarning, match=rf"{CONFIG_FILE} is missing .*config stored in {TENSORS_FILE}"):
        assert fk.load_adapters(fresh, path) == ["fc1", "fc2", "fc3"]
    assert_same_adapters(fresh, adapter_state(model))
    assert all((l.alpha, l.use_rslora) == (3.0, True) for _, l in fk.flix_layers(fresh))


def test_load_without_tensors_file_raises(seed, tmp_path):
    model = trained_mlp(seed)
    path = save(model, tmp_path)
    os.remove(os.path.join(path, TENSORS_FILE))
    with pytest.raises(FileNotFoundError, match=rf"no {TENSORS_FILE} in .*only {CONFIG_FILE}"):
        fk.load_adapters(model, path)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2"])
def test_json_copy_that_is_not_json_warns_and_loads(seed, tmp_path, text):
    model = trained_mlp(seed)
    path = save(model, tmp_path)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        f.write(text)
    fresh = tiny_mlp(seed)
    with pytest.warns(UserWarning, match=rf"{CONFIG_FILE} .* is not the config stored in {TENSORS_FILE}.*not valid JSON"):
        fk.load_adapters(fresh, path)
    assert_same_adapters(fresh, adapter_state(model))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(format="peft"), "not a flix_kernels adapter config"),
    (lambda c: c.pop("format"), "not a flix_kernels adapter config"),
    (lambda c: c.update(format_version=99), "format_version 99"),
    (lambda c: c.update(format_version=True), "format_version True"),
    (lambda c: c.pop("layers"), "'layers'"),
    (lambda c: c.update(layers=[1]), "'layers'"),
    (lambda c: c.update(layers={}), "has no layers"),
    (lambda c: c.update(space=[1]), "'space'"),
    (lambda c: c.update(space={"groups": {"language": "en"}, "rank": 2}), r"invalid 'space'.*must be a list"),
])
def test_stored_config_with_wrong_format_raises(seed, tmp_path, edit, match):
    model = trained_mlp(seed)
    path = save(model, tmp_path)
    _rewrite(path, edit_config=edit)
    with pytest.raises(ValueError, match=match):
        fk.load_adapters(model, path)


@pytest.mark.parametrize("metadata, match", [
    ({}, "has no 'flix_config' metadata"),
    ({"flix_config": "{not json"}, "'flix_config' metadata .* is not valid JSON"),
    ({"flix_config": '["flix_kernels.adapters"]'}, "not a flix_kernels adapter config"),
])
def test_stored_config_that_is_missing_or_not_an_object_raises(seed, tmp_path, metadata, match):
    model = trained_mlp(seed)
    path = save(model, tmp_path)
    _rewrite(path, metadata=metadata)
    with pytest.raises(ValueError, match=match):
        fk.load_adapters(model, path)


@pytest.mark.parametrize("other_kw", [dict(alpha=3.0), dict(targets=["fc1", "fc2"]), dict(use_rslora=True)])
def test_json_copy_of_another_save_warns_and_the_tensors_file_wins(seed, tmp_path, other_kw):
    """A folder with the tensors file of one save and the JSON of another (a save stopped between
    its two renames) loads the tensors file's save, complete, and names both save ids."""
    model = trained_mlp(seed)
    path = save(model, tmp_path / "a")
    other_model = trained_mlp(seed + 1, **other_kw)
    other = save(other_model, tmp_path / "b")
    shutil.copy(os.path.join(other, TENSORS_FILE), os.path.join(path, TENSORS_FILE))
    target = tiny_mlp(seed)
    with pytest.warns(UserWarning, match=rf"save_id '{save_id(path)}'.*save_id '{save_id(other)}'.*using the config of {TENSORS_FILE}"):
        fk.load_adapters(target, path)
    assert_same_adapters(target, adapter_state(other_model))
    for (_, a), (_, b) in zip(fk.flix_layers(other_model), fk.flix_layers(target)):
        assert (b.alpha, b.use_rslora, b.dropout) == (a.alpha, a.use_rslora, a.dropout)


def test_edited_json_copy_is_not_used(seed, tmp_path):
    model = trained_mlp(seed)
    path = save(model, tmp_path)
    _edit_config(path, lambda c: c["layers"]["fc2"].update(alpha=1.0))
    target = trained_mlp(seed + 1)
    with pytest.warns(UserWarning, match=rf"is not the config stored in {TENSORS_FILE}"):
        fk.load_adapters(target, path)
    assert dict(fk.flix_layers(target))["fc2"].alpha == 8.0
    assert_same_adapters(target, adapter_state(model))


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


def test_two_saves_with_identical_configs_are_told_apart(seed, tmp_path):
    """Two checkpoints of one model share every hyper-parameter; a JSON copy of the other one is still
    detected (by its save id) and the tensors file's save is loaded."""
    model = trained_mlp(seed)
    first = save(model, tmp_path / "step1")
    randomize_adapters(model, torch.Generator().manual_seed(seed + 7))
    second = save(model, tmp_path / "step2")
    shutil.copy(os.path.join(second, TENSORS_FILE), os.path.join(first, TENSORS_FILE))
    target = trained_mlp(seed)
    with pytest.warns(UserWarning, match=rf"save_id '{save_id(first)}'.*save_id '{save_id(second)}'"):
        fk.load_adapters(target, first)
    assert_same_adapters(target, adapter_state(model))


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


# ---------------------------------------------------------------------------------------------
# every field and tensor checked before the model changes
# ---------------------------------------------------------------------------------------------

def model_snapshot(model):
    """Everything a failed load must leave as it was: the state dict, requires_grad flags, module
    types, and the FLix layers' hyper-parameters."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "hp": [(n, l.alpha, l.use_rslora, l.dropout, l.scaling.clone()) for n, l in fk.flix_layers(model)],
    }


def assert_unchanged(model, before):
    after = model_snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert after["state"][k].dtype == v.dtype and torch.equal(after["state"][k], v), k
    assert len(after["hp"]) == len(before["hp"])
    for a, b in zip(after["hp"], before["hp"]):
        assert a[:4] == b[:4] and torch.equal(a[4], b[4]), a[0]


def _set(layer, **kw):
    return lambda c: c["layers"][layer].update(**kw)


def _drop(layer, key):
    return lambda c: c["layers"][layer].pop(key)


def _tensor(key, fn):
    def edit(tensors):
        tensors[key] = fn(tensors[key])
    return edit


def _with_nonfinite(t, n, value):
    t = t.clone()
    t.view(-1)[:n] = value
    return t


def _add(key, value):
    return lambda tensors: tensors.__setitem__(key, value)


R = make_space().total_rank
# (config edit, tensors edit, error): each a file load_adapters must refuse, naming what is wrong.
BAD_FILES = {
    "use_rslora missing": (_drop("fc2", "use_rslora"), None, r"layer 'fc2': missing field\(s\) \['use_rslora'\]"),
    "use_rslora 'false'": (_set("fc1", use_rslora="false"), None,
                           r"layer 'fc1': use_rslora must be true or false, got 'false' \(str\)"),
    "use_rslora 0": (_set("fc3", use_rslora=0), None, r"layer 'fc3': use_rslora must be true or false, got 0 \(int\)"),
    "entry is a list": (lambda c: c["layers"].update(fc2=[12, 20]), None,
                        r"layer 'fc2': the entry must be a JSON object .*got list"),
    "entry is null": (lambda c: c["layers"].update(fc3=None), None, r"layer 'fc3': the entry must be a JSON object"),
    "in_features a string": (_set("fc1", in_features="12"), None, r"layer 'fc1': in_features must be a positive integer"),
    "out_features a bool": (_set("fc1", out_features=True), None, r"layer 'fc1': out_features must be a positive integer"),
    "in_features not the model's": (_set("fc2", in_features=21), None,
                                    r"layer 'fc2': in_features 21 does not match the model's 20"),
    "out_features not the model's": (_set("fc3", out_features=8), None,
                                     r"layer 'fc3': out_features 8 does not match the model's 7"),
    "dropout a string": (_set("fc2", dropout="0.1"), None, r"layer 'fc2': dropout must be a number in \[0, 1\)"),
    "dropout 1": (_set("fc2", dropout=1.0), None, r"layer 'fc2': dropout must be a number in \[0, 1\), got 1.0"),
    "dropout NaN": (_set("fc2", dropout=float("nan")), None, r"layer 'fc2': dropout must be a number in \[0, 1\)"),
    "dtype int32": (_set("fc1", dtype="int32"), None, r"layer 'fc1': dtype must name a floating-point torch dtype.*'int32'"),
    "dtype a number": (_set("fc1", dtype=32), None, r"layer 'fc1': dtype must name a floating-point torch dtype"),
    "dtype not a dtype": (_set("fc1", dtype="Tensor"), None, r"layer 'fc1': dtype must name a floating-point torch dtype"),
    "alpha a string": (_set("fc2", alpha="8"), None, r"layer 'fc2': alpha must be a number"),
    "alpha overflows float32": (_set("fc2", alpha=1e39), None, r"layer 'fc2': alpha=1e\+39 gives .* which overflows"),
    "NaN in lora_B": (None, _tensor("fc2.lora_B", lambda t: _with_nonfinite(t, 3, float("nan"))),
                      rf"non-finite values .*'fc2\.lora_B': 3 of {16 * R}.*allow_nonfinite=True"),
    "inf in lora_A": (None, _tensor("fc1.lora_A", lambda t: _with_nonfinite(t, 1, -float("inf"))),
                      rf"non-finite values .*'fc1\.lora_A': 1 of {R * 12}"),
    "unknown tensor": (None, _add("fc9.lora_A", torch.zeros(R, 4)),
                       r"tensors of no saved layer: \['fc9\.lora_A'\]; pass strict=False"),
    "int32 lora_A": (None, _tensor("fc1.lora_A", lambda t: t.round().to(torch.int32)),
                     r"tensor 'fc1\.lora_A' has dtype int32; adapters must be floating-point"),
    "bool lora_B": (None, _tensor("fc3.lora_B", lambda t: t > 0), r"tensor 'fc3\.lora_B' has dtype bool"),
    "wrong shape": (None, _tensor("fc3.lora_B", lambda t: t[:5]), rf"fc3\.lora_B: saved shape \(5, {R}\) does not match"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("injected", [True, False], ids=["flix-model", "plain-model"])
def test_a_bad_file_raises_and_leaves_the_model_as_it_was(seed, tmp_path, case, injected):
    edit_config, edit_tensors, match = BAD_FILES[case]
    path = save(trained_mlp(seed, alpha=4.0), tmp_path)  # fc1 (12 -> 20), fc2 (20 -> 16), fc3 (16 -> 7)
    _rewrite(path, edit_config, edit_tensors)
    model = trained_mlp(seed + 1, dropout=0.2) if injected else tiny_mlp(seed + 1)
    before = model_snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the JSON copy matches: no warning may hide the error
        with pytest.raises(ValueError, match=match):
            fk.load_adapters(model, path)
    assert_unchanged(model, before)


def test_allow_nonfinite_loads_them_with_a_warning_giving_the_counts(seed, tmp_path):
    saved = trained_mlp(seed)
    path = save(saved, tmp_path)
    _rewrite(path, edit_tensors=lambda t: t.update({
        "fc2.lora_B": _with_nonfinite(t["fc2.lora_B"], 3, float("nan")),
        "fc1.lora_A": _with_nonfinite(t["fc1.lora_A"], 2, float("inf"))}))
    model = tiny_mlp(seed)
    with pytest.warns(UserWarning, match=rf"allow_nonfinite=True.*'fc1\.lora_A': 2 of {R * 12}.*'fc2\.lora_B': 3 of {16 * R}"):
        fk.load_adapters(model, path, allow_nonfinite=True)
    layers = dict(fk.flix_layers(model))
    assert int(torch.isnan(layers["fc2"].lora_B).sum()) == 3 and int(torch.isinf(layers["fc1"].lora_A).sum()) == 2
    assert torch.equal(layers["fc3"].lora_B, dict(fk.flix_layers(saved))["fc3"].lora_B)


def test_a_cast_that_overflows_counts_as_nonfinite(seed, tmp_path):
    """float32 adapters loaded into float16 ones: a value past float16's range would become inf."""
    saved = trained_mlp(seed)
    with torch.no_grad():
        dict(fk.flix_layers(saved))["fc2"].lora_B[0, :2] = 1e6
    path = save(saved, tmp_path)
    model = tiny_mlp(seed)
    fk.inject(model, make_space(), target_modules="all-linear", adapter_dtype=torch.float16)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=rf"'fc2\.lora_B': 2 of {16 * R}, 2 of them from the cast torch.float32 -> torch.float16"):
        fk.load_adapters(model, path)
    assert_unchanged(model, before)


def test_unknown_tensor_is_skipped_with_a_warning_when_not_strict(seed, tmp_path):
    saved = trained_mlp(seed)
    path = save(saved, tmp_path)
    _rewrite(path, edit_tensors=_add("extra.weight", torch.zeros(3)))
    model = tiny_mlp(seed)
    with pytest.warns(UserWarning, match=r"strict=False.*tensors of no saved layer: \['extra\.weight'\]"):
        assert fk.load_adapters(model, path, strict=False) == ["fc1", "fc2", "fc3"]
    assert_same_adapters(model, adapter_state(saved))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_a_tensor_of_another_floating_dtype_is_cast(seed, tmp_path, dtype):
    saved = trained_mlp(seed)
    path = save(saved, tmp_path)
    _rewrite(path, edit_tensors=_tensor("fc2.lora_A", lambda t: t.to(dtype)))
    model = trained_mlp(seed + 1)
    fk.load_adapters(model, path)
    expected = adapter_state(saved)
    expected["fc2.lora_A"] = expected["fc2.lora_A"].to(dtype).float()
    assert_same_adapters(model, expected)


def test_layer_alpha_that_overflows_the_models_adapter_dtype_raises(seed, tmp_path):
    """alpha fits the saved float32 adapters but not the model's float16 ones: refused before any change."""
    saved = trained_mlp(seed, space=make_space(1))
    dict(fk.flix_layers(saved))["fc1"].alpha = 1e5  # alpha / r = 1e5 > float16's 65504
    path = save(saved, tmp_path)
    model = tiny_mlp(seed)
    fk.inject(model, make_space(1), target_modules="all-linear", adapter_dtype=torch.float16)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'fc1': alpha=100000.0 .* overflows torch.float16"):
        fk.load_adapters(model, path)
    assert_unchanged(model, before)


def test_saved_hyper_parameters_are_applied_exactly(seed, tmp_path):
    """use_rslora false stays false (a string "false" is refused above), and dropout 0 loads as 0.0."""
    saved = trained_mlp(seed, alpha=6.0, use_rslora=False, dropout=0.0)
    path = save(saved, tmp_path)
    model = trained_mlp(seed + 1, alpha=2.0, use_rslora=True, dropout=0.3)
    fk.load_adapters(model, path)
    for _, layer in fk.flix_layers(model):
        assert (layer.alpha, layer.use_rslora, layer.dropout) == (6.0, False, 0.0)
        assert type(layer.dropout) is float and type(layer.alpha) is float
    assert math.isclose(float(layer.scaling[0]), 6.0 / make_space().ranks[0])
