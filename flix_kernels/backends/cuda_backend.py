"""Backend "cuda": the CUDA C++ kernels of ``csrc/`` (the extension ``flix_kernels._C``) as the
custom ops ``flix_kernels::cuda_lora_forward`` / ``cuda_lora_backward`` (what they compute:
:mod:`flix_kernels.backends.kernel_ops`; how they launch: :mod:`flix_kernels.cuda.launch`).

Same semantics, layouts, dropout bits and determinism as "triton"; tensor-core MMA (WMMA) for
fp16/bf16, FMA for fp32 (exact fp32, whatever ``allow_tf32`` says). Base GEMM by cuBLAS, except
on the decode path (at most 64 tokens, a layer with its base weight): there the whole layer is
two launches of our own from one call into the extension, prepared once per routing and shape
(:class:`flix_kernels.cuda.launch.DecodePlan`). Each launch is one call into the extension with
raw pointers, so the gain is largest where launches dominate (decode).
"""

from functools import partial
from types import SimpleNamespace
from typing import Optional

from torch import Tensor

from .. import cuda as bridge
from .kernel_ops import KernelOps

if bridge._C is not None:
    from ..cuda import launch

    # flix_kernels.ops validated the inputs and the metadata is the routing's own: skip the
    # launchers' per-call validation on this path.
    ops = KernelOps("cuda", SimpleNamespace(decode_plan=launch.decode_plan, shrink=partial(launch.shrink, check=False),
                                            expand=partial(launch.expand, check=False),
                                            weight_grad=partial(launch.weight_grad, check=False)), ("cuda",),
                    supports=lambda x, lora_A: supports(x, lora_A), instead="backend='triton' or 'torch'")
    prepare, delta, linear = ops.prepare, ops.delta, ops.linear
else:
    launch = ops = prepare = delta = linear = None


def unavailable_reason(device) -> Optional[str]:
    return bridge.unavailable_reason(device)


def settings() -> dict:
    """The paths this process's CUDA launches take (what a benchmark measured)."""
    return {"decode_path": bool(launch is not None and launch.decode_enabled())}


def supports(x: Tensor, lora_A: Tensor) -> Optional[str]:
    """Why these inputs cannot use the CUDA kernels (None when they can)."""
    if (x.dtype, lora_A.dtype) not in launch.SUPPORTED_PAIRS:
        return (f"x dtype {x.dtype} with adapter dtype {lora_A.dtype} is not supported by the CUDA kernels "
                "(equal float32/float16/bfloat16 dtypes, or float16/bfloat16 x with float32 adapters)")
    return None
