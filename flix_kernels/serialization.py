"""Save and load FLix adapters: safetensors for tensors, JSON for the space and hyper-parameters.

A save is a folder with ``flix_adapters.safetensors`` (keys ``<layer>.lora_A`` and
``<layer>.lora_B``, and the whole config in its metadata under ``"flix_config"``) and
``flix_config.json``, a human-readable copy of that config. The tensors file is the save's
single commit point: it is self-contained, so it is what loading reads, and renaming it into
place is what makes a save happen (see :func:`flix_kernels._io.commit_staged`). Loading
never unpickles, and checks the whole file before it changes the model.
"""

from __future__ import annotations

import json
import numbers
import os
import uuid
import warnings

import torch
import torch.nn as nn
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ._io import commit_staged, json_writer, read_json
from .features import FeatureSpace
from .distributed import distribute_tensor as _distribute_tensor
from .distributed import is_dtensor
from .model import _candidate_linears, _replace, flix_layers
from .nn import FLixLinear, check_alpha, linear_in_out

__all__ = ["save_adapters", "load_adapters", "TENSORS_FILE", "CONFIG_FILE"]

TENSORS_FILE = "flix_adapters.safetensors"
CONFIG_FILE = "flix_config.json"
FORMAT = "flix_kernels.adapters"
FORMAT_VERSION = 1
# A save stages its files in <path>/.flix_save-<uuid>/ (removed by the next save if it crashed).
STAGING_PREFIX = ".flix_save-"
_PARTS = ("lora_A", "lora_B")


def _config(layers: list[tuple[str, FLixLinear]]) -> dict:
    from . import __version__

    space = layers[0][1].space
    for name, layer in layers:
        if layer.space != space:
            raise ValueError(f"FLix layers use different FeatureSpaces ({name!r}: {layer.space.describe_difference(space)}); "
                             "save_adapters expects one space per model")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "flix_kernels_version": __version__,
        "save_id": uuid.uuid4().hex,  # tells this save apart (a stale JSON copy beside it is detected)
        "space": space.to_dict(),
        "layers": {
            name: {"in_features": l.in_features, "out_features": l.out_features, "alpha": l.alpha,
                   "use_rslora": l.use_rslora, "dropout": l.dropout, "dtype": str(l.lora_A.dtype).replace("torch.", "")}
            for name, l in layers
        },
    }


