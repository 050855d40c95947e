"""The FLix ops: ``flix_linear`` and ``flix_delta``, with input validation and backend dispatch.

Every backend receives validated inputs: the same device everywhere, matching shapes and
dtypes, a routing that matches the input's token layout. Errors name what is wrong.

Validation and dispatch are decided once per routing and *call signature* (the backend asked
for, the shapes, dtypes and devices of every tensor, the kind of scaling, the dropout
probability, the generator's device, autocast): the first call of a signature validates
everything and asks the backend to ``prepare`` a call (its plan or kernel metadata for that
token layout), which the routing keeps in ``routing.calls``; later calls with that signature
only run it. Any input that differs in what validation looks at has another signature, so it
is validated afresh and its errors are exactly those of a first call.
"""

from __future__ import annotations

import numbers

import torch

from .backends import get_backend, torch_backend
from .features import FeatureSpace
from .routing import Routing

__all__ = ["flix_linear", "flix_delta"]


def _check(cond: bool, msg: str, exc=ValueError):
    if not cond:
        raise exc(msg)


def _validate(x, lora_A, lora_B, routing, scaling, dropout_p, weight=None, bias=None, with_base=False, *,
              generator=None):
    _check(isinstance(routing, Routing), f"routing must be a flix_kernels.Routing, got {type(routing).__name__}", TypeError)
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        _check(torch.is_tensor(t), f"{name} must be a tensor, got {type(t).__name__}", TypeError)
        _check(t.dtype.is_floating_point, f"{name} must be a floating-point tensor, got dtype {t.dtype}", TypeError)
    space = routing.space
    _check(x.dim() >= 1, "x must have at least one dimension (..., in_features)")
    _check(lora_A.dim() == 2 and lora_B.dim() == 2,
           f"lora_A and lora_B must be 2-D, got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    R, in_f = lora_A.shape
    out_f = lora_B.shape[0]
    _check(R == space.total_rank,
           f"lora_A has {R} rows but the routing's FeatureSpace has total_rank {space.total_rank}")
    _check(lora_B.shape[1] == R, f"lora_B must be (out, total_rank={R}), got {tuple(lora_B.shape)}")
    _check(x.shape[-1] == in_f, f"x has {x.shape[-1]} input features but lora_A is {tuple(lora_A.shape)} (R, in={in_f})")
    _check(lora_A.dtype == lora_B.dtype, f"lora_A and lora_B dtypes differ: {lora_A.dtype} vs {lora_B.dtype}", TypeError)
    devs = {("x", x.device), ("lora_A", lora_A.device), ("lora_B", lora_B.device)}
    if with_base:
        _check(torch.is_tensor(weight), "weight must be a tensor", TypeError)
        _check(weight.shape == (out_f, in_f),
               f"weight must be (out={out_f}, in={in_f}) to match lora_A/lora_B, got {tuple(weight.shape)}")
        # Under autocast, F.linear casts x and weight itself (x arrives in the autocast dtype).
        autocast = torch.is_autocast_enabled(x.device.type)
        _check(autocast or weight.dtype == x.dtype, f"weight dtype {weight.dtype} does not match x dtype {x.dtype}", TypeError)
        devs.add(("weight", weight.device))
        if bias is not None:
            _check(torch.is_tensor(bias) and bias.shape == (out_f,),
                   f"bias must be None or a tensor of shape ({out_f},), got {getattr(bias, 'shape', bias)}")
            _check(autocast or bias.dtype == x.dtype, f"bias dtype {bias.dtype} does not match x dtype {x.dtype}", TypeError)
            devs.add(("bias", bias.device))
    if torch.is_tensor(scaling):
        _check(scaling.shape == (space.num_features,),
               f"scaling tensor must have one scale per feature, shape ({space.num_features},), got {tuple(scaling.shape)}")
        _check(scaling.dtype.is_floating_point, f"scaling must be floating point, got {scaling.dtype}", TypeError)
        devs.add(("scaling", scaling.device))
    else:
        _check(isinstance(scaling, numbers.Real) and not isinstance(scaling, bool),
               f"scaling must be a float or a tensor of per-feature scales, got {type(scaling).__name__}", TypeError)
    if len({d for _, d in devs}) > 1:
        raise ValueError("all tensors must be on one device; got " + ", ".join(f"{n} on {d}" for n, d in sorted(devs, key=str)))
    _check(isinstance(dropout_p, numbers.Real) and not isinstance(dropout_p, bool) and 0.0 <= float(dropout_p) < 1.0,
           f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if generator is not None:
        _check(isinstance(generator, torch.Generator),
               f"generator must be a torch.Generator or None, got {type(generator).__name__} {generator!r} "
               f"(for example torch.Generator(device={str(x.device)!r}).manual_seed(0))", TypeError)
        _check(generator.device.type == x.device.type,
               f"the dropout generator is on {generator.device} but x is on {x.device}; "
               f"use torch.Generator(device={str(x.device)!r})")
    routing.classify(x.shape[:-1])  # raises if the token dimensions do not match the routing


def _check_space(routing, space) -> None:
    """Raise unless ``routing`` was built from ``space`` (equal groups, values in the same order,
    ranks): the space the caller's lora_A / lora_B are laid out in. A routing of a space whose
    values are ordered otherwise would give each example another feature's rank rows."""
    if not isinstance(routing, Routing) or routing.space is space:
        return  # not a Routing: validation says so
    if not isinstance(space, FeatureSpace):
        raise TypeError(f"space must be a FeatureSpace or None, got {type(space).__name__}")
    if routing.space != space:  # FeatureSpace compares by cached hash, then once by value
        raise ValueError("the routing's FeatureSpace differs from the adapters' (space=): "
                         + routing.space.describe_difference(space))


def _tensor_key(t):
    return None if t is None else (t.shape, t.dtype, t.device)


def _signature(backend, x, weight, bias, lora_A, lora_B, scaling, dropout_p, generator):
    """What validation and dispatch depend on, hashable; AttributeError for inputs that are not
    even tensors (the caller validates those to say so)."""
    if torch.is_tensor(scaling):
        scale = (scaling.shape, scaling.dtype, scaling.device, scaling.requires_grad)
    else:
        scale = type(scaling)
    return (backend, x.shape, x.dtype, x.device, lora_A.shape, lora_A.dtype, lora_A.device, lora_B.shape,
            lora_B.dtype, lora_B.device, _tensor_key(weight), _tensor_key(bias), scale, dropout_p,
            None if generator is None else generator.device, _autocast_key(x.device.type), torch_backend.FORCE_STRATEGY)


def _autocast_key(device_type: str):
    """Autocast's state for the call signature: off, or the dtype it casts to."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _dispatch(backend, x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, generator, with_base):
    """The prepared call for these inputs: looked up by signature, else validated and prepared."""
    try:
        key = _signature(backend, x, weight, bias, lora_A, lora_B, scaling, dropout_p, generator)
        calls = routing.calls
        call = calls.get(key)
        # routing.calls is an LRU. Refreshing a hit hashes the signature again (~0.5 us), so it is
        # done only once the LRU is half full: before that nothing can be evicted soon, and a
        # routing's usual handful of signatures never pays it.
        if call is not None and len(calls) > routing.cache_limit >> 1:
            try:
                calls.move_to_end(key)
            except KeyError:  # dropped meanwhile by another thread using this routing: call is still good
                pass
    except (AttributeError, TypeError):  # not tensors, not a Routing, unhashable: validation says what
        key = call = None
    if call is None:
        _validate(x, lora_A, lora_B, routing, scaling, dropout_p, weight, bias, with_base=with_base,
                  generator=generator)
        call = get_backend(backend, x.device, x, lora_A).prepare(routing, x, weight, lora_A, scaling)
        if key is not None:
            routing._lru_put(routing.calls, key, call)  # bounded: drops the least recently used call
    return call


def flix_delta(x, lora_A, lora_B, routing, *, scaling, dropout_p: float = 0.0, backend: str = "auto",
               generator: torch.Generator | None = None, space: FeatureSpace | None = None) -> torch.Tensor:
    """The low-rank FLix update ``sum_{k in S(x)} s_k B_k A_k drop(x)`` for every token.

    Args:
        x: ``(B, L, in)``, ``(B, in)``, or packed ``(T, in)`` / ``(1, T, in)`` with the
            routing's ``cu_seqlens``.
        lora_A: ``(total_rank, in)``; feature k owns rows ``rank_offsets[k]:rank_offsets[k+1]``.
        lora_B: ``(out, total_rank)``; feature k owns the same columns.
        routing: the batch's :class:`~flix_kernels.Routing`.
        scaling: a float, or a ``(num_features,)`` tensor of per-feature scales.
        dropout_p: dropout on the low-rank input (pass 0 at inference).
        backend: "torch", "triton", "cuda" or "auto".
        generator: RNG for the dropout mask.
        space: the :class:`~flix_kernels.FeatureSpace` lora_A / lora_B are laid out in; when
            given, a routing of another space raises (the ops alone cannot tell: without it the
            routing's space is taken as the adapters' layout).

    Returns ``x.shape[:-1] + (out,)`` in x's dtype, differentiable in x, lora_A, lora_B. The
    low-rank path computes in lora_A's dtype.
    """
    if space is not None:
        _check_space(routing, space)
    if torch.compiler.is_compiling():
        _validate(x, lora_A, lora_B, routing, scaling, dropout_p, generator=generator)
        impl = get_backend(backend, x.device, x, lora_A)
        return impl.delta(x, lora_A, lora_B, routing, scaling, float(dropout_p), generator)
    call = _dispatch(backend, x, None, None, lora_A, lora_B, routing, scaling, dropout_p, generator, False)
    return call(x, None, None, lora_A, lora_B, scaling, float(dropout_p), generator)


def flix_linear(x, weight, bias, lora_A, lora_B, routing, *, scaling, dropout_p: float = 0.0,
                backend: str = "auto", generator: torch.Generator | None = None,
                space: FeatureSpace | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias) + flix_delta(x, lora_A, lora_B, routing, ...)``.

    ``weight`` is ``(out, in)`` in x's dtype, ``bias`` ``(out,)`` or None. Differentiable in
    x, lora_A, lora_B, and in weight/bias when they require grad. See :func:`flix_delta`.
    """
    if space is not None:
        _check_space(routing, space)
    if torch.compiler.is_compiling():
        _validate(x, lora_A, lora_B, routing, scaling, dropout_p, weight, bias, with_base=True, generator=generator)
        impl = get_backend(backend, x.device, x, lora_A)
        return impl.linear(x, weight, bias, lora_A, lora_B, routing, scaling, float(dropout_p), generator)
    call = _dispatch(backend, x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, generator, True)
    return call(x, weight, bias, lora_A, lora_B, scaling, float(dropout_p), generator)
