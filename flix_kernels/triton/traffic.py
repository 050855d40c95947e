"""The memory traffic of a FLix layer's Triton launches, on paper: for each launch of a forward
and a backward, its FLOPs, its *floor* (every byte it must touch, once) and its *tile traffic*
(the bytes its grid of programs loads and stores, with no reuse between programs: what DRAM
would serve without an L2 hit). Their ratio shows a design that re-reads an operand (x or dy
once per feature, H once per n-tile) before any GPU time is spent.

The model follows the launchers: the same ``config`` of each family, the same grids and the same
choice of weight-gradient path. It covers the batched layout (B examples of L tokens, L a
multiple of the token tile, every example using ``active`` features of rank ``rank``), with the
cuBLAS base GEMM and an in-place expand (the backend's default) or with the fused base GEMM,
and g and dB from one pass over dy or from two, as the launcher decides (``OVERRIDES`` apply).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._launch import cdiv, next_pow2
from . import expand, shrink, weight_grad
from .tuning import DOT_MIN


@dataclass(frozen=True)
class Batch:
    """A batched layer call: ``examples`` x ``seq_len`` tokens, ``in_features`` -> ``out_features``,
    each example with ``active`` features of ``rank``; ``present`` distinct features in the batch
    out of ``num_features``; activations in ``dtype``, adapters in ``adapter_dtype``."""

    examples: int
    seq_len: int
    in_features: int
    out_features: int
    active: int
    rank: int
    present: int
    num_features: int
    dtype: torch.dtype = torch.bfloat16
    adapter_dtype: torch.dtype = torch.bfloat16

    @property
    def tokens(self) -> int:
        return self.examples * self.seq_len

    @property
    def slots(self) -> int:
        return self.active * self.rank


@dataclass(frozen=True)
class Launch:
    """One launch: ``name`` (what it computes, and the kernel path in parentheses), its FLOPs, its
    floor and tile traffic in bytes, and of the latter, ``streamed_reads``: the bytes of the
    (T, in|out) activation it streams (x, dy; or y, dx), the operand a re-read costs most."""

    name: str
    flops: float
    floor_bytes: float
    tile_bytes: float
    streamed_reads: float = 0.0

    @property
    def excess(self) -> float:
        """Tile traffic over the floor (1.0: every byte moved once)."""
        return self.tile_bytes / self.floor_bytes


def _shrink(name, b: Batch, rows: int, cols: int, sms: int) -> list[Launch]:
    """``H (T, R) = X (T, cols) M_S^T``, M with ``rows`` used rows (x: cols = in; dy: cols = out)."""
    T, R, ex, ea = b.tokens, b.slots, b.dtype.itemsize, b.adapter_dtype.itemsize
    cfg = shrink.config(T, cols, R, torch.device("cuda"), b.adapter_dtype, sms=sms)
    tiles_t, tiles_r = cdiv(T, cfg["BLOCK_T"]), cdiv(R, cfg["BLOCK_R"])
    splits = cfg["splits"]
    out = [Launch(f"{name} (shrink)", 2.0 * T * cols * R,
                  T * cols * ex + rows * cols * ea + splits * T * R * 4,
                  T * cols * ex * tiles_r + tiles_t * R * cols * ea + splits * T * R * 4, T * cols * ex * tiles_r)]
    if splits > 1:  # the fixed-order sum of the K-split partials (one torch op)
        out.append(Launch(f"{name} (split sum)", splits * T * R, (splits + 1) * T * R * 4, (splits + 1) * T * R * 4))
    return out


def _expand(name, b: Batch, rows: int, cols: int) -> Launch:
    """``Y (T, cols) += H M_S`` in place (mode 1), M with ``rows`` used rows."""
    T, R, ey, ea = b.tokens, b.slots, b.dtype.itemsize, b.adapter_dtype.itemsize
    cfg = expand.config(T, cols, 0, R, torch.device("cuda"), b.adapter_dtype, b.adapter_dtype)
    tiles_t, tiles_n = cdiv(T, cfg["BLOCK_T"]), cdiv(cols, cfg["BLOCK_N"])
    return Launch(f"{name} (expand)", 2.0 * T * cols * R,
                  T * R * 4 + rows * cols * ea + 2 * T * cols * ey,
                  T * R * 4 * tiles_n + tiles_t * R * cols * ea + 2 * T * cols * ey, T * cols * ey)


def _fused(name, b: Batch, rows: int, k_in: int, cols: int, sms: int) -> Launch:
    """``Y (T, cols) = X2 (T, k_in) W^T + H M_S`` in one GEMM tile (the fused base GEMM, mode 2
    or its TMA kernel), M with ``rows`` used rows; the base weight in the activations' dtype."""
    T, R, ex, ea = b.tokens, b.slots, b.dtype.itemsize, b.adapter_dtype.itemsize
    cfg = expand.config(T, cols, k_in, R, torch.device("cuda"), b.dtype, b.adapter_dtype, sms=sms)
    tiles_t, tiles_n = cdiv(T, cfg["BLOCK_T"]), cdiv(cols, cfg["BLOCK_N"])
    streamed = T * k_in * ex * tiles_n  # X2 once per column tile (L2 serves most of it)
    return Launch(f"{name} (fused GEMM)", 2.0 * T * k_in * cols + 2.0 * T * cols * R,
                  T * k_in * ex + cols * k_in * ex + T * cols * ex + T * R * 4 + rows * cols * ea,
                  streamed + tiles_t * cols * k_in * ex + T * cols * ex + T * R * 4 * tiles_n + tiles_t * R * cols * ea,
                  streamed)