def _writer_rank() -> bool:
    """Whether this process writes: rank 0 of the default group, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_adapters(model: nn.Module, path: str) -> None:
    """Write every FLix layer's adapters of ``model`` to the folder ``path``.

    Crash safety: whatever stops a save (an exception, Ctrl-C, kill -9, a power cut), ``path``
    loads afterwards as exactly the previous adapters or exactly the new ones, never a mix. Both
    files are written and fsynced in a private staging folder ``path/.flix_save-<id>/`` first;
    renaming the tensors file (which carries the whole config) into place is the commit, the JSON
    copy follows. If the save stops between the two renames, :func:`load_adapters` loads the new
    adapters and warns that ``flix_config.json`` is stale. A staging folder left by an interrupted
    save is ignored by loading and removed by the next save into ``path`` (never one that a save
    still running holds).

    Distributed: with sharded parameters (FSDP2 ``fully_shard``, tensor parallelism: DTensors)
    every rank must call it, since the full tensors are gathered; then rank 0 alone writes, every
    rank returns once it is done, and if its write failed every rank raises. With plain
    (replicated) parameters, e.g. DDP, rank 0 alone may call it; if every rank calls it, rank 0
    alone writes."""
    layers = flix_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no FLix layers to save")
    config = _config(layers)
    tensors = {}
    sharded, device = False, layers[0][1].lora_A.device
    writer = _writer_rank()
    for name, layer in layers:
        for part in _PARTS:
            t = getattr(layer, part).detach()
            if is_dtensor(t):
                t, sharded = t.full_tensor(), True  # a collective: every rank takes part
            if writer:
                tensors[f"{name}.{part}"] = t.cpu().contiguous()
    ok = torch.ones(1, dtype=torch.int32, device=device)
    try:
        if writer:
            meta = {"flix_config": json.dumps(config, sort_keys=True)}
            try:
                # The tensors file first: renaming it into place is the commit.
                commit_staged(path, {
                    TENSORS_FILE: lambda tmp: save_file(tensors, tmp, metadata=meta),
                    CONFIG_FILE: json_writer(config),
                }, prefix=STAGING_PREFIX)
            except BaseException:
                ok.zero_()
                raise
    finally:
        if sharded:  # every rank returns once rank 0 is done; all of them raise if it failed
            dist.broadcast(ok, src=0)
    if not ok.item():
        raise RuntimeError(f"rank 0 failed to write the adapters to {path!r} (see its error)")


# -- loading: everything is read and checked before the model changes -------------------------------

def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True)  # NaN compares equal to NaN here, unlike in ==


def _config_from_tensors(t_path: str, metadata: dict) -> dict:
    """The config stored in the tensors file's metadata, its top-level shape checked."""
    raw = metadata.get("flix_config")
    if raw is None:
        raise ValueError(f"{t_path} has no 'flix_config' metadata: it was not written by flix_kernels.save_adapters")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"the 'flix_config' metadata of {t_path} is not valid JSON: {e}") from None
    where = f"the config stored in {t_path}"
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{where} is not a flix_kernels adapter config "
                         f"(format={config.get('format') if isinstance(config, dict) else None!r})")
    version = config.get("format_version")
    if isinstance(version, bool) or version != FORMAT_VERSION:  # True == 1 in Python
        raise ValueError(f"{where} has format_version {version!r}; this version reads {FORMAT_VERSION}")
    for key in ("space", "layers"):
        if not isinstance(config.get(key), dict):
            raise ValueError(f"{where} lacks a valid {key!r} entry (a JSON object), got {config.get(key)!r:.80}")
    if not config["layers"]:
        raise ValueError(f"{where} has no layers")
    return config


