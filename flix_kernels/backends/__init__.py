"""Backend registry: which implementations of the FLix ops exist and which can run here.

A backend module exposes ``delta(x, lora_A, lora_B, routing, layout, scaling, dropout_p,
generator)`` and ``linear(x, weight, bias, lora_A, lora_B, routing, layout, scaling,
dropout_p, generator)``, with inputs already validated by :mod:`flix_kernels.ops`.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import torch_backend

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "get_backend", "unavailable_reason"]

BACKENDS = ("torch", "triton", "cuda")
# Imported up front (not on first use) so that torch.compile can trace a dispatch.
_MODULES: dict[str, ModuleType] = {"torch": torch_backend}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, no GPU, or not implemented yet)."""


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None when it can)."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {list(BACKENDS)} or 'auto'"
    if name == "torch":
        return None
    # The fused kernels are added by later releases; until then say so plainly.
    if name == "triton":
        return "the Triton kernels are not part of this version of flix_kernels yet (use backend='torch')"
    return "the CUDA extension flix_kernels._C is not part of this version of flix_kernels yet (use backend='torch')"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: the current CUDA device if any, else CPU)."""
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


def get_backend(name: str, device: torch.device) -> ModuleType:
    """The module implementing backend ``name`` ("auto": the fastest available for ``device``)."""
    if name == "auto":
        name = available_backends(device)[0]
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    return _MODULES[name]
