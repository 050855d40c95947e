"""Backend "triton": the fused FLix kernels of :mod:`flix_kernels.triton` as the custom ops
``flix_kernels::triton_lora_forward`` / ``triton_lora_backward`` (see
:mod:`flix_kernels.backends.kernel_ops` for what they compute).

Specific to this backend: the base GEMM can run inside the expand kernel's tile
(``fuse_base``, so y is written once); it is off by default (``FLIX_FUSE_BASE=1`` turns it on)
and, with ``FLIX_TRITON_AUTOTUNE=1``, chosen per shape class by timing both paths once.
"""

from typing import Optional

import torch
from torch import Tensor

from .. import settings
from .._launch import INTERPRETER_BF16
from .kernel_ops import KernelOps

try:  # Triton is optional (no wheels for some platforms); the backend reports why it is off.
    import triton  # noqa: F401

    from ..triton import launch

    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the install
    launch = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Default for the fused base GEMM. Off until measured per shape on a GPU: cuBLAS + in-place
# expand is the safe default. FLIX_FUSE_BASE=1 turns it on.
FUSE_BASE = settings.value("FLIX_FUSE_BASE")


def unavailable_reason(device) -> Optional[str]:
    if launch is None:
        return f"triton could not be imported ({_IMPORT_ERROR})"
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        return None
    if launch.interpreting():
        return launch.interpreter_unavailable_reason()
    if dev is None and torch.cuda.is_available():
        return None
    return "the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 to run them on CPU tensors, slowly)"


def supports(x: Tensor, lora_A: Tensor) -> Optional[str]:
    """Why these inputs cannot use the Triton kernels (None when they can)."""
    for name, t in (("x", x), ("lora_A/lora_B", lora_A)):
        if t.dtype not in launch.SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} is not supported by the Triton kernels (float32, float16, bfloat16)"
        if t.dtype == torch.bfloat16 and launch.interpreting():  # the interpreter's bf16 dots are wrong
            return f"{name} dtype torch.bfloat16 cannot run in {INTERPRETER_BF16}"
    return None


def settings(device) -> dict:
    """The paths this process's Triton launches take (what a benchmark measured): the fused base
    GEMM's default, whether it goes through TMA on ``device``, whether g and dB take one pass
    over dy where they can, autotuning and what it chose."""
    dev = torch.device(device)
    return {"fuse_base": FUSE_BASE, "tma": launch.has_tma(dev), "dy_pass": launch.USE_DY_PASS,
            "autotune": launch.autotuning(), "tuned": launch.tuned_configs()}


def _base_path(key, fuse_base, fused, unfused, device):
    """The fused or the cuBLAS + expand path: ``fuse_base`` decides, unless autotuning is on,
    in which case the faster of the two for this shape class is timed once and kept."""
    if launch.autotuning():
        fuse_base = launch.choose(key, {"cublas": unfused, "fused": fused}, device) == "fused"
    return fused if fuse_base else unfused


ops = KernelOps("triton", launch, ("cuda", "cpu"), supports=supports, instead="backend='torch'",
                base_path=_base_path, fuse_base=lambda: FUSE_BASE) if launch is not None else None
prepare, delta, linear = (ops.prepare, ops.delta, ops.linear) if ops is not None else (None, None, None)
