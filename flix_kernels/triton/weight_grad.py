"""The weight-gradient kernel family: per feature k, ``G[k's rows] = sum over k's tokens of
L[t, slots of k]^T drop(R)[t]`` (dB from (h, dy), dA from (g, x)), deterministic and without
atomics (``csrc/weight_grad.cu`` is the CUDA counterpart).

* :func:`rank_grad_kernel` (and :func:`rank_grad_pair_kernel`, dA and dB in one launch): one
  program per (feature, n-tile) owns its tile and walks the feature's tokens;
* :func:`example_outer_kernel` + :func:`rank_reduce_kernel`: segment-owned reductions. Program
  (example e, chunk, n-tile) sums ``L[t, j] * R[t, n]`` over one chunk of e's tokens for every
  slot j of e into its own workspace tile (one read of e's rows of R, however many features e
  uses); then program (feature k, n-tile) adds, in a fixed order, the rows of k's *pairs*
  (k, an example e having k) at k's slots in e, and writes the gradient rows of k (zeros for
  features not in the batch). Results are bit-identical run to run.
* :func:`dy_pass_kernel` (+ :func:`rank_reduce_kernel`): dB's split partials and ``g = s dy B_S``
  from one read of dy, for prefill backward passes (:func:`dy_pass`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import settings
from .._launch import DECODE_TOKENS, cdiv, launch_triton, next_pow2, num_sms
from .common import _keep, _token_range
from .tuning import (DOT_MIN, OVERRIDES, PLANS, autotuning, blocks, dot_kind, finish, launch_opts, or_,
                     overrides_key, precision, remember, tl_dtype, tuned)

# Workspace budget for the split weight-gradient reduction (bytes of fp32 partial tiles).
WORKSPACE_BYTES = 256 << 20
# FLIX_TRITON_DY_PASS=0: g and dB by two passes over dy everywhere (to compare the one-pass path).
USE_DY_PASS = settings.value("FLIX_TRITON_DY_PASS")


@triton.jit
def _outer_over_tokens(acc, L, R, seed, slot, offs_j, j_in, offs_n, n_in, t_begin, t_end, N, p_drop,
                       stride_lt, stride_rt, stride_rn, HAS_DROPOUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_T: tl.constexpr):
    """acc[n, j] += sum over tokens t in [t_begin, t_end) of drop(R)[t, n] * L[t, slot + j].

    The tile is accumulated transposed, (n, j): its rows are the BLOCK_N >= 64 columns of the
    gradient, so the dot has the M >= 64 that Hopper's warpgroup MMA (HGMMA) needs; with the
    rank (16 to 64) as M it falls back to mma.sync."""
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_in = offs_t < t_end
        offs_t64 = offs_t.to(tl.int64)
        lt = tl.load(L + offs_t64[:, None] * stride_lt + (slot + offs_j)[None, :],
                     mask=t_in[:, None] & j_in[None, :], other=0.0)
        r = tl.load(R + offs_t64[:, None] * stride_rt + offs_n.to(tl.int64)[None, :] * stride_rn,
                    mask=t_in[:, None] & n_in[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = _keep(seed, offs_t, offs_n, N, p_drop)
            r = tl.where(keep, r.to(tl.float32) * (1.0 / (1.0 - p_drop)), 0.0)
        acc += tl.dot(tl.trans(r.to(COMPUTE_DTYPE)), lt.to(COMPUTE_DTYPE), input_precision=PRECISION)
    return acc


@triton.jit
def _rank_grad_tile(k, pid_n, pid_j, L, R, G, feature_pair_start, pair_example, pair_slot, rank_offsets, cu_ptr,
                    seed_ptr, N, seq_len, p_drop, stride_lt, stride_rt, stride_rn, stride_gr, stride_gn,
                    IS_PACKED: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_RK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """One owner tile: G[rank_offsets[k] + j, n] for row block pid_j and n-tile pid_n of feature k."""
    r0 = tl.load(rank_offsets + k)
    rank = tl.load(rank_offsets + k + 1) - r0
    offs_j = pid_j * BLOCK_RK + tl.arange(0, BLOCK_RK)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_in = offs_j < rank
    n_in = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_RK), dtype=tl.float32)  # transposed: see _outer_over_tokens
    if pid_j * BLOCK_RK < rank:
        seed = 0
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        for p in range(tl.load(feature_pair_start + k), tl.load(feature_pair_start + k + 1)):
            start, end = _token_range(tl.load(pair_example + p), cu_ptr, seq_len, IS_PACKED)
            acc = _outer_over_tokens(acc, L, R, seed, tl.load(pair_slot + p), offs_j, j_in, offs_n, n_in, start,
                                     end, N, p_drop, stride_lt, stride_rt, stride_rn, HAS_DROPOUT, COMPUTE_DTYPE,
                                     PRECISION, BLOCK_T)
    g_ptrs = G + (r0 + offs_j).to(tl.int64)[None, :] * stride_gr + offs_n.to(tl.int64)[:, None] * stride_gn
    tl.store(g_ptrs, acc.to(G.dtype.element_ty), mask=n_in[:, None] & j_in[None, :])


@triton.jit
def rank_grad_kernel(
    L, R, G, feature_pair_start, pair_example, pair_slot, rank_offsets, cu_ptr, seed_ptr,
    N, seq_len, p_drop, stride_lt, stride_rt, stride_rn, stride_gr, stride_gn,
    IS_PACKED: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_RK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """G[rank_offsets[k] + j, n] = sum over feature k's tokens t of L[t, slot + j] * drop(R)[t, n].

    One program per (feature, n-tile, row block) owns its output tile and walks its pairs'
    tokens in order: no workspace, no atomics. Used where :func:`owner_path` says (decode
    sizes, or one feature per example); absent features get zero rows."""
    _rank_grad_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2), L, R, G, feature_pair_start, pair_example,
                    pair_slot, rank_offsets, cu_ptr, seed_ptr, N, seq_len, p_drop, stride_lt, stride_rt, stride_rn,
                    stride_gr, stride_gn, IS_PACKED, HAS_DROPOUT, COMPUTE_DTYPE, PRECISION, BLOCK_RK, BLOCK_T, BLOCK_N)


@triton.jit
def rank_grad_pair_kernel(
    L0, R0, G0, N0, stride_lt0, stride_rt0, stride_rn0, stride_gr0, stride_gn0, tiles_n0,
    L1, R1, G1, N1, stride_lt1, stride_rt1, stride_rn1, stride_gr1, stride_gn1,
    feature_pair_start, pair_example, pair_slot, rank_offsets, cu_ptr, seed_ptr, seq_len, p_drop,
    IS_PACKED: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_RK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Both weight gradients of a layer in one launch, by :func:`rank_grad_kernel`'s owner tiles:
    n-tiles below ``tiles_n0`` compute problem 0 (dB: L = h, R = dy, no dropout), the others
    problem 1 (dA: L = g, R = x, with the forward's dropout mask when HAS_DROPOUT)."""
    pid_n = tl.program_id(1)
    if pid_n < tiles_n0:
        _rank_grad_tile(tl.program_id(0), pid_n, tl.program_id(2), L0, R0, G0, feature_pair_start, pair_example,
                        pair_slot, rank_offsets, cu_ptr, seed_ptr, N0, seq_len, p_drop, stride_lt0, stride_rt0,
                        stride_rn0, stride_gr0, stride_gn0, IS_PACKED, False, COMPUTE_DTYPE, PRECISION, BLOCK_RK,
                        BLOCK_T, BLOCK_N)
    else:
        _rank_grad_tile(tl.program_id(0), pid_n - tiles_n0, tl.program_id(2), L1, R1, G1, feature_pair_start,
                        pair_example, pair_slot, rank_offsets, cu_ptr, seed_ptr, N1, seq_len, p_drop, stride_lt1,
                        stride_rt1, stride_rn1, stride_gr1, stride_gn1, IS_PACKED, HAS_DROPOUT, COMPUTE_DTYPE,
                        PRECISION, BLOCK_RK, BLOCK_T, BLOCK_N)


