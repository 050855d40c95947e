"""Quantized frozen base layers (QLoRA-style): which ones FLix wraps, and what it cannot do on them.

A FLix layer over a quantized base keeps the base module as it is and calls its own forward
for ``W x + b``; only the low-rank update runs through our ops, in the adapters' dtype. Known:

* bitsandbytes ``Linear4bit`` (NF4 and FP4, with or without double quantization) and
  ``Linear8bitLt`` (int8 weights); adapters default to float32, PEFT's default over them;
* linears whose weight is a torchao quantized tensor (``quantize_`` with
  ``Int8WeightOnlyConfig``, ``Int4WeightOnlyConfig``, ``IntxWeightOnlyConfig``, ...);
  adapters default to the weight's (compute) dtype, as for a plain linear.

Nothing here imports either library: a model holding such a layer has imported it already.
:func:`require` imports one for code that needs it, with an error naming the extra.
"""

from __future__ import annotations

import importlib
import sys

import torch
import torch.nn as nn

__all__ = ["default_adapter_dtype", "is_bitsandbytes", "merge_error", "quantized_kind", "require"]

_EXTRA = "pip install 'flix_kernels[quant]'"


def require(package: str):
    """Import ``package`` (bitsandbytes or torchao); an ImportError naming the extra otherwise."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"{package} is needed for quantized base layers and could not be imported ({e}); "
                          f"install it with {_EXTRA} (or pip install {package})") from e


def _bnb_class(name: str):
    modules = sys.modules.get("bitsandbytes.nn")
    return getattr(modules, name, None) if modules is not None else None


def quantized_kind(base: nn.Module) -> str | None:
    """A short description of ``base``'s quantization ("bitsandbytes Linear4bit (nf4)",
    "torchao Int8Tensor", ...), or None for a layer with a plain floating-point weight."""
    for name in ("Linear4bit", "Linear8bitLt"):
        cls = _bnb_class(name)
        if cls is not None and isinstance(base, cls):
            qtype = getattr(getattr(base, "weight", None), "quant_type", None)
            return f"bitsandbytes {name}" + (f" ({qtype})" if name == "Linear4bit" and qtype else "")
    w = getattr(base, "weight", None)
    if isinstance(w, torch.Tensor) and type(w) not in (torch.Tensor, nn.Parameter):
        return f"{type(w).__module__.split('.')[0]} {type(w).__name__}"
    if isinstance(w, torch.Tensor) and not w.is_floating_point():
        return f"{w.dtype} weight"
    return None


def is_bitsandbytes(kind: str | None) -> bool:
    return kind is not None and kind.startswith("bitsandbytes ")


def default_adapter_dtype(base: nn.Module, kind: str | None) -> torch.dtype:
    """The adapters' dtype when the caller names none: the weight's for a plain or torchao base
    (a torchao tensor reports its compute dtype), float32 over bitsandbytes' integer storage."""
    w = base.weight
    if is_bitsandbytes(kind) or not w.dtype.is_floating_point:
        return torch.float32
    return w.dtype


def merge_error(kind: str, what: str) -> RuntimeError:
    return RuntimeError(
        f"{what} onto a quantized base layer ({kind}) is refused: folding the update into quantized weights "
        "means dequantize, add, requantize, which rounds the result to the quantization grid again, so the merged "
        "model would not compute what the FLix model computes. Run the model unmerged (a fixed feature set costs "
        "one low-rank update per layer), or load the base unquantized, flix_kernels.load_adapters onto it, "
        "merge_and_unload, then quantize the merged model")