def _weight_grad(name, b: Batch, cols: int, sms: int) -> list[Launch]:
    """``G (total_rank, cols)``: per feature, its tokens' ``L^T R`` (L the fp32 (T, R) h or g,
    R the (T, cols) dy or x); absent features get zero rows."""
    T, R, er, ea = b.tokens, b.slots, b.dtype.itemsize, b.adapter_dtype.itemsize
    cfg = weight_grad.config(R, torch.device("cuda"), sms=sms)
    tiles_n = cdiv(cols, cfg["BLOCK_N"])
    grad = b.num_features * b.rank * cols * ea  # every row written, zeros for absent features
    floor = T * R * 4 + T * cols * er + grad
    flops = 2.0 * T * R * cols
    pairs = b.examples * b.active
    block_s = min(next_pow2(R, DOT_MIN), cfg["BLOCK_S_MAX"])
    slot_blocks = cdiv(R, block_s)
    chunks = weight_grad.split_chunks(b.examples, tiles_n, b.seq_len, slot_blocks * block_s, cols, cfg)
    if weight_grad.owner_path(T, b.examples, pairs, b.present, tiles_n, cfg) or chunks < 1:
        # Every present feature walks the tokens of the examples that use it: each row of R is
        # read once per active feature of its example, each L column block once per n-tile.
        streamed = T * b.active * cols * er
        return [Launch(f"{name} (owner)", flops, floor, streamed + T * R * 4 * tiles_n + grad, streamed)]
    chunk = cdiv(cdiv(b.seq_len, chunks), cfg["BLOCK_T"]) * cfg["BLOCK_T"]
    chunks = cdiv(b.seq_len, chunk)
    ws = b.examples * chunks * R * cols * 4  # the stored rows (an example's slots) of every chunk
    streamed = T * cols * er * slot_blocks  # once per block of up to BLOCK_S_MAX slots
    return [Launch(f"{name} (split partials)", flops, T * R * 4 + T * cols * er + ws,
                   streamed + T * R * 4 * tiles_n + ws, streamed),
            Launch(f"{name} (split reduce)", pairs * chunks * b.rank * cols, ws + grad, ws + grad)]


def _dy_pass(b: Batch, used: int, sms: int) -> tuple[list[Launch], Launch] | None:
    """``(g and dB's partials from one read of dy [+ g's split sum], dB's reduce)``, or None
    where the launcher takes the two passes (see :func:`.weight_grad.dy_pass_plan`)."""
    T, N, R, ex, ea = b.tokens, b.out_features, b.slots, b.dtype.itemsize, b.adapter_dtype.itemsize
    cfg = weight_grad.dy_pass_config(R, torch.device("cuda"), b.adapter_dtype, sms=sms)
    plan = weight_grad.dy_pass_plan(T, N, R, b.examples, b.seq_len, cfg)
    if plan is None:
        return None
    tiles, splits, _ = plan
    ws = b.examples * tiles * R * N * 4  # each (example, token tile)'s slot rows, written once, read once
    g_out = splits * T * R * 4  # g, or its per-split partials
    streamed = T * N * ex
    one = Launch("g and dB partials (one pass over dy)", 4.0 * T * N * R,
                 streamed + T * R * 4 + used * N * ea + ws + g_out,
                 streamed + splits * T * R * 4 + b.examples * tiles * R * N * ea + ws + g_out, streamed)
    out = [one]
    if splits > 1:  # the fixed-order sum of g's split partials (one torch op)
        out.append(Launch("g (split sum)", splits * T * R, (splits + 1) * T * R * 4, (splits + 1) * T * R * 4))
    grad = b.num_features * b.rank * N * ea
    return out, Launch("dB (split reduce)", b.examples * b.active * tiles * b.rank * N, ws + grad, ws + grad)


def layer(b: Batch, sms: int = 132, fused: bool = False) -> dict[str, list[Launch]]:
    """The FLix launches of one layer's forward and backward: with cuBLAS base GEMMs (excluded
    here) and in-place expands, or with ``fused`` base GEMMs (``x W^T`` and ``dy W`` in the
    expand tile, included)."""
    used = min(b.present * b.rank, b.num_features * b.rank)  # rows of A / columns of B the batch reads
    K, N = b.in_features, b.out_features
    if fused:
        y, dx = _fused("y = x W^T + h B_S^T", b, used, K, N, sms), _fused("dx = dy W + g A_S", b, used, N, K, sms)
    else:
        y, dx = _expand("y += h B_S^T", b, used, N), _expand("dx += g A_S", b, used, K)
    forward = _shrink("h = x A_S^T", b, used, K, sms) + [y]
    one_pass = _dy_pass(b, used, sms)
    if one_pass is not None:  # in launch order: g and dB first, then dx, then dA
        backward = one_pass[0] + [one_pass[1], dx] + _weight_grad("dA", b, K, sms)
    else:
        backward = (_shrink("g = dy B_S", b, used, N, sms) + [dx]
                    + _weight_grad("dB", b, N, sms) + _weight_grad("dA", b, K, sms))
    return {"forward": forward, "backward": backward}