def _check_json_copy(path: str, config: dict) -> None:
    """Warn (once) when flix_config.json is missing or is not the tensors file's config."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    tensors_id = config.get("save_id")
    if not os.path.isfile(cfg_path):
        warnings.warn(f"{CONFIG_FILE} is missing from {path!r}; loading with the config stored in {TENSORS_FILE} "
                      f"(save_id {tensors_id!r})", stacklevel=3)
        return
    problem = ""
    try:
        copy = read_json(cfg_path)
    except (OSError, ValueError) as e:
        copy, problem = None, f" ({e})"
    if not problem and _canonical(copy) == _canonical(config):
        return
    copy_id = copy.get("save_id") if isinstance(copy, dict) else None
    warnings.warn(f"{CONFIG_FILE} in {path!r} (save_id {copy_id!r}) is not the config stored in {TENSORS_FILE} "
                  f"(save_id {tensors_id!r}){problem}, as an interrupted save or a hand edit leaves it; "
                  f"using the config of {TENSORS_FILE}", stacklevel=3)


_FIELDS = ("in_features", "out_features", "alpha", "use_rslora", "dropout", "dtype")


def _layer_entry(where: str, name: str, hp, space: FeatureSpace) -> dict:
    """One layer's saved hyper-parameters, every type and value checked; a ValueError names the
    layer and the field."""
    def bad(msg: str) -> ValueError:
        return ValueError(f"{where}, layer {name!r}: {msg}")

    if not isinstance(hp, dict):
        raise bad(f"the entry must be a JSON object of hyper-parameters, got {type(hp).__name__} {hp!r:.80}")
    missing = [k for k in _FIELDS if k not in hp]
    if missing:
        raise bad(f"missing field(s) {missing}")
    for key in ("in_features", "out_features"):
        v = hp[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise bad(f"{key} must be a positive integer, got {v!r} ({type(v).__name__})")
    if not isinstance(hp["use_rslora"], bool):  # "false" is a truthy string
        raise bad(f"use_rslora must be true or false, got {hp['use_rslora']!r} ({type(hp['use_rslora']).__name__})")
    d = hp["dropout"]
    if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0.0 <= float(d) < 1.0:  # NaN fails too
        raise bad(f"dropout must be a number in [0, 1), got {d!r}")
    dtype = getattr(torch, hp["dtype"], None) if isinstance(hp["dtype"], str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise bad(f"dtype must name a floating-point torch dtype (e.g. 'float32'), got {hp['dtype']!r}")
    try:
        alpha = check_alpha(hp["alpha"], space.ranks, hp["use_rslora"], dtype)
    except (TypeError, ValueError) as e:
        raise bad(str(e)) from None
    return {"in_features": hp["in_features"], "out_features": hp["out_features"], "alpha": alpha,
            "use_rslora": hp["use_rslora"], "dropout": float(d), "dtype": dtype}


def _nonfinite(t: torch.Tensor) -> int:
    if t.dtype.itemsize < 2:  # float8: isfinite is not implemented for it everywhere
        t = t.float()
    return int(t.numel() - torch.isfinite(t).sum().item())


def _read_tensors(f, t_path: str, config: dict, load: dict, targets: dict, strict: bool,
                  allow_nonfinite: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the ``load``ed layers read, checked (present, floating-point, shape,
    finite) and cast to its target ``(shape, device, dtype)``; nothing of the model changes."""
    keys = set(f.keys())
    unknown = sorted(keys - {f"{n}.{p}" for n in config["layers"] for p in _PARTS})
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        msg = f"{t_path} has tensors of no saved layer: {unknown[:5]}{more}"
        if strict:
            raise ValueError(msg + "; pass strict=False to ignore them")
        warnings.warn(f"load_adapters(strict=False) ignores them: {msg}", stacklevel=3)
    out, nonfinite = {}, []
    for name in load:
        for part in _PARTS:
            key = f"{name}.{part}"
            shape, device, dtype = targets[key]
            if key not in keys:
                raise ValueError(f"{TENSORS_FILE} lacks tensor {key!r}")
            saved_shape = tuple(f.get_slice(key).get_shape())
            if saved_shape != shape:
                raise ValueError(f"{key}: saved shape {saved_shape} does not match the model's {shape}")
            try:
                t = f.get_tensor(key)
            except Exception as e:  # a dtype torch cannot hold, a truncated file
                raise ValueError(f"{t_path}: tensor {key!r} cannot be read ({type(e).__name__}: {e})") from None
            if not t.dtype.is_floating_point:
                raise ValueError(f"{t_path}: tensor {key!r} has dtype {str(t.dtype).replace('torch.', '')}; "
                                 "adapters must be floating-point")
            cast = t.to(dtype=dtype)  # a float64 -> float16 cast can overflow: checked after it
            n_cast = _nonfinite(cast)
            if n_cast:
                n_saved = _nonfinite(t) if cast is not t else n_cast
                why = "" if n_cast == n_saved else f", {n_cast - n_saved} of them from the cast {t.dtype} -> {dtype}"
                nonfinite.append(f"{key!r}: {n_cast} of {t.numel()}{why}")
            out[key] = cast.to(device=device)
    if nonfinite:
        listed = "; ".join(nonfinite)
        if not allow_nonfinite:
            raise ValueError(f"{t_path}: tensors with non-finite values (NaN or inf): {listed}. Pass "
                             "allow_nonfinite=True to load them anyway")
        warnings.warn(f"load_adapters(allow_nonfinite=True) loads non-finite values (NaN or inf) from {t_path}: {listed}",
                      stacklevel=3)
    return out


