"""Backend "torch": vectorised FLix in plain PyTorch (the CPU backend and the fallback).

Two strategies, chosen once per routing and token layout (see :func:`plan`):

* **dense**, when every example with tokens uses the same feature set: that set is one LoRA
  of rank ``R_active`` over its rank slices, ``delta = s * (x A_S^T) B_S^T``: two plain GEMMs
  and no copy of x. When some examples use no feature, only their tokens are left out
  (gathered out and written back as zeros).
* **grouped**, otherwise: gather each example's own slots of A and B (``(N, R_max, in)``,
  tiny next to x) and run two batched matmuls over *chunks* of tokens that never straddle
  examples. Inputs ``(B, L, in)`` are already chunked (one chunk per example, no copy); packed
  inputs are copied into chunks of ``C`` = mean example length, so padding is at most one
  chunk per example (<= 2x the tokens). FLOPs are the active ones, ``R_max`` per token,
  whatever the number of features.

Neither strategy multiplies a token by the slices of a feature its example does not use:
padding slots gather one of the example's own rows and get an exact zero scale (selected with
``torch.where``, since ``inf * 0`` is NaN), so a feature whose values diverged never reaches
an example without it, forward or backward. (A single GEMM over the union of the batch's
features with a per-example 0/1 mask would be cheaper for a few feature sets, and is not
exact in that sense, so it is not used.)

Numerics follow the kernels' contract (README, *Numerical contract*): the input is rounded to
the adapters' dtype, and with 16-bit adapters the low-rank path runs in float32 from there on
(the rank-space activation ``h = s * x A^T`` is scaled before anything is rounded, and so is its
gradient ``g = s * dy B``); the update is rounded once, to the output's dtype, with the base
output added. A 16-bit GEMM would round ``x A^T`` to its dtype before the scale, which
overflows float16 for activations of a few thousand where the scaled result is small.

Gradients flow through the gathers and matmuls by autograd (the gathers' backward is an
index_add into lora_A / lora_B); the common training call (grouped with whole-example chunks,
or dense over every token; no dropout, one dtype) is one autograd node that also owns the base GEMM
(:class:`_GroupedLinear`), since at small sizes the graph's nodes cost more host time than its
ops. No Python loop over tokens, examples or features, and no
host-device synchronisation: all decisions use the routing's host-side metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .._autograd import any_requires_grad, apply
from ..routing import Routing, TokenLayout

# "grouped" to use it where "dense" would be chosen (tests use it to cover both strategies);
# "dense" uses dense wherever it is exact, i.e. it changes nothing.
FORCE_STRATEGY: str | None = None


@dataclass
class Plan:
    strategy: str  # "empty" | "dense" | "grouped"
    num_tokens: int
    # both: (T_active,) tokens whose example uses a feature, or None when every token does
    active_tokens: torch.Tensor | None = None
    # dense
    rank_index: torch.Tensor | None = None  # (R_active,) rows of lora_A of the shared feature set
    slot_feature: torch.Tensor | None = None  # (R_active,) feature owning each of those rows
    # grouped
    chunk_slots: tuple | None = None  # (rank_index, feature, valid), each (N, R_max); padding: own first row
    chunk_shape: tuple | None = None  # (N, C)
    dest: torch.Tensor | None = None  # (T_active,) row of each active token in the (N*C) buffer
    scale: "_SlotScale | None" = None  # the per-slot scales of the strategy's slots
    chunk_index: torch.Tensor | None = None  # grouped: chunk_slots' rank_index, flattened; dense: rank_index
    # The one-node path's scales, (N, 1, R): the grouped ones, or dense's as a single chunk.
    node_scale: "_SlotScale | None" = None


@torch.compiler.disable
def _layout(routing: Routing, token_shape) -> TokenLayout:
    return routing.layout(token_shape)


@torch.compiler.disable
def supports(x: torch.Tensor, lora_A: torch.Tensor) -> Optional[str]:
    """Why these inputs cannot use this backend: never (it takes every floating dtype pair)."""
    return None


def plan(routing: Routing, layout: TokenLayout, device: torch.device) -> Plan:
    """Build (once per routing, layout and device; cached on the routing) the strategy.

    Host-side metadata work; kept out of torch.compile graphs (one graph break per layer
    call; the Triton backend's custom ops take prebuilt metadata tensors instead)."""
    return routing.cached(("torch_plan", layout.key, device, FORCE_STRATEGY),
                          lambda: _build_plan(routing, layout, device))


def _build_plan(routing: Routing, layout: TokenLayout, device: torch.device) -> Plan:
    T = layout.num_tokens
    active_ex = (routing.active_rank > 0) & (layout.lengths > 0)  # examples with work to do
    if T == 0 or not bool(active_ex.any()):
        return Plan("empty", T)
    used = routing.feature_ids[active_ex]
    T_active = int(layout.lengths[active_ex].sum())
    keep = None
    if T_active < T:
        keep = active_ex[layout.token_example()]
    if bool((used == used[:1]).all()) and FORCE_STRATEGY != "grouped":
        rank_index, slot_feature = routing.space.rank_rows(used[0][used[0] >= 0])
        slot_feature, rank_index = slot_feature.to(device), rank_index.to(device)
        return Plan("dense", T, rank_index=rank_index, slot_feature=slot_feature,
                    active_tokens=None if keep is None else keep.nonzero().flatten().to(device),
                    scale=_SlotScale(slot_feature, None), chunk_index=rank_index,
                    node_scale=_SlotScale(slot_feature, None, (1, 1, slot_feature.numel())))

    # Batched inputs use one chunk per example (no copy) when every example is active;
    # otherwise active tokens are copied into chunks of the mean active length.
    lengths = layout.lengths[active_ex]
    if layout.kind == "batched" and bool(active_ex.all()):
        C, copy = int(layout.lengths[0]), False
        n_chunks = lengths.clone().fill_(1)
    else:
        C, copy = max(1, -(-T_active // lengths.numel())), True
        n_chunks = (lengths + C - 1) // C
    N = int(n_chunks.sum())
    ex_ids = active_ex.nonzero().flatten()
    chunk_example = torch.repeat_interleave(ex_ids, n_chunks)
    rank_index, feature, valid = (t[chunk_example] for t in (routing.slot_rank_index, routing.slot_feature,
                                                             routing.slot_valid))
    # Padding slots point at the example's own first row (every chunk's example has one) and get
    # scale 0: their terms are exactly 0 unless that example's own feature is non-finite, so a
    # diverged feature never reaches an example without it (row 0 could belong to any feature).
    rank_index = torch.where(valid, rank_index, rank_index[:, :1])
    chunk_slots = tuple(t.to(device) for t in (rank_index, feature, valid))
    scale = _SlotScale(chunk_slots[1], chunk_slots[2], (N, 1, chunk_slots[1].shape[1]))
    p = Plan("grouped", T, chunk_slots=chunk_slots, chunk_shape=(N, C), scale=scale, chunk_index=chunk_slots[0].flatten(),
             node_scale=scale)
    if copy:
        tok_ex = layout.token_example()
        pos = torch.arange(T) - layout.offsets[tok_ex]
        first_chunk = torch.zeros(routing.num_examples, dtype=torch.long)
        first_chunk[ex_ids] = torch.cumsum(n_chunks, 0) - n_chunks
        p.dest = (first_chunk[tok_ex] * C + pos)[active_ex[tok_ex]].to(device)
        if keep is not None:
            p.active_tokens = keep.nonzero().flatten().to(device)
    return p


def _slot_scale(scaling, feature: torch.Tensor, valid: torch.Tensor | None, dtype) -> torch.Tensor:
    """Per-slot scale: scaling[feature] (or the float), exactly zero where the slot is not real."""
    if torch.is_tensor(scaling):
        s = scaling.to(dtype).index_select(0, feature.flatten()).view(feature.shape)
    else:
        s = torch.full(feature.shape, float(scaling), dtype=dtype, device=feature.device)
    return s if valid is None else torch.where(valid, s, 0)


class _SlotScale:
    """The plan's per-slot scales, built once per scaling: every layer of a model shares the
    routing's plan but has its own scaling tensor, so they are kept per tensor and rebuilt only
    when it changes (in place: its version counter), for another dtype or in inference mode
    (whose tensors autograd may not save). A scaling that requires grad (learned scales) gets
    the real gather every call, so its gradient flows."""

    def __init__(self, feature: torch.Tensor, valid: torch.Tensor | None, shape: tuple | None = None):
        self.feature, self.valid, self.shape = feature, valid, shape or tuple(feature.shape)
        self.cache: dict = {}

    def __call__(self, scaling, dtype) -> torch.Tensor:
        if torch.is_tensor(scaling):
            if scaling.requires_grad or torch.compiler.is_compiling():
                return _slot_scale(scaling, self.feature, self.valid, dtype).view(self.shape)
            key = (id(scaling), dtype, torch.is_inference_mode_enabled())
            state = (scaling, scaling._version)  # the tensor itself: an id can be reused after it is freed
        else:
            key, state = (float(scaling), dtype, torch.is_inference_mode_enabled()), None
        hit = self.cache.get(key)
        if hit is not None and (state is None or (hit[0][0] is state[0] and hit[0][1] == state[1])):
            return hit[1]
        value = _slot_scale(scaling, self.feature, self.valid, dtype).view(self.shape)
        self.cache[key] = (state, value)
        return value


def dropout_mask(shape, p: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """Bernoulli(1 - p) keep-mask of the low-rank input (bool), drawn from ``generator``."""
    return torch.rand(shape, generator=generator, device=device) >= p


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the low-rank path computes in for adapters of ``dtype``: float32 for 16-bit ones."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _zero_delta(x2d, lora_A, lora_B, out_features, dtype):
    # Keep the graph connected (zero gradients, not None) so every rank of a data-parallel
    # job produces gradients for lora_A/lora_B even when its batch uses no feature.
    anchor = lora_A[:0].sum() + lora_B[:0].sum() + x2d[:0].sum()
    return x2d.new_zeros(x2d.shape[0], out_features, dtype=dtype) + anchor.to(dtype)


def _update(p: Plan, x2d, lora_A, lora_B, scaling, dropout_p, generator, h_hook, base=None):
    """The low-rank update of the flattened input ``(T, out)``, added to ``base`` (the base
    layer's output) when given, in x's dtype; computed in :func:`wide_dtype` of lora_A's dtype
    after x is rounded to lora_A's dtype (the kernels' contract)."""
    in_f, out_f = x2d.shape[1], lora_B.shape[0]
    cdt = lora_A.dtype
    wdt = wide_dtype(cdt)
    xl = x2d if x2d.dtype == cdt else x2d.to(cdt)
    if wdt != cdt:
        xl = xl.to(wdt)
    if dropout_p > 0:
        xl = xl * dropout_mask(xl.shape, dropout_p, generator, x2d.device).to(wdt) * (1.0 / (1.0 - dropout_p))
    if p.strategy == "dense":
        a, bt = lora_A.index_select(0, p.rank_index), lora_B.index_select(1, p.rank_index).t()
        if wdt != cdt:  # (a no-op .to still costs a dispatch on the host path)
            a, bt = a.to(wdt), bt.to(wdt)
        xa = xl if p.active_tokens is None else xl.index_select(0, p.active_tokens)
        h = torch.mm(xa, a.t()) * p.scale(scaling, wdt)
        if h_hook is not None:
            h = h_hook(h)
        if base is not None and p.active_tokens is None and base.dtype == wdt:
            return torch.addmm(base, h, bt)
        d = torch.mm(h, bt)
    else:
        N, C = p.chunk_shape
        R = p.chunk_slots[0].shape[1]
        if p.dest is None:
            xc = xl.view(N, C, in_f)
        else:
            src = xl if p.active_tokens is None else xl.index_select(0, p.active_tokens)
            xc = xl.new_zeros(N * C, in_f).index_copy(0, p.dest, src).view(N, C, in_f)
        s = p.scale(scaling, wdt)
        fold = (h_hook is None and base is not None and p.dest is None and p.active_tokens is None
                and base.dtype == wdt)
        a = lora_A.index_select(0, p.chunk_index).view(N, R, in_f)
        b = lora_B.index_select(1, p.chunk_index).view(out_f, N, R).permute(1, 2, 0)
        if wdt != cdt:
            a, b = a.to(wdt), b.to(wdt)
        h = torch.bmm(xc, a.transpose(1, 2)) * s
        if h_hook is not None:
            h = h_hook(h)
        if fold:
            return torch.baddbmm(base.view(N, C, out_f), h, b).view(N * C, out_f)
        d = torch.bmm(h, b).view(N * C, out_f)
        if p.dest is not None:
            d = d.index_select(0, p.dest)
    if p.active_tokens is not None:
        d = d.new_zeros(x2d.shape[0], out_f).index_copy(0, p.active_tokens, d)
    if base is None:
        return d.to(x2d.dtype)
    return (base + d).to(base.dtype)  # the sum in the wider dtype, rounded once


class _GroupedLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias) + (x A_S^T * s) B_S`` per chunk, for the common training call
    (grouped with whole-example chunks, or dense over every token as one chunk; no dropout, one
    dtype, constant scales):
    the same ops as the autograd graph of :func:`_call`, with one node instead of a dozen
    (reshapes, the base GEMM, gathers, bmm, scale, baddbmm) and the base's input gradient
    folded into the update's (``baddbmm``), which is most of the host time of a small layer.
    ``index`` is the chunks' rank rows (N * R), ``scale`` the per-slot scales (N, 1, R), in
    :func:`wide_dtype` of the adapters' dtype, as h, its gradient and the gathered slots are."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, index, scale):
        y, saved = _grouped_linear(x, weight, bias, lora_A, lora_B, index, scale)
        ctx.save_for_backward(x, weight, *saved, index, scale)
        ctx.shapes = (lora_A.shape, lora_B.shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, a, b, h, index, scale = ctx.saved_tensors
        need_x, need_w, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        N, wdt, cdt = scale.shape[0], scale.dtype, weight.dtype
        dy3 = dy.reshape(N, -1, dy.shape[-1])
        dyw = dy3 if dy3.dtype == wdt else dy3.to(wdt)
        dx = dW = db = dA = dB = None
        if need_x or need_A:
            dh = torch.bmm(dyw, b.transpose(1, 2)).mul_(scale)  # g = s * dy B_S, scaled before any rounding
            if need_x:
                base = torch.matmul(dy3, weight)
                if base.dtype == wdt:
                    dx = torch.baddbmm(base, dh, a).view(x.shape)
                else:
                    dx = (base + torch.bmm(dh, a)).to(x.dtype).view(x.shape)
            if need_A:
                x3 = x.reshape(N, -1, x.shape[-1])
                da = torch.bmm(dh.transpose(1, 2), x3 if x3.dtype == wdt else x3.to(wdt))
                dA = da.new_zeros(ctx.shapes[0]).index_add_(0, index, da.view(-1, da.shape[-1])).to(cdt)
        if need_B:
            db_ = torch.bmm(h.transpose(1, 2), dyw)  # (N, R, out)
            out_f, total = ctx.shapes[1]
            dB = db_.new_zeros(total, out_f).index_add_(0, index, db_.view(-1, out_f)).t().to(cdt)
        if need_w:
            dW = dy3.reshape(-1, dy3.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        if need_bias:
            db = dy3.sum((0, 1))
        return dx, dW, db, dA, dB, None, None


def _grouped_linear(x, weight, bias, lora_A, lora_B, index, scale):
    """``(y, (a, b, h))``: the layer's output in x's token shape, and the gathered slots of A
    and B and the scaled intermediate h (all in scale's dtype) that the backward needs."""
    N, _, R = scale.shape
    out_f, wdt = weight.shape[0], scale.dtype
    x3 = x.reshape(N, -1, x.shape[-1])
    a = lora_A.index_select(0, index).view(N, R, -1)
    b = lora_B.index_select(1, index).view(out_f, N, R).permute(1, 2, 0)  # (N, R, out): a column gather
    # is the fast one on a CPU; the backward adds whole rows of B's transpose, the fast scatter
    if lora_A.dtype != wdt:
        a, b = a.to(wdt), b.to(wdt)
    h = torch.bmm(x3 if x3.dtype == wdt else x3.to(wdt), a.transpose(1, 2)).mul_(scale)
    base = F.linear(x3, weight, bias)
    y = torch.baddbmm(base, h, b) if base.dtype == wdt else (base + torch.bmm(h, b)).to(base.dtype)
    return y.view(*x.shape[:-1], out_f), (a, b, h)


def _grouped_linear_applies(p: Plan, x, weight, bias, lora_A, dropout_p, h_hook) -> bool:
    """Whether :class:`_GroupedLinear` computes this call exactly as :func:`_call` would."""
    return (p.node_scale is not None and p.dest is None and p.active_tokens is None and h_hook is None
            and dropout_p == 0 and x.dtype == weight.dtype == lora_A.dtype
            and (bias is None or bias.dtype == x.dtype) and not torch.is_autocast_enabled(x.device.type)
            and not torch.compiler.is_compiling())


def prepare(routing: Routing, x, weight, lora_A, scaling):
    """The call for inputs shaped like ``x`` under ``routing`` (the plan looked up once):
    ``call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, generator)``, the linear layer
    when ``weight`` is given, else the update alone."""
    token_shape = tuple(x.shape[:-1])
    p = plan(routing, routing.layout(token_shape), x.device)

    def call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, generator):
        return _call(p, x, weight, bias, lora_A, lora_B, scaling, dropout_p, generator)

    return call


def _call(p: Plan, x, weight, bias, lora_A, lora_B, scaling, dropout_p, generator, h_hook=None):
    out_f = lora_B.shape[0]
    x2d = x.reshape(-1, x.shape[-1])
    if weight is None:
        if p.strategy == "empty":  # the same on every rank (one routing, one token layout): no collective
            return _zero_delta(x2d, lora_A, lora_B, out_f, x.dtype).view(*x.shape[:-1], out_f)
        d = _update(p, x2d, lora_A, lora_B, scaling, dropout_p, generator, h_hook)
        return d.to(x.dtype).view(*x.shape[:-1], out_f)
    if _grouped_linear_applies(p, x, weight, bias, lora_A, dropout_p, h_hook):
        s = p.node_scale(scaling, wide_dtype(lora_A.dtype))
        if not torch.is_grad_enabled() or not any_requires_grad(x, weight, bias, lora_A, lora_B, s):
            return _grouped_linear(x, weight, bias, lora_A, lora_B, p.chunk_index, s)[0]
        if not s.requires_grad:
            return apply(_GroupedLinear, x, weight, bias, lora_A, lora_B, p.chunk_index, s)
    y = F.linear(x2d, weight, bias)
    if p.strategy == "empty":
        y = y + _zero_delta(x2d, lora_A, lora_B, out_f, y.dtype)
    else:
        y = _update(p, x2d, lora_A, lora_B, scaling, dropout_p, generator, h_hook, base=y)
    return y.view(*x.shape[:-1], out_f)


def delta(x, lora_A, lora_B, routing, scaling, dropout_p, generator, h_hook=None):
    """Low-rank FLix update, shape ``x.shape[:-1] + (out,)``, dtype of x.

    ``h_hook(h) -> h``, if given, is applied to the scaled low-rank intermediate between the
    shrink and the expand (tensor parallelism: :mod:`flix_kernels.distributed` all-reduces h,
    or its gradient, there)."""
    if _traces(routing, x):
        d = _traced_update(routing, x, lora_A, lora_B, scaling, dropout_p, generator, h_hook)
        return d.to(x.dtype).view(*x.shape[:-1], lora_B.shape[0])
    p = plan(routing, _layout(routing, x.shape[:-1]), x.device)
    return _call(p, x, None, None, lora_A, lora_B, scaling, dropout_p, generator, h_hook)


def linear(x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, generator):
    """``F.linear(x, weight, bias) + delta(...)``, in the base output's dtype (autocast's if on)."""
    if _traces(routing, x):
        y = F.linear(x, weight, bias)
        d = _traced_update(routing, x, lora_A, lora_B, scaling, dropout_p, generator)
        return (y + d.view(y.shape)).to(y.dtype)
    p = plan(routing, _layout(routing, x.shape[:-1]), x.device)
    return _call(p, x, weight, bias, lora_A, lora_B, scaling, dropout_p, generator)


# -- under torch.compile ------------------------------------------------------------------------
def _traces(routing: Routing, x: torch.Tensor) -> bool:
    """Whether this call runs :func:`_traced_update`: inside a compiled region, for inputs of one
    or more tokens per example, with the routing's slot tables prebuilt on x's device
    (:meth:`Routing.slot_tables`). Otherwise, packed inputs (``cu_seqlens``) included, the eager
    plan runs (one graph break per layer call); the Triton and CUDA backends trace those too."""
    return (torch.compiler.is_compiling() and routing.classify(x.shape[:-1])[0] == "batched"
            and routing.prebuilt_slot_tables(x.device) is not None)


def _traced_update(routing, x, lora_A, lora_B, scaling, dropout_p, generator, h_hook=None):
    """The update of a ``(B, L, in)`` or ``(B, in)`` input as a traceable graph: every example's
    own slots of A and B gathered from the routing's slot tables and two batched matmuls, with
    no host work and no data-dependent shape. Nothing in it depends on which features are
    used, so one graph serves every routing of the batch size (the slot count is a dynamic
    dimension). Padding slots read an exact zero (``torch.where``, not a zero scale: inf * 0 is
    NaN), so a feature an example does not use never reaches it, forward or backward."""
    index, feature, valid = routing.prebuilt_slot_tables(x.device)
    B, R = index.shape
    in_f, out_f, cdt = x.shape[-1], lora_B.shape[0], lora_A.dtype
    wdt = wide_dtype(cdt)
    xl = x.reshape(B, -1, in_f).to(cdt).to(wdt)
    if dropout_p > 0:
        xl = xl * dropout_mask(xl.shape, dropout_p, generator, x.device).to(wdt) * (1.0 / (1.0 - dropout_p))
    flat = index.reshape(-1)
    a = torch.where(valid[..., None], lora_A.index_select(0, flat).view(B, R, in_f).to(wdt), 0)
    b = torch.where(valid[..., None], lora_B.index_select(1, flat).view(out_f, B, R).permute(1, 2, 0).to(wdt), 0)
    h = torch.bmm(xl, a.transpose(1, 2)) * _slot_scale(scaling, feature, valid, wdt).unsqueeze(1)
    if h_hook is not None:
        h = h_hook(h)
    return torch.bmm(h, b)
