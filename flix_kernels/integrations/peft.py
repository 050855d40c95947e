"""Export a FLix feature set as a standard PEFT LoRA adapter.

The export of feature set S is one LoRA of rank ``r = sum_{k in S} r_k`` per layer:
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

__all__ = ["export_peft"]


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
        "fan_in_fan_out": False,
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