@triton.jit
def example_outer_kernel(
    L, R, WS, cu_ptr, seed_ptr,
    N, seq_len, chunk, num_chunks, R_slots, ws_rows, tiles_n, p_drop,
    stride_lt, stride_rt, stride_rn,
    IS_PACKED: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split path, first pass: ``WS[e, c, j, n]`` = the sum over chunk c of example e's tokens of
    ``L[t, j] * drop(R)[t, n]``, for all of e's rank slots j at once, so each row of R (dy or x)
    is read once per block of BLOCK_S slots (one block up to 128 slots), whatever the number of
    features its example uses. Grid axis 2 is (slot block, n-tile); ``ws_rows`` >= R_slots is the
    workspace row count per (example, chunk)."""
    e = tl.program_id(0)
    c = tl.program_id(1)
    pid_s = tl.program_id(2) // tiles_n
    pid_n = tl.program_id(2) % tiles_n
    start, end = _token_range(e, cu_ptr, seq_len, IS_PACKED)
    t_begin = start + c * chunk
    t_end = tl.minimum(t_begin + chunk, end)
    offs_j = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_in = offs_j < R_slots
    n_in = offs_n < N
    if t_begin < t_end:
        seed = 0
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        acc = tl.zeros((BLOCK_N, BLOCK_S), dtype=tl.float32)  # transposed: see _outer_over_tokens
        acc = _outer_over_tokens(acc, L, R, seed, 0, offs_j, j_in, offs_n, n_in, t_begin, t_end, N, p_drop,
                                 stride_lt, stride_rt, stride_rn, HAS_DROPOUT, COMPUTE_DTYPE, PRECISION, BLOCK_T)
        tile = ((e.to(tl.int64) * num_chunks + c) * ws_rows + offs_j[None, :]) * N + offs_n[:, None]
        tl.store(WS + tile, acc, mask=n_in[:, None] & j_in[None, :])


@triton.jit
def rank_reduce_kernel(
    WS, G, feature_pair_start, pair_example, pair_slot, rank_offsets, cu_ptr,
    N, seq_len, chunk, num_chunks, ws_rows, stride_gr, stride_gn,
    IS_PACKED: tl.constexpr, BLOCK_RK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split path, second pass: G[rank_offsets[k] + j, n] = the sum of feature k's workspace
    rows (each pair's example, at the feature's slots there), pairs then chunks, in a fixed
    order; features absent from the batch get zero rows."""
    k = tl.program_id(0)
    pid_n = tl.program_id(1)
    r0 = tl.load(rank_offsets + k)
    rank = tl.load(rank_offsets + k + 1) - r0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    p_begin = tl.load(feature_pair_start + k)
    p_end = tl.load(feature_pair_start + k + 1)
    # Features of rank > BLOCK_RK are covered by several row blocks (grid axis 2).
    offs_j = tl.program_id(2) * BLOCK_RK + tl.arange(0, BLOCK_RK)
    j_in = offs_j < rank
    acc = tl.zeros((BLOCK_RK, BLOCK_N), dtype=tl.float32)
    for p in range(p_begin, p_end):
        e = tl.load(pair_example + p)
        slot = tl.load(pair_slot + p)
        start, end = _token_range(e, cu_ptr, seq_len, IS_PACKED)
        n_c = (end - start + chunk - 1) // chunk
        for c in range(0, n_c):
            tile = ((tl.cast(e, tl.int64) * num_chunks + c) * ws_rows + slot + offs_j[:, None]) * N
            acc += tl.load(WS + tile + offs_n[None, :], mask=j_in[:, None] & n_in[None, :], other=0.0)
    g_ptrs = G + (r0 + offs_j).to(tl.int64)[:, None] * stride_gr + offs_n.to(tl.int64)[None, :] * stride_gn
    tl.store(g_ptrs, acc.to(G.dtype.element_ty), mask=j_in[:, None] & n_in[None, :])


@triton.jit
def dy_pass_kernel(
    DY, H, Mb, G, WS, slot_rank, slot_feature, cu_ptr, scaling,
    N, seq_len, R_slots, num_tiles, ws_rows, tiles_per_split, scale_const,
    stride_dt, stride_dn, stride_ht, stride_mr, stride_mn, stride_gs,
    IS_PACKED: tl.constexpr, HAS_SCALE_TENSOR: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One read of dy for both ``g = s * dy B_S`` and dB's split partials. Program (example e,
    token tile c of e, column split p) owns BLOCK_T tokens of e (all of its BLOCK_S >= R_slots
    slots) and the column tiles of split p; for each it reads the dy tile once and adds
    ``dy B_S`` to its g tile and stores ``dy^T h`` as the workspace tile of (e, c) that
    :func:`rank_reduce_kernel` sums. g's partial over the split's columns goes to
    ``G[p]`` (the launcher sums the splits in a fixed order); tokens whose example has no
    feature get zero rows and read nothing."""
    e = tl.program_id(0)
    c = tl.program_id(1)
    split = tl.program_id(2)
    start, end = _token_range(e, cu_ptr, seq_len, IS_PACKED)
    t_begin = start + c * BLOCK_T
    if t_begin < end:
        offs_t = t_begin + tl.arange(0, BLOCK_T)
        rows = offs_t < end
        offs_t64 = offs_t.to(tl.int64)
        offs_j = tl.arange(0, BLOCK_S)
        j_in = offs_j < R_slots
        feat = tl.load(slot_feature + e * R_slots + offs_j, mask=j_in, other=-1)
        valid = feat >= 0
        g = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
        if tl.max(valid.to(tl.int32), axis=0) > 0:
            ridx = tl.load(slot_rank + e * R_slots + offs_j, mask=valid, other=0).to(tl.int64)
            h = tl.load(H + offs_t64[:, None] * stride_ht + offs_j[None, :], mask=rows[:, None] & j_in[None, :],
                        other=0.0).to(COMPUTE_DTYPE)
            tile0 = ((e.to(tl.int64) * num_tiles + c) * ws_rows + offs_j[None, :]) * N
            for nt in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, tl.cdiv(N, BLOCK_N))):
                offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
                n_in = offs_n < N
                dy = tl.load(DY + offs_t64[:, None] * stride_dt + offs_n.to(tl.int64)[None, :] * stride_dn,
                             mask=rows[:, None] & n_in[None, :], other=0.0).to(COMPUTE_DTYPE)
                mb = tl.load(Mb + ridx[None, :] * stride_mr + offs_n.to(tl.int64)[:, None] * stride_mn,
                             mask=valid[None, :] & n_in[:, None], other=0.0).to(COMPUTE_DTYPE)
                g = tl.dot(dy, mb, g, input_precision=PRECISION)
                part = tl.dot(tl.trans(dy), h, input_precision=PRECISION)  # (n, j): see _outer_over_tokens
                tl.store(WS + tile0 + offs_n[:, None], part, mask=n_in[:, None] & j_in[None, :])
            if HAS_SCALE_TENSOR:
                s = tl.load(scaling + feat, mask=valid, other=0.0).to(tl.float32)
            else:
                s = tl.where(valid, scale_const, 0.0)
            g = g * s[None, :]
        tl.store(G + split.to(tl.int64) * stride_gs + offs_t64[:, None] * R_slots + offs_j[None, :], g,
                 mask=rows[:, None] & j_in[None, :])


def _reduce(ws, G, stride_gr, stride_gn, meta, N, seq_len, chunk, chunks, ws_rows, BN) -> None:
    """:func:`rank_reduce_kernel` over a workspace of ``chunks`` token chunks per example."""
    rk = min(next_pow2(max(meta.max_pair_rank, 1), DOT_MIN), 64)
    cu = meta.cu_seqlens
    launch_triton(rank_reduce_kernel, (meta.feature_rank.numel(), cdiv(N, BN), cdiv(meta.max_feature_rank, rk)),
                  ws, G, meta.feature_pair_start, meta.pair_example, meta.pair_slot, meta.rank_offsets,
                  or_(cu, meta.pair_example), N, seq_len, chunk, chunks, ws_rows, stride_gr, stride_gn,
                  IS_PACKED=cu is not None, BLOCK_RK=rk, BLOCK_N=BN)


def owner_path(T: int, examples: int, pairs: int, present_features: int, tiles_n: int, cfg: dict) -> bool:
    """Whether :func:`weight_grad` takes the owner path rather than the split one: at decode
    sizes (each owner walks a few tokens; a second launch and a workspace would cost more), or
    when no example uses more than one feature (the owners then read each row of R once too)
    and one program per present feature and n-tile fills the device. ``OVERRIDES["weight_grad"]``
    may force either path (``force_owner`` / ``force_split``)."""
    if cfg.get("force_split"):
        return False
    if cfg.get("force_owner") or T <= DECODE_TOKENS:
        return True
    return pairs <= examples and present_features * tiles_n >= cfg["target_programs"]


def split_chunks(examples: int, tiles_n: int, max_len: int, ws_rows: int, N: int, cfg: dict) -> int:
    """Token chunks per example of the split path: enough (example, chunk, n-tile) programs for
    the device, at least BLOCK_T tokens per chunk, within the workspace budget (0: over budget)."""
    chunks = max(1, min(cdiv(cfg["target_programs"], max(examples * tiles_n, 1)), cdiv(max_len, cfg["BLOCK_T"])))
    return min(chunks, WORKSPACE_BYTES // max(examples * ws_rows * N * 4, 1))


def config(R: int, device: torch.device, *, sms: int | None = None) -> dict:
    """Untuned launch configuration for ``R`` rank slots per example (see :mod:`.tuning`);
    ``sms`` as in :func:`.shrink.config`."""
    rk = next_pow2(R, DOT_MIN)
    # The tile is (n, rank) (see _outer_over_tokens): BLOCK_N = 64 rows for warpgroup MMA; 8 warps
    # keep the dropout variants at 64 rank rows free of register spills on sm_90.
    sms = num_sms(device) if sms is None else sms
    # BLOCK_S_MAX: the split path's slot block (an example's slots beyond it take more blocks).
    cfg = dict(BLOCK_RK=rk, BLOCK_S_MAX=128, BLOCK_T=64, BLOCK_N=64, num_warps=8, target_programs=4 * sms)
    return finish("weight_grad", cfg, device)


def candidates(cfg: dict) -> list[dict]:
    """Configurations autotuning tries around the default ``cfg`` (the default first)."""
    return [cfg] + [{**cfg, "BLOCK_T": bt, "BLOCK_N": bn} for bt in (32, 64, 128) for bn in (32, 64, 128)]


def weight_grad(Lmat, Rmat, G, stride_gr, stride_gn, meta, seq_len, max_len, compute_dtype, *, seed=None,
                p_drop=0.0) -> torch.Tensor:
    """Rows of ``G`` per feature k: ``G[k's rows, n] = sum over k's tokens t of L[t, slot] drop(R)[t, n]``.

    Segment-owned and deterministic (no atomics). Owner path (see :func:`owner_path`): one
    program per (feature, n-tile) owns its tile and walks the feature's tokens. Split path: one
    program per (example, token chunk, n-tile) computes every slot of its example from one read
    of its rows of R into its own fp32 tile, then one per (feature, n-tile) adds its pairs'
    rows in a fixed order. Features absent from the batch get zero rows."""
    T, N = Rmat.shape
    B, S = meta.slot_rank.shape
    P = meta.pair_example.numel()
    F = meta.feature_rank.numel()
    rk = max(meta.max_pair_rank, 1)
    cu = meta.cu_seqlens
    max_len = max(int(max_len), 1)

    def run(cfg, G=G):
        BN, BT = cfg["BLOCK_N"], cfg["BLOCK_T"]
        BS = min(next_pow2(S, DOT_MIN), cfg["BLOCK_S_MAX"])
        ws_rows = cdiv(S, BS) * BS
        tiles_n = cdiv(N, BN)
        common = dict(IS_PACKED=cu is not None, HAS_DROPOUT=seed is not None, COMPUTE_DTYPE=tl_dtype(compute_dtype),
                      PRECISION=precision(compute_dtype), BLOCK_T=BT, BLOCK_N=BN, **launch_opts(cfg))
        chunks = split_chunks(B, tiles_n, max_len, ws_rows, N, cfg)
        if owner_path(T, B, P, meta.present_features.shape[0], tiles_n, cfg) or chunks < 1 or P == 0 or T == 0:
            brk = min(next_pow2(rk, DOT_MIN), 64)
            launch_triton(rank_grad_kernel, (F, tiles_n, cdiv(meta.max_feature_rank, brk)),
                Lmat, Rmat, G, meta.feature_pair_start, meta.pair_example, meta.pair_slot, meta.rank_offsets,
                or_(cu, meta.pair_example), or_(seed, meta.pair_example),
                N, seq_len, float(p_drop), Lmat.stride(0), Rmat.stride(0), Rmat.stride(1), stride_gr, stride_gn,
                BLOCK_RK=brk, **common,
            )
            return
        chunk = cdiv(cdiv(max_len, chunks), BT) * BT
        chunks = cdiv(max_len, chunk)
        ws = torch.empty(B * chunks * ws_rows * N, device=Rmat.device, dtype=torch.float32)
        launch_triton(example_outer_kernel, (B, chunks, cdiv(S, BS) * tiles_n),
            Lmat, Rmat, ws, or_(cu, meta.pair_example), or_(seed, meta.pair_example),
            N, seq_len, chunk, chunks, S, ws_rows, tiles_n, float(p_drop), Lmat.stride(0), Rmat.stride(0),
            Rmat.stride(1),
            BLOCK_S=BS, **common,
        )
        _reduce(ws, G, stride_gr, stride_gn, meta, N, seq_len, chunk, chunks, ws_rows, BN)

    cfg = config(S, Rmat.device)
    if autotuning():
        key = (next_pow2(T), next_pow2(N), next_pow2(S), next_pow2(P), Rmat.dtype, Lmat.dtype, seed is not None)
        cfg = tuned("weight_grad", cfg, candidates, key, lambda c: run(c, torch.empty_like(G)), Rmat.device)
    run(cfg)
    return G


def weight_grad_pair(H, dY, dB, stride_br, stride_bn, Gm, X, dA, stride_ar, stride_an, meta, seq_len, max_len,
                     compute_dtype, *, seed=None, p_drop=0.0) -> None:
    """Both weight gradients of a layer: ``dB`` from ``(H, dY)`` (as ``weight_grad(H, dY, dB, ...)``)
    and ``dA`` from ``(Gm, X)`` with the dropout mask (as ``weight_grad(Gm, X, dA, ..., seed=...)``).
    One launch of the owner tiles at decode sizes (at most DECODE_TOKENS tokens), where each
    owner walks a few tokens; otherwise, or when tests or autotuning choose the path, the two
    :func:`weight_grad` calls."""
    T, N0 = dY.shape
    N1 = X.shape[1]
    F = meta.feature_rank.numel()
    if T > DECODE_TOKENS or T == 0 or F == 0 or autotuning() or "weight_grad" in OVERRIDES:
        weight_grad(H, dY, dB, stride_br, stride_bn, meta, seq_len, max_len, compute_dtype)
        weight_grad(Gm, X, dA, stride_ar, stride_an, meta, seq_len, max_len, compute_dtype, seed=seed, p_drop=p_drop)
        return
    cu = meta.cu_seqlens
    key = ("pair", T, N0, N1, F, meta.max_pair_rank, meta.max_feature_rank, cu is not None, seed is not None,
           compute_dtype, dY.device, precision(compute_dtype))
    plan = PLANS.get(key)
    if plan is None:
        cfg = config(max(meta.max_pair_rank, 1), dY.device)
        BN, brk = cfg["BLOCK_N"], min(cfg["BLOCK_RK"], 64)
        tiles0, tiles1 = cdiv(N0, BN), cdiv(N1, BN)
        plan = remember(key, (tiles0, (F, tiles0 + tiles1, cdiv(meta.max_feature_rank, brk)),
                               dict(IS_PACKED=cu is not None, HAS_DROPOUT=seed is not None,
                                    COMPUTE_DTYPE=tl_dtype(compute_dtype), PRECISION=precision(compute_dtype),
                                    BLOCK_RK=brk, BLOCK_T=cfg["BLOCK_T"], BLOCK_N=BN, **launch_opts(cfg))))
    tiles0, grid, constexprs = plan
    if grid[1] == 0:
        return
    launch_triton(rank_grad_pair_kernel, grid,
                  H, dY, dB, N0, H.stride(0), *dY.stride(), stride_br, stride_bn, tiles0,
                  Gm, X, dA, N1, Gm.stride(0), *X.stride(), stride_ar, stride_an,
                  meta.feature_pair_start, meta.pair_example, meta.pair_slot, meta.rank_offsets,
                  or_(cu, meta.pair_example), or_(seed, meta.pair_example), seq_len, float(p_drop), **constexprs)


# (tokens, columns) of the one-pass dy kernel's tile by dot kind (see tuning.dot_kind), for up to
# 32 / 64 / 128 slots: the largest that do not spill on sm_90 (tests/test_triton_compile.py).
DY_PASS_TILES = {"16-bit": ((256, 64), (128, 64), (64, 64)), "tf32": ((128, 64), (64, 64), (32, 64)),
                 "ieee": ((128, 64), (64, 32), (16, 32))}


def dy_pass_config(S: int, device: torch.device, dtype: torch.dtype, *, sms: int | None = None) -> dict:
    """Launch configuration of :func:`dy_pass` for ``S`` rank slots per example and ``dtype``
    operands (the adapters'); ``sms`` as in :func:`.shrink.config`. ``OVERRIDES["dy_pass"]``
    replaces entries (``off=True``: the two-pass path)."""
    bs = next_pow2(S, DOT_MIN)
    # All of an example's slots in one block (up to 128).
    tokens, columns = DY_PASS_TILES[dot_kind(dtype)][0 if bs <= 32 else 1 if bs <= 64 else 2]
    cfg = dict(BLOCK_S=bs, BLOCK_T=tokens, BLOCK_N=columns, num_warps=8, max_slots=128, min_tokens=DECODE_TOKENS + 1,
               target_programs=num_sms(device) if sms is None else sms, off=not USE_DY_PASS)
    return finish("dy_pass", cfg, device)


def dy_pass_plan(T: int, N: int, S: int, examples: int, max_len: int, cfg: dict) -> tuple[int, int, int] | None:
    """``(token tiles per example, column splits, column tiles per split)`` of the one-pass
    path, or None where it does not apply: decode sizes (below ``min_tokens``), more slots than
    one block holds, or a workspace over budget. The splits are the fewest (about a power of
    two) that give the device ``target_programs`` programs."""
    if cfg.get("off") or T < cfg["min_tokens"] or S == 0 or S > cfg["max_slots"]:
        return None
    tiles = cdiv(max(max_len, 1), cfg["BLOCK_T"])
    tiles_n = cdiv(N, cfg["BLOCK_N"])
    if examples * tiles * cfg["BLOCK_S"] * N * 4 > WORKSPACE_BYTES:
        return None
    splits = 1
    while examples * tiles * splits < cfg["target_programs"] and 2 * splits <= tiles_n:
        splits *= 2
    per_split = cdiv(tiles_n, splits)
    return tiles, cdiv(tiles_n, per_split), per_split


def dy_pass(dY, Mb, stride_mr, stride_mn, H, dB, stride_gr, stride_gn, meta, seq_len, max_len, scaling, scale,
            compute_dtype):
    """``g (T, S)`` fp32 ``= s * dY B_S`` and the rows of ``dB`` (as ``weight_grad(H, dY, dB, ...)``)
    from one read of dY (:func:`dy_pass_kernel`, then :func:`rank_reduce_kernel`); None, with
    nothing launched, where :func:`dy_pass_plan` says the two-pass path applies."""
    T, N = dY.shape
    B, S = meta.slot_rank.shape
    cu = meta.cu_seqlens
    key = ("dy_pass", T, N, S, B, max_len, cu is not None, scaling is not None, compute_dtype, dY.device,
           precision(compute_dtype), overrides_key("dy_pass"))
    plan = PLANS.get(key)
    if plan is None:
        cfg = dy_pass_config(S, dY.device, compute_dtype)
        shape = dy_pass_plan(T, N, S, B, max_len, cfg)
        plan = remember(key, None if shape is None else (shape, dict(
            IS_PACKED=cu is not None, HAS_SCALE_TENSOR=scaling is not None, COMPUTE_DTYPE=tl_dtype(compute_dtype),
            PRECISION=precision(compute_dtype), **blocks(cfg, "BLOCK_T", "BLOCK_S", "BLOCK_N"), **launch_opts(cfg))))
    if plan is None or meta.pair_example.numel() == 0:
        return None
    (tiles, splits, per_split), constexprs = plan
    BS = constexprs["BLOCK_S"]
    g = torch.empty((T, S), device=dY.device, dtype=torch.float32)
    parts = g if splits == 1 else torch.empty((splits, T, S), device=dY.device, dtype=torch.float32)
    ws = torch.empty(B * tiles * BS * N, device=dY.device, dtype=torch.float32)
    launch_triton(dy_pass_kernel, (B, tiles, splits),
                  dY, H, Mb, parts, ws, meta.slot_rank, meta.slot_feature, or_(cu, meta.slot_rank), or_(scaling, g),
                  N, seq_len, S, tiles, BS, per_split, float(scale), *dY.stride(), H.stride(0), stride_mr, stride_mn,
                  T * S, **constexprs)
    if splits > 1:
        torch.sum(parts, dim=0, out=g)  # fixed order: deterministic
    _reduce(ws, dB, stride_gr, stride_gn, meta, N, seq_len, constexprs["BLOCK_T"], tiles, BS, constexprs["BLOCK_N"])
    return g
