"""Backend registry: which implementations of the FLix ops exist and which can run here.

A backend module exposes ``delta(x, lora_A, lora_B, routing, scaling, dropout_p, generator)``
and ``linear(x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, generator)``, with
inputs already validated by :mod:`flix_kernels.ops`.

"auto" picks, for the input's device and dtypes, the first available of: "triton" on CUDA
(float32/float16/bfloat16), then "torch". The Triton interpreter (``TRITON_INTERPRET=1``) makes
"triton" available on CPU tensors for testing, but "auto" keeps "torch" there.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import torch_backend, triton_backend

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "get_backend", "unavailable_reason"]

BACKENDS = ("torch", "triton", "cuda")
# Imported up front (not on first use) so that torch.compile can trace a dispatch.
_MODULES: dict[str, ModuleType] = {"torch": torch_backend, "triton": triton_backend}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, no GPU, or not implemented yet)."""


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None when it can)."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {list(BACKENDS)} or 'auto'"
    if name == "torch":
        return None
    if name == "triton":
        return triton_backend.unavailable_reason(device)
    return "the CUDA extension flix_kernels._C is not part of this version of flix_kernels yet (use backend='torch')"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: the current CUDA device if any, else CPU)."""
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


def _auto(device: torch.device, x: torch.Tensor | None, lora_A: torch.Tensor | None) -> str:
    if device.type == "cuda" and unavailable_reason("triton", device) is None:
        if x is None or triton_backend.supports(x, lora_A) is None:
            return "triton"
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
