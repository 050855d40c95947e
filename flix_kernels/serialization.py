"""Save and load FLix adapters: safetensors for tensors, JSON for the space and hyper-parameters.

A save is a folder with ``flix_adapters.safetensors`` (keys ``<layer>.lora_A`` and
``<layer>.lora_B``) and ``flix_config.json``. The JSON is also stored in the safetensors
metadata, so a pair of files from different saves is detected. Both files are written
atomically; loading never unpickles.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings

import torch
import torch.nn as nn
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ._io import atomic_write_files, json_writer, read_json
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
        "save_id": uuid.uuid4().hex,  # pairs the two files of one save
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
        for part in ("lora_A", "lora_B"):
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
                os.makedirs(path, exist_ok=True)
                atomic_write_files({
                    os.path.join(path, TENSORS_FILE): lambda tmp: save_file(tensors, tmp, metadata=meta),
                    os.path.join(path, CONFIG_FILE): json_writer(config),
                })
            except BaseException:
                ok.zero_()
                raise
    finally:
        if sharded:  # every rank returns once rank 0 is done; all of them raise if it failed
            dist.broadcast(ok, src=0)
    if not ok.item():
        raise RuntimeError(f"rank 0 failed to write the adapters to {path!r} (see its error)")


def _read_config(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path!r}: not a flix_kernels adapter folder")
    config = read_json(cfg_path)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a flix_kernels adapter config (format={config.get('format') if isinstance(config, dict) else None!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path} has format_version {config.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    for key in ("space", "layers"):
        if not isinstance(config.get(key), dict):
            raise ValueError(f"{cfg_path} lacks a valid {key!r} entry")
    return config


def _saved_dtype(name: str, hp: dict) -> torch.dtype:
    dtype = getattr(torch, str(hp.get("dtype", "")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"layer {name!r}: saved adapter dtype {hp.get('dtype')!r} is not a floating-point dtype")
    return dtype


def load_adapters(model: nn.Module, path: str, *, strict: bool = True) -> list[str]:
    """Load adapters saved by :func:`save_adapters` into ``model``; returns the loaded layer names.

    A model without FLix layers gets them injected first (at the saved layer names, with the
    saved hyper-parameters). The FeatureSpace and every shape are checked and a mismatch
    raises ``ValueError`` naming it. With ``strict`` (default) the layer names must match both
    ways: a saved layer the model lacks (or that is not an nn.Linear / Conv1D of a fresh
    model) and a FLix layer of the model with no saved adapters are errors. With
    ``strict=False`` both are skipped, and a ``UserWarning`` names every skipped layer; a file
    of which no layer matches still raises. The saved alpha / use_rslora / dropout replace the
    layers' own.

    Distributed: every rank calls it and reads the file. Sharded parameters (FSDP2, tensor
    parallelism) receive their own shard, so it works before or after sharding; injecting FLix
    layers from the file (a model without them) must happen before sharding.
    """
    config = _read_config(path)
    space = FeatureSpace.from_dict(config["space"])
    t_path = os.path.join(path, TENSORS_FILE)
    if not os.path.isfile(t_path):
        raise FileNotFoundError(f"no {TENSORS_FILE} in {path!r}")
    saved = config["layers"]
    layers = dict(flix_layers(model))
    merged = [n for n, layer in layers.items() if layer.merged is not None]
    if merged:
        raise RuntimeError(f"layers {merged[:5]} are merged; call flix_kernels.unmerge(model) before load_adapters")
    fresh = not layers
    linears = dict(_candidate_linears(model)) if fresh else {}
    targets = linears if fresh else layers
    missing = [n for n in saved if n not in targets]  # in the file, not in the model
    extra = [] if fresh else [n for n in layers if n not in saved]  # in the model, not in the file
    if strict and missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        if fresh:
            msg = f"saved layers {missing[:5]}{more} are not nn.Linear (or Conv1D) modules of {type(model).__name__}"
        else:
            msg = f"the file has adapters for layers the model lacks (or that are not FLix layers): {missing[:5]}{more}"
        raise ValueError(msg + "; pass strict=False to skip them")
    if strict and extra:
        raise ValueError(f"the model's FLix layers {extra[:5]} have no adapters in {path!r} (pass strict=False to skip them)")
    saved = {n: hp for n, hp in saved.items() if n in targets}
    if not saved:
        raise ValueError(f"no layer of {path!r} matches the model: the file has {sorted(config['layers'])[:5]}, the model "
                         + (f"{type(model).__name__} has linear modules {sorted(linears)[:5]}" if fresh
                            else f"has FLix layers {sorted(layers)[:5]}"))
    skipped = ([f"{len(missing)} saved layer(s) the model lacks {missing[:10]}"] if missing else []) + (
        [f"{len(extra)} FLix layer(s) of the model with no saved adapters {extra[:10]} (left as they were)"] if extra else [])
    if skipped:
        warnings.warn("load_adapters(strict=False) skipped " + " and ".join(skipped), stacklevel=2)
    for name, hp in saved.items():  # hyper-parameters checked before anything changes
        try:
            check_alpha(hp.get("alpha"))
            if not (isinstance(hp.get("dropout"), (int, float)) and 0.0 <= float(hp["dropout"]) < 1.0):
                raise ValueError(f"dropout must be in [0, 1), got {hp.get('dropout')!r}")
        except (TypeError, ValueError) as e:
            raise ValueError(f"{CONFIG_FILE} in {path!r}, layer {name!r}: {e}") from None
    if fresh:
        # Shapes the layers will have once injected; nothing is replaced until all checks pass.
        in_out = {n: linear_in_out(linears[n]) for n in saved}
        shapes = {n: {"lora_A": (space.total_rank, in_out[n][0]),
                      "lora_B": (in_out[n][1], space.total_rank)} for n in saved}
        dtypes = {n: _saved_dtype(n, hp) for n, hp in saved.items()}
    else:
        for name in saved:
            if layers[name].space != space:
                raise ValueError(f"layer {name!r}: the saved FeatureSpace differs from the layer's: "
                                 + space.describe_difference(layers[name].space))
        shapes = {n: {p: tuple(getattr(layers[n], p).shape) for p in ("lora_A", "lora_B")} for n in saved}
    try:
        f = safe_open(t_path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{t_path} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    with f:
        meta = (f.metadata() or {}).get("flix_config")
        if meta is None or json.loads(meta) != json.loads(json.dumps(config, sort_keys=True)):
            raise ValueError(f"{TENSORS_FILE} and {CONFIG_FILE} in {path!r} come from different saves")
        keys = set(f.keys())
        for name in saved:
            for part in ("lora_A", "lora_B"):
                key = f"{name}.{part}"
                if key not in keys:
                    raise ValueError(f"{TENSORS_FILE} lacks tensor {key!r}")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != shapes[name][part]:
                    raise ValueError(f"{key}: saved shape {shape} does not match the model's {shapes[name][part]}")
        if fresh:
            wrapped = {id(linears[n]): FLixLinear.from_linear(linears[n], space, adapter_dtype=dtypes[n]) for n in saved}
            # Every occurrence of a shared Linear gets the same FLix layer, as inject does.
            for n, lin in _candidate_linears(model):
                if id(lin) in wrapped:
                    _replace(model, n, wrapped[id(lin)])
            for p in model.parameters():
                p.requires_grad_(False)
            layers = dict(flix_layers(model))
        with torch.no_grad():
            for name, hp in saved.items():
                layer = layers[name]
                for part in ("lora_A", "lora_B"):
                    param = getattr(layer, part)
                    full = f.get_tensor(f"{name}.{part}").to(device=param.device, dtype=param.dtype)
                    if is_dtensor(param):  # sharded: every rank read the file and keeps its own shard
                        full = _distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                    param.copy_(full)
                layer.set_scaling(hp["alpha"], hp["use_rslora"])
                layer.dropout = float(hp["dropout"])
                layer.lora_A.requires_grad_(True)
                layer.lora_B.requires_grad_(True)
    return list(saved)