def load_adapters(model: nn.Module, path: str, *, strict: bool = True, allow_nonfinite: bool = False) -> list[str]:
    """Load adapters saved by :func:`save_adapters` into ``model``; returns the loaded layer names.

    A model without FLix layers gets them injected first (at the saved layer names, with the
    saved hyper-parameters). The FeatureSpace and every shape are checked and a mismatch
    raises ``ValueError`` naming it. With ``strict`` (default) the layer names must match both
    ways: a saved layer the model lacks (or that is not an nn.Linear / Conv1D of a fresh
    model), a FLix layer of the model with no saved adapters, and a tensor in the file that
    belongs to no saved layer are errors. With ``strict=False`` they are skipped, and a
    ``UserWarning`` names each; a file of which no layer matches still raises. The saved
    alpha / use_rslora / dropout replace the layers' own.

    Everything is read and checked before the model changes: every field of the config (types
    and values), every tensor (present, shape, a floating-point dtype, finite values); a failed
    load leaves the model as it was. Non-finite values (NaN, inf) raise ``ValueError`` unless
    ``allow_nonfinite=True``, which loads them with a warning giving their counts.

    The config is read from the tensors file (its metadata), the save's commit point: a folder
    left by a save interrupted at any moment loads as the previous or the new adapters, complete.
    A ``flix_config.json`` that is missing or differs (a save stopped between its two renames,
    a hand edit) gives a warning naming both save ids, and the tensors file's config is used.
    Staging folders ``.flix_save-*`` of interrupted saves are ignored.

    Distributed: every rank calls it and reads the file. Sharded parameters (FSDP2, tensor
    parallelism) receive their own shard, so it works before or after sharding; injecting FLix
    layers from the file (a model without them) must happen before sharding.
    """
    t_path = os.path.join(path, TENSORS_FILE)
    if not os.path.isfile(t_path):
        if os.path.isfile(os.path.join(path, CONFIG_FILE)):
            raise FileNotFoundError(f"no {TENSORS_FILE} in {path!r}: the folder has only {CONFIG_FILE}, not the adapters")
        raise FileNotFoundError(f"no {TENSORS_FILE} in {path!r}: not a flix_kernels adapter folder")
    layers = dict(flix_layers(model))
    merged = [n for n, layer in layers.items() if layer.merged is not None]
    if merged:
        raise RuntimeError(f"layers {merged[:5]} are merged; call flix_kernels.unmerge(model) before load_adapters")
    try:
        f = safe_open(t_path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{t_path} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    with f:
        config = _config_from_tensors(t_path, f.metadata() or {})
        _check_json_copy(path, config)
        where = f"the config stored in {t_path}"
        try:
            space = FeatureSpace.from_dict(config["space"])
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{where}: invalid 'space' entry: {e}") from None
        entries = {n: _layer_entry(where, n, hp, space) for n, hp in config["layers"].items()}

        fresh = not layers
        linears = dict(_candidate_linears(model)) if fresh else {}
        targets = linears if fresh else layers
        missing = [n for n in entries if n not in targets]  # in the file, not in the model
        extra = [] if fresh else [n for n in layers if n not in entries]  # in the model, not in the file
        if strict and missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            if fresh:
                msg = f"saved layers {missing[:5]}{more} are not nn.Linear (or Conv1D) modules of {type(model).__name__}"
            else:
                msg = f"the file has adapters for layers the model lacks (or that are not FLix layers): {missing[:5]}{more}"
            raise ValueError(msg + "; pass strict=False to skip them")
        if strict and extra:
            raise ValueError(f"the model's FLix layers {extra[:5]} have no adapters in {path!r} (pass strict=False to skip them)")
        # In the model's order (the stored config's keys are sorted).
        load = {n: entries[n] for n in targets if n in entries}
        if not load:
            raise ValueError(f"no layer of {path!r} matches the model: the file has {sorted(entries)[:5]}, the model "
                             + (f"{type(model).__name__} has linear modules {sorted(linears)[:5]}" if fresh
                                else f"has FLix layers {sorted(layers)[:5]}"))
        skipped = ([f"{len(missing)} saved layer(s) the model lacks {missing[:10]}"] if missing else []) + (
            [f"{len(extra)} FLix layer(s) of the model with no saved adapters {extra[:10]} (left as they were)"] if extra else [])
        if skipped:
            warnings.warn("load_adapters(strict=False) skipped " + " and ".join(skipped), stacklevel=2)

        # (shape, device, dtype) each tensor takes in the model; and the layers' own checks.
        tensor_targets = {}
        for name, e in load.items():
            if fresh:
                lin = linears[name]
                n_in, n_out = linear_in_out(lin)
                device, dtypes = lin.weight.device, {p: e["dtype"] for p in _PARTS}
            else:
                layer = layers[name]
                if layer.space != space:
                    raise ValueError(f"layer {name!r}: the saved FeatureSpace differs from the layer's: "
                                     + space.describe_difference(layer.space))
                n_in, n_out = layer.in_features, layer.out_features
                device, dtypes = layer.lora_A.device, {p: getattr(layer, p).dtype for p in _PARTS}
                try:  # the scale must also fit the layer's own adapter dtype
                    check_alpha(e["alpha"], space.ranks, e["use_rslora"], layer.lora_A.dtype)
                except ValueError as err:
                    raise ValueError(f"{where}, layer {name!r}: {err}") from None
            tensor_targets[f"{name}.lora_A"] = ((space.total_rank, n_in), device, dtypes["lora_A"])
            tensor_targets[f"{name}.lora_B"] = ((n_out, space.total_rank), device, dtypes["lora_B"])
        values = _read_tensors(f, t_path, config, load, tensor_targets, strict, allow_nonfinite)
        for name, e in load.items():  # the tensors match the model, so a mismatch here is the config's
            n_in, n_out = linear_in_out(linears[name]) if fresh else (layers[name].in_features, layers[name].out_features)
            for key, model_value in (("in_features", n_in), ("out_features", n_out)):
                if e[key] != model_value:
                    raise ValueError(f"{where}, layer {name!r}: {key} {e[key]} does not match the model's "
                                     f"{model_value} (nor the saved tensors)")

    # Every check passed: from here on the model changes.
    if fresh:
        _inject_loaded(model, space, linears, load, values)
    else:
        shards = {}
        for name in load:  # sharded: every rank read the file and keeps its own shard
            for part in _PARTS:
                param = getattr(layers[name], part)
                full = values[f"{name}.{part}"]
                shards[(name, part)] = (_distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                                        if is_dtensor(param) else full)
        with torch.no_grad():
            for name, e in load.items():
                layer = layers[name]
                for part in _PARTS:
                    getattr(layer, part).copy_(shards[(name, part)])
                layer.set_scaling(e["alpha"], e["use_rslora"])
                layer.dropout = e["dropout"]
                layer.lora_A.requires_grad_(True)
                layer.lora_B.requires_grad_(True)
    return list(load)


def _inject_loaded(model: nn.Module, space: FeatureSpace, linears: dict, load: dict, values: dict) -> None:
    """Wrap the loaded layers of a model without FLix layers, as inject does, holding ``values``."""
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:  # building a FLix layer freezes its base: undone if anything fails before the swap
        wrapped: dict[int, FLixLinear] = {}  # a Linear shared by several names gets one FLix layer
        for name, e in load.items():
            lin = linears[name]
            if id(lin) not in wrapped:
                wrapped[id(lin)] = FLixLinear.from_linear(lin, space, alpha=e["alpha"], dropout=e["dropout"],
                                                          use_rslora=e["use_rslora"], adapter_dtype=e["dtype"])
            with torch.no_grad():
                for part in _PARTS:
                    getattr(wrapped[id(lin)], part).copy_(values[f"{name}.{part}"])
    except BaseException:
        for p, g in grads:
            p.requires_grad_(g)
        raise
    # Every occurrence of a shared Linear gets the same FLix layer, as inject does.
    for n, lin in _candidate_linears(model):
        if id(lin) in wrapped:
            _replace(model, n, wrapped[id(lin)])
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in wrapped.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
