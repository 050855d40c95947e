"""Backend registry: which implementations of the FLix ops exist and which can run here.

A backend module exposes ``delta(x, lora_A, lora_B, routing, scaling, dropout_p, generator)``
and ``linear(x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, generator)``, with
inputs already validated by :mod:`flix_kernels.ops`.

"auto" picks, for the input's device, dtypes and shape class, the first available backend of
:data:`AUTO_TABLE` on CUDA, then "torch". The Triton interpreter (``TRITON_INTERPRET=1``) makes
"triton" available on CPU tensors for testing, but "auto" keeps "torch" there.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import cuda_backend, torch_backend, triton_backend
from .kernel_ops import DECODE_TOKENS

__all__ = ["AUTO_TABLE", "BACKENDS", "BackendUnavailableError", "available_backends", "get_backend", "unavailable_reason"]

BACKENDS = ("torch", "triton", "cuda")
# Imported up front (not on first use) so that torch.compile can trace a dispatch.
_MODULES: dict[str, ModuleType] = {"torch": torch_backend, "triton": triton_backend, "cuda": cuda_backend}

# "auto" on a CUDA device: the backends to try, in order, per shape class ("decode": at most
# DECODE_TOKENS tokens; "prefill"), as measured by `flix-kernels bench` (benchmarks/results/h100,
# h200: summary.measured_auto_order). On both GPUs the vectorised torch backend was fastest in
# eager forward+backward at the headline shape and in eager decode, so it comes first; Triton
# next (fastest forward at the headline, close under CUDA graphs), then CUDA.
AUTO_TABLE: dict[str, tuple[str, ...]] = {"decode": ("torch", "triton", "cuda"), "prefill": ("torch", "triton", "cuda")}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, no GPU, or not implemented yet)."""


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None when it can)."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {list(BACKENDS)} or 'auto'"
    if name == "torch":
        return None
    return _MODULES[name].unavailable_reason(device)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: the current CUDA device if any, else CPU)."""
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


def shape_class(x: torch.Tensor | None) -> str:
    """The shape class of input ``x``, the key of :data:`AUTO_TABLE`: "decode" for at most
    DECODE_TOKENS tokens, else "prefill"."""
    if x is None or x.dim() == 0:
        return "prefill"
    tokens = 1
    for n in x.shape[:-1]:
        tokens *= n
    return "decode" if tokens <= DECODE_TOKENS else "prefill"


def _auto(device: torch.device, x: torch.Tensor | None, lora_A: torch.Tensor | None) -> str:
    if device.type == "cuda":
        for name in AUTO_TABLE[shape_class(x)]:
            if unavailable_reason(name, device) is None and (x is None or _MODULES[name].supports(x, lora_A) is None):
                return name
    return "torch"


def get_backend(name: str, device: torch.device, x: torch.Tensor | None = None,
                lora_A: torch.Tensor | None = None) -> ModuleType:
    """The module implementing backend ``name`` ("auto": the fastest one for these inputs)."""
    if name == "auto":
        name = _auto(device, x, lora_A)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    return _MODULES[name]
