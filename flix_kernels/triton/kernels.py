"""Triton kernels of the FLix low-rank update (forward and backward).

Notation: T tokens (rows of the flattened input), B examples, each owning a contiguous run of
tokens (batched: ``seq_len`` tokens each; packed: ``cu_seqlens``). Example e uses the *rank
slots* ``slot_rank[e, :]`` (rows of lora_A / columns of lora_B of its active features,
concatenated; ``slot_feature[e, j] = -1`` marks padding). ``M`` below is a low-rank factor read
through a row gather: ``M[slot_rank[e, j], k]`` with arbitrary strides, so lora_A (shrink of x),
lora_B^T (shrink of dy), lora_B (expand of h) and lora_A^T (expand of dh) are one kernel each.

* :func:`shrink_kernel`: ``H[t, j] = s_j * sum_k drop(X)[t, k] * M[slot[e(t), j], k]`` (fp32 out,
  optionally split over K into a workspace that the launcher sums in a fixed order).
* :func:`expand_kernel`: ``Y[t, n] (=|+=) [X2 W2^T + bias] + drop(sum_j H[t, j] M[slot[e(t), j], n])``;
  MODE 0 writes the update alone, MODE 1 accumulates into Y in place, MODE 2 computes the base
  GEMM in the same tile (fused forward or fused ``dx = dy W + dh A_S``).
* :func:`rank_grad_kernel` (and :func:`rank_grad_pair_kernel`, dA and dB in one launch): the
  weight gradients when one program per (feature, n-tile) owns its tile;
* :func:`rank_outer_kernel` + :func:`rank_reduce_kernel`: the weight gradients as segment-owned
  reductions. A *pair* is (feature k, example e having k); program (pair, chunk, n-tile) sums
  ``L[t, slot_k + j] * R[t, n]`` over one chunk of e's tokens into its own workspace tile, then
  program (feature, n-tile) adds its pairs' tiles in a fixed order and writes the gradient rows
  of k (zeros for features not in the batch). No atomics: results are bit-identical run to run.

Token tiles may straddle examples (decode: one token per example); a program then loops over
the examples its rows belong to, masking the others. Masking is a select, never a product with
zero: the rows of other examples and the padding slots contribute exactly nothing even when a
feature's values are inf or NaN (``inf * 0`` is NaN). Dropout regenerates its keep-mask from
(seed, t * K + k) in every kernel that needs it; the mask is never stored.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _example_of(t, cu_ptr, B, seq_len, IS_PACKED: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """Example owning token t: the last e < B with cu[e] <= t (so empty examples are skipped).

    Packed: binary lifting with a fixed number of steps (2**SEARCH_STEPS >= B) and masked
    loads; a data-dependent while loop here breaks older Triton compilers' passes."""
    if IS_PACKED:
        lo = t * 0
        for i in tl.static_range(SEARCH_STEPS):
            cand = lo + (1 << (SEARCH_STEPS - 1 - i))
            ok = cand < B
            v = tl.load(cu_ptr + cand, mask=ok, other=0)
            lo = tl.where(ok & (v <= t), cand, lo)
        return lo
    else:
        return t // seq_len


@triton.jit
def _token_tile(pid_t, T, cu_ptr, B, seq_len, IS_PACKED: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                BLOCK_T: tl.constexpr):
    """Tokens of tile ``pid_t`` and the first and last example they belong to."""
    t0 = pid_t * BLOCK_T
    offs_t = t0 + tl.arange(0, BLOCK_T)
    e_first = _example_of(t0, cu_ptr, B, seq_len, IS_PACKED, SEARCH_STEPS)
    e_last = _example_of(tl.minimum(t0 + BLOCK_T, T) - 1, cu_ptr, B, seq_len, IS_PACKED, SEARCH_STEPS)
    return offs_t, e_first, e_last


@triton.jit
def _token_range(e, cu_ptr, seq_len, IS_PACKED: tl.constexpr):
    if IS_PACKED:
        start = tl.load(cu_ptr + e)
        end = tl.load(cu_ptr + e + 1)
    else:
        start = e * seq_len
        end = start + seq_len
    return start, end


