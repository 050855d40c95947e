"""Backend "torch": vectorised FLix in plain PyTorch (the CPU backend and the fallback).

Two strategies, chosen once per routing and token layout by a cost model (see :func:`plan`):

* **dense**: one LoRA over the rank slices of the features *present in the batch*
  (``R_p`` = their total rank): ``h = x A_p^T`` (T x R_p), zero the slices a token's example
  does not use and apply the per-feature scale, ``delta = h B_p^T``. Two plain GEMMs, no copy
  of x; it wastes ``R_p / R_active`` of the low-rank FLOPs, nothing when every example uses
  the same feature set (then it *is* plain LoRA).
* **grouped**: gather each example's own slots of A and B (``(N, R_max, in)``, tiny next to x)
  and run two batched matmuls over *chunks* of tokens that never straddle examples. Inputs
  ``(B, L, in)`` are already chunked (one chunk per example, no copy); packed inputs are
  copied into chunks of ``C`` = mean example length, so padding is at most one chunk per
  example (<= 2x the tokens). FLOPs are the active ones, ``R_max`` per token, whatever the
  number of features.

The cost model counts multiply-adds per (in + out) column: dense ``T * R_p``; grouped
``padded_tokens * R_max`` plus the weight gathers and, for packed inputs, the two token
copies. Gradients flow through the gathers and matmuls by autograd (the gathers' backward
is an index_add into lora_A / lora_B). No Python loop over tokens, examples or features,
and no host-device synchronisation: all decisions use the routing's host-side metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..routing import Routing, TokenLayout

# Relative cost of a batched small matmul multiply-add vs one in a single large GEMM, and of
# copying one token row (in or out) vs one multiply-add per column: rough CPU/GPU figures,
# only used to choose between strategies that differ by large factors.
_BMM_PENALTY = 1.25
_COPY_COST = 4.0
# "dense" or "grouped" to bypass the cost model (tests use it to cover both strategies).
FORCE_STRATEGY: str | None = None


@dataclass
class Plan:
    strategy: str  # "empty" | "dense" | "grouped"
    num_tokens: int
    # dense
    rank_index: torch.Tensor | None = None  # (R_p,) rows of lora_A used by the batch
    slot_feature: torch.Tensor | None = None  # (R_p,) feature owning each of those rows
    example_mask: torch.Tensor | None = None  # (B, R_p) bool; None when all examples agree
    token_example: torch.Tensor | None = None  # (T,) for packed dense with a mask
    batched_shape: tuple | None = None  # (B, L) for batched dense with a mask
    # grouped
    chunk_slots: tuple | None = None  # (rank_index, feature, valid), each (N, R_max)
    chunk_shape: tuple | None = None  # (N, C)
    dest: torch.Tensor | None = None  # (T_active,) row of each active token in the (N*C) buffer
    active_tokens: torch.Tensor | None = None  # (T_active,) or None when every token is active


@torch.compiler.disable
def _layout(routing: Routing, token_shape) -> TokenLayout:
    return routing.layout(token_shape)


@torch.compiler.disable
def supports(x: torch.Tensor, lora_A: torch.Tensor) -> Optional[str]:
    """Why these inputs cannot use this backend: never (it takes every floating dtype pair)."""
    return None


def plan(routing: Routing, layout: TokenLayout, device: torch.device, minimize_h: bool = False) -> Plan:
    """Build (once per routing, layout and device; cached on the routing) the strategy.

    ``minimize_h``: choose the strategy whose low-rank intermediate h is smaller (tensor
    parallelism sends h between ranks) instead of the one with fewer FLOPs.

    Host-side metadata work; kept out of torch.compile graphs (one graph break per layer
    call; the Triton backend's custom ops take prebuilt metadata tensors instead)."""
    return routing.cached(("torch_plan", layout.key, device, minimize_h),
                          lambda: _build_plan(routing, layout, device, minimize_h))


def _build_plan(routing: Routing, layout: TokenLayout, device: torch.device, minimize_h: bool = False) -> Plan:
    T = layout.num_tokens
    active_ex = (routing.active_rank > 0) & (layout.lengths > 0)  # examples with work to do
    if T == 0 or not bool(active_ex.any()):
        return Plan("empty", T)
    space = routing.space
    R_max = routing.max_active_rank
    used = routing.feature_ids[active_ex]
    present = torch.unique(used[used >= 0])
    ranks = torch.tensor(space.ranks)
    R_p = int(ranks[present].sum())
    uniform = bool((used == used[:1]).all())
    T_active = int(layout.lengths[active_ex].sum())

    # Grouped geometry: batched inputs use one chunk per example (no copy) when every example
    # is active; otherwise active tokens are copied into chunks of the mean active length.
    lengths = layout.lengths[active_ex]
    if layout.kind == "batched" and bool(active_ex.all()):
        C, copy = int(layout.lengths[0]), False
        n_chunks = lengths.clone().fill_(1)
    else:
        C, copy = max(1, -(-T_active // lengths.numel())), True
        n_chunks = (lengths + C - 1) // C
    N = int(n_chunks.sum())
    dense_cost = T * R_p
    grouped_cost = _BMM_PENALTY * N * C * R_max + N * R_max + (_COPY_COST * 2 * T_active if copy else 0)
    if minimize_h:  # h is T x R_p (dense) or N x C x R_max (grouped)
        use_dense = uniform or T * R_p <= N * C * R_max
    else:
        use_dense = uniform or dense_cost <= grouped_cost
    if FORCE_STRATEGY is not None:
        use_dense = FORCE_STRATEGY == "dense"
    if use_dense:
        return _dense_plan(routing, layout, device, present, uniform)

    ex_ids = active_ex.nonzero().flatten()
    chunk_example = torch.repeat_interleave(ex_ids, n_chunks)
    chunk_slots = tuple(
        t[chunk_example].to(device)
        for t in (routing.slot_rank_index, routing.slot_feature, routing.slot_valid)
    )
    p = Plan("grouped", T, chunk_slots=chunk_slots, chunk_shape=(N, C))
    if copy:
        tok_ex = layout.token_example()
        pos = torch.arange(T) - layout.offsets[tok_ex]
        first_chunk = torch.zeros(routing.num_examples, dtype=torch.long)
        first_chunk[ex_ids] = torch.cumsum(n_chunks, 0) - n_chunks
        keep = active_ex[tok_ex]
        p.dest = (first_chunk[tok_ex] * C + pos)[keep].to(device)
        if T_active < T:
            p.active_tokens = keep.nonzero().flatten().to(device)
    return p


def _dense_plan(routing, layout, device, present, uniform) -> Plan:
    rank_index, slot_feature = routing.space.rank_rows(present)
    p = Plan("dense", layout.num_tokens, rank_index=rank_index.to(device), slot_feature=slot_feature.to(device))
    if not uniform or bool(((layout.lengths > 0) & (routing.active_rank == 0)).any()):
        # (B, R_p): does example b use the feature owning slot j?
        uses = (routing.feature_ids[:, :, None] == slot_feature[None, None, :]).any(1)
        p.example_mask = uses.to(device)
        if layout.kind == "batched":
            p.batched_shape = (routing.num_examples, int(layout.lengths[0]) if routing.num_examples else 0)
        else:
            p.token_example = layout.token_example().to(device)
    return p


def _slot_scale(scaling, feature: torch.Tensor, valid: torch.Tensor | None, dtype) -> torch.Tensor:
    """Per-slot scale: scaling[feature] (or the float), zero where the slot is not real."""
    if torch.is_tensor(scaling):
        s = scaling.to(dtype).index_select(0, feature.flatten()).view(feature.shape)
        return s if valid is None else s * valid.to(dtype)
    if valid is None:
        return torch.full(feature.shape, float(scaling), dtype=dtype, device=feature.device)
    return valid.to(dtype) * float(scaling)


def dropout_mask(shape, p: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """Bernoulli(1 - p) keep-mask of the low-rank input (bool), drawn from ``generator``."""
    return torch.rand(shape, generator=generator, device=device) >= p


def _zero_delta(x2d, lora_A, lora_B, out_features, dtype):
    # Keep the graph connected (zero gradients, not None) so every rank of a data-parallel
    # job produces gradients for lora_A/lora_B even when its batch uses no feature.
    anchor = lora_A[:0].sum() + lora_B[:0].sum() + x2d[:0].sum()
    return x2d.new_zeros(x2d.shape[0], out_features, dtype=dtype) + anchor.to(dtype)


def delta(x, lora_A, lora_B, routing, scaling, dropout_p, generator, h_hook=None):
    """Low-rank FLix update, shape ``x.shape[:-1] + (out,)``, dtype of x.

    ``h_hook(h) -> h``, if given, is applied to the scaled low-rank intermediate between the
    shrink and the expand, and the strategy is then chosen to keep h small (tensor parallelism:
    :mod:`flix_kernels.distributed` all-reduces h, or its gradient, there)."""
    in_f, out_f = x.shape[-1], lora_B.shape[0]
    layout = _layout(routing, x.shape[:-1])
    x2d = x.reshape(-1, in_f)
    cdt = lora_A.dtype
    p = plan(routing, layout, x.device, minimize_h=h_hook is not None)
    if p.strategy == "empty":  # the same on every rank (one routing, one token layout): no collective
        return _zero_delta(x2d, lora_A, lora_B, out_f, x.dtype).view(*x.shape[:-1], out_f)
    xl = x2d.to(cdt)
    if dropout_p > 0:
        xl = xl * dropout_mask(xl.shape, dropout_p, generator, x.device).to(cdt) * (1.0 / (1.0 - dropout_p))
    if p.strategy == "dense":
        a = lora_A.index_select(0, p.rank_index)
        b = lora_B.index_select(1, p.rank_index)
        h = xl @ a.t()
        s = _slot_scale(scaling, p.slot_feature, None, cdt)
        if p.example_mask is None:
            h = h * s
        else:
            ex_scale = p.example_mask.to(cdt) * s  # (B, R_p)
            if p.batched_shape is not None:
                B, L = p.batched_shape
                h = (h.view(B, L, -1) * ex_scale[:, None, :]).view(B * L, -1)
            else:
                h = h * ex_scale.index_select(0, p.token_example)
        if h_hook is not None:
            h = h_hook(h)
        out = h @ b.t()
    else:
        N, C = p.chunk_shape
        ridx, feat, valid = p.chunk_slots
        R = ridx.shape[1]
        a = lora_A.index_select(0, ridx.flatten()).view(N, R, in_f)
        b = lora_B.index_select(1, ridx.flatten()).view(out_f, N, R).permute(1, 2, 0)
        if p.dest is None:
            xc = xl.view(N, C, in_f)
        else:
            src = xl if p.active_tokens is None else xl.index_select(0, p.active_tokens)
            xc = xl.new_zeros(N * C, in_f).index_copy(0, p.dest, src).view(N, C, in_f)
        h = torch.bmm(xc, a.transpose(1, 2)) * _slot_scale(scaling, feat, valid, cdt)[:, None, :]
        if h_hook is not None:
            h = h_hook(h)
        d = torch.bmm(h, b).view(N * C, out_f)
        if p.dest is None:
            out = d
        else:
            d = d.index_select(0, p.dest)
            out = d if p.active_tokens is None else d.new_zeros(x2d.shape[0], out_f).index_copy(0, p.active_tokens, d)
    return out.to(x.dtype).view(*x.shape[:-1], out_f)


def linear(x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, generator):
    """``F.linear(x, weight, bias) + delta(...)``, in the base output's dtype (autocast's if on)."""
    y = F.linear(x, weight, bias)
    return y + delta(x, lora_A, lora_B, routing, scaling, dropout_p, generator).to(y.dtype)
