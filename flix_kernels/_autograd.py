"""Autograd helpers of the host path: ``apply(Fn, *args)``, ``Fn.apply(*args)`` for the package's
own autograd Functions minus the Python layer of ``Function.apply`` where it does nothing, and
``any_requires_grad``.

``torch.autograd.Function.apply`` is a Python wrapper around the C++ ``_FunctionBase.apply``:
without functorch transforms active, and for a Function without ``setup_context``, it only
unwraps dead functorch wrappers among the arguments and calls the C++ apply. Doing that for
the few tensor arguments directly saves several microseconds per layer call (a measurable
part of a small layer's host time). With transforms active (vmap, grad, ...) the full
``Function.apply`` runs.
"""

from __future__ import annotations

import torch

_transforms_active = torch._C._are_functorch_transforms_active
_unwrap_if_dead = getattr(torch._C._functorch, "unwrap_if_dead", None)
_C_APPLY: dict[type, object] = {}


def apply(fn: type[torch.autograd.Function], *args):
    c_apply = _C_APPLY.get(fn)
    if c_apply is None:
        defined = getattr(torch.autograd.function, "_is_setup_context_defined", None)
        if _unwrap_if_dead is None or defined is None or defined(fn.setup_context):  # pragma: no cover
            return fn.apply(*args)
        c_apply = _C_APPLY[fn] = super(torch.autograd.Function, fn).apply
    if _transforms_active():
        return fn.apply(*args)
    return c_apply(*[_unwrap_if_dead(a) if isinstance(a, torch.Tensor) else a for a in args])


def any_requires_grad(*tensors) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)
