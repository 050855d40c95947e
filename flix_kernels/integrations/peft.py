"""PEFT interoperability: export a feature set, import adapters, FLix layers inside PEFT.

* :func:`export_peft`: one FLix feature set as a standard PEFT LoRA adapter (below).
* :func:`from_peft_adapters` (``peft_import.py``): PEFT LoRA adapters as FLix features.
* :func:`flix_lora_config` / :func:`load_flix_peft` (``peft_layer.py``, needs PEFT):
  ``get_peft_model`` with FLix layers, saved and loaded through PEFT.

Export: the export of feature set S is one LoRA of rank ``r = sum_{k in S} r_k`` per layer:
``lora_A = cat_k A_k`` (r, in) and ``lora_B = cat_k s_k B_k`` (out, r), with
``lora_alpha = r`` so PEFT's own scale ``lora_alpha / r`` is 1. PEFT computes
``B (A x) = sum_k s_k B_k A_k x``, the FLix update of S. Needs no PEFT at export time.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .._io import atomic_write_files, json_writer
from ..model import _require_layers
from .peft_import import from_peft_adapters

__all__ = ["export_peft", "flix_lora_config", "from_peft_adapters", "load_flix_peft"]


def export_peft(model: nn.Module, features: Mapping[str, str], out_dir: str) -> str:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for ``features`` to ``out_dir``.

    Load it with ``peft.PeftModel.from_pretrained(base_model, out_dir)`` where ``base_model``
    is the model before :func:`~flix_kernels.inject`. Returns ``out_dir``.
    """
    layers = _require_layers(model)
    space = layers[0][1].space
    ids = space.feature_ids(features)
    if not ids:
        raise ValueError("export_peft needs at least one feature, e.g. {'language': 'fr'}")
    rank = sum(space.ranks[k] for k in ids)
    tensors = {}
    for name, layer in layers:
        if layer.space != space:
            raise ValueError(f"layer {name!r} uses a different FeatureSpace: {layer.space.describe_difference(space)}")
        rows, owners = (t.to(layer.lora_A.device) for t in space.rank_rows(ids))
        # Fold the scales in at least float32 and store at least float32, so that a bf16/fp16
        # adapter exports exactly (PEFT casts to its own adapter dtype on load).
        dt = torch.promote_types(layer.lora_B.dtype, torch.float32)
        with torch.no_grad():
            scale = layer.scaling.to(dt)[owners]
            tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[rows].to(dt).cpu().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = (layer.lora_B[:, rows].to(dt) * scale).cpu().contiguous()
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": name_or_path,
        "r": rank,
        "lora_alpha": rank,
        "target_modules": sorted(n for n, _ in layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),  # GPT-2 Conv1D
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    meta = {"format": "pt", "flix_features": json.dumps(dict(features), sort_keys=True)}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_files({
        os.path.join(out_dir, "adapter_model.safetensors"): lambda tmp: save_file(tensors, tmp, metadata=meta),
        os.path.join(out_dir, "adapter_config.json"): json_writer(config),
    })
    return out_dir


def flix_lora_config(space, *, target_modules, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                     use_rslora: bool = False, **lora_kwargs):
    """A PEFT ``LoraConfig`` (:class:`~flix_kernels.integrations.peft_layer.FLixLoraConfig`) whose
    targeted linear layers become FLix layers of ``space``.

    ``peft.get_peft_model(model, config)`` then gives a PeftModel whose adapted layers are
    :class:`~flix_kernels.FLixLinear` (``FLixLoraLinear``): route it with
    ``flix_kernels.set_routing`` / ``use_routing``, train it, ``save_pretrained`` it (the space
    is saved in ``adapter_config.json``) and load it with :func:`load_flix_peft`.
    ``lora_alpha`` is the FLix alpha (feature k scaled by ``alpha / r_k``, or ``/ sqrt(r_k)``
    with ``use_rslora``); other ``LoraConfig`` arguments (``task_type``, ``alpha_pattern``,
    ``exclude_modules``, ``layers_to_transform``, ``init_lora_weights`` True/False/"gaussian")
    pass through; options FLix layers lack (DoRA, ``rank_pattern``, ``bias``, ...) raise
    ``NotImplementedError``. Needs PEFT; see ``peft_layer.py`` for what PEFT supports here.
    """
    from .peft_layer import flix_lora_config as build

    return build(space, target_modules=target_modules, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                 use_rslora=use_rslora, **lora_kwargs)


def load_flix_peft(base_model: nn.Module, path: str, *, adapter_name: str = "default", is_trainable: bool = False,
                   **kwargs):
    """``PeftModel.from_pretrained`` for a FLix adapter saved by a PeftModel's ``save_pretrained``.

    Rebuilds the :class:`~flix_kernels.integrations.peft_layer.FLixLoraConfig` from the folder
    (PEFT does not save the custom-layer registration, and without it would build plain LoRA
    layers) and checks that every FLix layer found its tensors (PEFT's own check skips keys
    without the adapter name, such as ours). ``is_trainable=False`` freezes the adapters, as
    in PEFT; ``kwargs`` go to ``PeftModel.from_pretrained``. Needs PEFT.
    """
    from .peft_layer import load_flix_peft as load

    return load(base_model, path, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
