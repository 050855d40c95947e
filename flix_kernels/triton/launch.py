"""The Triton backend's launchers, one kernel family per module (as ``csrc/`` is): :mod:`.shrink`,
:mod:`.expand`, :mod:`.weight_grad`, over the device helpers of :mod:`.common` and the host
machinery of :mod:`.tuning` (configurations, overrides, autotuning, plan memo).

This module is what :class:`~flix_kernels.backends.kernel_ops.KernelOps` calls: the same three
launchers, with the same arguments and semantics, as :mod:`flix_kernels.cuda.launch`, and
``dy_pass`` (g and dB from one read of dy), which only this backend has.
"""

from __future__ import annotations

from .common import keep_mask
from .expand import expand, has_tma
from .shrink import shrink
from .tuning import (OVERRIDES, SUPPORTED_DTYPES, autotuning, choose, interpreter_unavailable_reason, interpreting,
                     precision, tl_dtype, tuned_configs)
from .weight_grad import USE_DY_PASS, WORKSPACE_BYTES, dy_pass, weight_grad, weight_grad_pair

__all__ = ["OVERRIDES", "SUPPORTED_DTYPES", "USE_DY_PASS", "WORKSPACE_BYTES", "autotuning", "choose", "dy_pass",
           "expand", "has_tma", "interpreter_unavailable_reason", "interpreting", "keep_mask", "precision", "shrink",
           "tl_dtype", "tuned_configs", "weight_grad", "weight_grad_pair"]