@triton.jit
def _keep(seed, offs_t, offs_k, K, p_drop):
    """Dropout keep-mask of elements (t, k) of a (T, K) input: same bits in every kernel.

    Philox on the counter pair (k, t) with 32-bit counters (T and K each < 2**32): cheaper than
    a 64-bit flat offset, and unique per element for any T * K."""
    c_k = (offs_k[None, :] + offs_t[:, None] * 0).to(tl.uint32)
    c_t = (offs_t[:, None] + offs_k[None, :] * 0).to(tl.uint32)
    zero = c_k * 0
    r, _, _, _ = tl.philox(seed, c_k, c_t, zero, zero)
    return tl.uint_to_uniform_float(r) >= p_drop


@triton.jit
def keep_mask_kernel(OUT, seed_ptr, T, K, p_drop, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Materialise the dropout keep-mask (tests and debugging only)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep(tl.load(seed_ptr), offs_t, offs_k, K, p_drop)
    mask = (offs_t[:, None] < T) & (offs_k[None, :] < K)
    tl.store(OUT + offs_t.to(tl.int64)[:, None] * K + offs_k[None, :], keep.to(tl.int8), mask=mask)


@triton.jit
def shrink_kernel(
    X, M, H, slot_rank, slot_feature, cu_ptr, scaling, seed_ptr,
    T, K, R_slots, B, seq_len, scale_const, p_drop, k_per_split,
    stride_xt, stride_xk, stride_mr, stride_mk, stride_hs, stride_ht,
    IS_PACKED: tl.constexpr, SEARCH_STEPS: tl.constexpr, HAS_SCALE_TENSOR: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_t, e_first, e_last = _token_tile(tl.program_id(0), T, cu_ptr, B, seq_len, IS_PACKED, SEARCH_STEPS, BLOCK_T)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_in = offs_r < R_slots
    k_begin = pid_s * k_per_split
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    h_ptrs = H + pid_s.to(tl.int64) * stride_hs + offs_t.to(tl.int64)[:, None] * stride_ht + offs_r[None, :]
    for e in range(e_first, e_last + 1):
        start, end = _token_range(e, cu_ptr, seq_len, IS_PACKED)
        rows = (offs_t >= start) & (offs_t < end) & (offs_t < T)
        feat = tl.load(slot_feature + e * R_slots + offs_r, mask=r_in, other=-1)
        valid = feat >= 0
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        if (end > start) & (tl.max(valid.to(tl.int32), axis=0) > 0):
            ridx = tl.load(slot_rank + e * R_slots + offs_r, mask=valid, other=0).to(tl.int64)
            for k0 in range(k_begin, tl.minimum(k_begin + k_per_split, K), BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_in = offs_k < K
                x = tl.load(X + offs_t.to(tl.int64)[:, None] * stride_xt + offs_k.to(tl.int64)[None, :] * stride_xk,
                            mask=rows[:, None] & k_in[None, :], other=0.0)
                if HAS_DROPOUT:
                    keep = _keep(seed, offs_t, offs_k, K, p_drop)
                    x = tl.where(keep, x.to(tl.float32) * (1.0 / (1.0 - p_drop)), 0.0)
                m = tl.load(M + ridx[None, :] * stride_mr + offs_k.to(tl.int64)[:, None] * stride_mk,
                            mask=valid[None, :] & k_in[:, None], other=0.0)
                acc += tl.dot(x.to(COMPUTE_DTYPE), m.to(COMPUTE_DTYPE), input_precision=PRECISION)
            if HAS_SCALE_TENSOR:
                s = tl.load(scaling + feat, mask=valid, other=0.0).to(tl.float32)
            else:
                s = tl.where(valid, scale_const, 0.0)
            acc = acc * s[None, :]
        tl.store(h_ptrs, acc, mask=rows[:, None] & r_in[None, :])


@triton.jit
def expand_kernel(
    H, M, Y, X2, W2, bias, slot_rank, slot_feature, cu_ptr, seed_ptr,
    T, N, K2, R_slots, B, seq_len, p_drop,
    stride_ht, stride_mr, stride_mn, stride_yt, stride_yn, stride_xt, stride_xk, stride_wn, stride_wk,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, IS_PACKED: tl.constexpr, SEARCH_STEPS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, BASE_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BASE_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(1)
    offs_t, e_first, e_last = _token_tile(tl.program_id(0), T, cu_ptr, B, seq_len, IS_PACKED, SEARCH_STEPS, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_in = offs_t < T
    n_in = offs_n < N
    offs_t64 = offs_t.to(tl.int64)

    lora = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    active = 0
    for e in range(e_first, e_last + 1):
        start, end = _token_range(e, cu_ptr, seq_len, IS_PACKED)
        rows = (offs_t >= start) & (offs_t < end) & t_in
        if end > start:
            for r0 in range(0, R_slots, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_in = offs_r < R_slots
                feat = tl.load(slot_feature + e * R_slots + offs_r, mask=r_in, other=-1)
                valid = feat >= 0
                if tl.max(valid.to(tl.int32), axis=0) > 0:
                    active = 1
                    ridx = tl.load(slot_rank + e * R_slots + offs_r, mask=valid, other=0).to(tl.int64)
                    h = tl.load(H + offs_t64[:, None] * stride_ht + offs_r[None, :],
                                mask=rows[:, None] & valid[None, :], other=0.0)
                    m = tl.load(M + ridx[:, None] * stride_mr + offs_n.to(tl.int64)[None, :] * stride_mn,
                                mask=valid[:, None] & n_in[None, :], other=0.0)
                    if e_first == e_last:
                        lora = tl.dot(h.to(COMPUTE_DTYPE), m.to(COMPUTE_DTYPE), lora, input_precision=PRECISION)
                    else:
                        # The other examples' rows of h read as 0, but 0 * inf is NaN: keep only e's rows.
                        part = tl.dot(h.to(COMPUTE_DTYPE), m.to(COMPUTE_DTYPE), input_precision=PRECISION)
                        lora += tl.where(rows[:, None], part, 0.0)
    if HAS_DROPOUT:
        keep = _keep(tl.load(seed_ptr), offs_t, offs_n, N, p_drop)
        lora = tl.where(keep, lora * (1.0 / (1.0 - p_drop)), 0.0)

    y_ptrs = Y + offs_t64[:, None] * stride_yt + offs_n.to(tl.int64)[None, :] * stride_yn
    y_mask = t_in[:, None] & n_in[None, :]
    if MODE == 2:
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K2, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_in = offs_k < K2
            a = tl.load(X2 + offs_t64[:, None] * stride_xt + offs_k.to(tl.int64)[None, :] * stride_xk,
                        mask=t_in[:, None] & k_in[None, :], other=0.0)
            w = tl.load(W2 + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k.to(tl.int64)[:, None] * stride_wk,
                        mask=n_in[None, :] & k_in[:, None], other=0.0)
            acc += tl.dot(a.to(BASE_DTYPE), w.to(BASE_DTYPE), input_precision=BASE_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, (acc + lora).to(Y.dtype.element_ty), mask=y_mask)
    elif MODE == 1:
        # Tiles whose tokens use no feature leave Y untouched: no read, no write.
        if active > 0:
            y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (y + lora).to(Y.dtype.element_ty), mask=y_mask)
    else:
        tl.store(y_ptrs, lora.to(Y.dtype.element_ty), mask=y_mask)


@triton.jit
def _outer_over_tokens(acc, L, R, seed, slot, offs_j, j_in, offs_n, n_in, t_begin, t_end, N, p_drop,
                       stride_lt, stride_rt, stride_rn, HAS_DROPOUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_T: tl.constexpr):
    """acc[j, n] += sum over tokens t in [t_begin, t_end) of L[t, slot + j] * drop(R)[t, n]."""
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_in = offs_t < t_end
        offs_t64 = offs_t.to(tl.int64)
        lt = tl.load(L + offs_t64[None, :] * stride_lt + (slot + offs_j)[:, None],
                     mask=j_in[:, None] & t_in[None, :], other=0.0)
        r = tl.load(R + offs_t64[:, None] * stride_rt + offs_n.to(tl.int64)[None, :] * stride_rn,
                    mask=t_in[:, None] & n_in[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = _keep(seed, offs_t, offs_n, N, p_drop)
            r = tl.where(keep, r.to(tl.float32) * (1.0 / (1.0 - p_drop)), 0.0)
        acc += tl.dot(lt.to(COMPUTE_DTYPE), r.to(COMPUTE_DTYPE), input_precision=PRECISION)
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
    acc = tl.zeros((BLOCK_RK, BLOCK_N), dtype=tl.float32)
    if pid_j * BLOCK_RK < rank:
        seed = 0
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        for p in range(tl.load(feature_pair_start + k), tl.load(feature_pair_start + k + 1)):
            start, end = _token_range(tl.load(pair_example + p), cu_ptr, seq_len, IS_PACKED)
            acc = _outer_over_tokens(acc, L, R, seed, tl.load(pair_slot + p), offs_j, j_in, offs_n, n_in, start,
                                     end, N, p_drop, stride_lt, stride_rt, stride_rn, HAS_DROPOUT, COMPUTE_DTYPE,
                                     PRECISION, BLOCK_T)
    g_ptrs = G + (r0 + offs_j).to(tl.int64)[:, None] * stride_gr + offs_n.to(tl.int64)[None, :] * stride_gn
    tl.store(g_ptrs, acc.to(G.dtype.element_ty), mask=j_in[:, None] & n_in[None, :])


@triton.jit
def rank_grad_kernel(
    L, R, G, feature_pair_start, pair_example, pair_slot, rank_offsets, cu_ptr, seed_ptr,
    N, seq_len, p_drop, stride_lt, stride_rt, stride_rn, stride_gr, stride_gn,
    IS_PACKED: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_RK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """G[rank_offsets[k] + j, n] = sum over feature k's tokens t of L[t, slot + j] * drop(R)[t, n].

    One program per (feature, n-tile, row block) owns its output tile and walks its pairs'
    tokens in order: no workspace, no atomics. Used when no feature needs splitting over
    tokens; absent features get zero rows."""
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
def rank_outer_kernel(
    L, R, WS, pair_example, pair_slot, pair_feature, feature_rank, cu_ptr, seed_ptr,
    N, seq_len, chunk, num_chunks, p_drop,
    stride_lt, stride_rt, stride_rn,
    IS_PACKED: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_RK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split version, first pass: WS[p, c, j, n] = the sum over chunk c of pair p's tokens.

    BLOCK_RK covers the largest rank of the batch's features (the workspace row count)."""
    p = tl.program_id(0)
    c = tl.program_id(1)
    pid_n = tl.program_id(2)
    rank = tl.load(feature_rank + tl.load(pair_feature + p))
    start, end = _token_range(tl.load(pair_example + p), cu_ptr, seq_len, IS_PACKED)
    t_begin = start + c * chunk
    t_end = tl.minimum(t_begin + chunk, end)
    offs_j = tl.arange(0, BLOCK_RK)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_in = offs_j < rank
    n_in = offs_n < N
    if t_begin < t_end:
        seed = 0
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        acc = tl.zeros((BLOCK_RK, BLOCK_N), dtype=tl.float32)
        acc = _outer_over_tokens(acc, L, R, seed, tl.load(pair_slot + p), offs_j, j_in, offs_n, n_in, t_begin,
                                 t_end, N, p_drop, stride_lt, stride_rt, stride_rn, HAS_DROPOUT, COMPUTE_DTYPE,
                                 PRECISION, BLOCK_T)
        tile = ((p.to(tl.int64) * num_chunks + c) * BLOCK_RK + offs_j[:, None]) * N + offs_n[None, :]
        tl.store(WS + tile, acc, mask=j_in[:, None] & n_in[None, :])


@triton.jit
def rank_reduce_kernel(
    WS, G, feature_pair_start, pair_example, rank_offsets, cu_ptr,
    N, seq_len, chunk, num_chunks, ws_rows, stride_gr, stride_gn,
    IS_PACKED: tl.constexpr, BLOCK_RK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split version, second pass: G[rank_offsets[k] + j, n] = the sum of feature k's workspace
    tiles, pairs then chunks, in a fixed order."""
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
        start, end = _token_range(e, cu_ptr, seq_len, IS_PACKED)
        n_c = (end - start + chunk - 1) // chunk
        for c in range(0, n_c):
            tile = ((tl.cast(p, tl.int64) * num_chunks + c) * ws_rows + offs_j[:, None]) * N
            acc += tl.load(WS + tile + offs_n[None, :], mask=j_in[:, None] & n_in[None, :], other=0.0)
    g_ptrs = G + (r0 + offs_j).to(tl.int64)[:, None] * stride_gr + offs_n.to(tl.int64)[None, :] * stride_gn
    tl.store(g_ptrs, acc.to(G.dtype.element_ty), mask=j_in[:, None] & n_in[None, :])
