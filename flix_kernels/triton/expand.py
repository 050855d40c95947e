"""The expand kernel family: ``Y (=|+=) [X2 W2^T + bias] + drop(H M_S)``, each token against its
example's gathered rank slots (``csrc/expand.cu`` is the CUDA counterpart).

MODE (:class:`~flix_kernels._launch.ExpandMode`) 0 writes the update alone, 1 accumulates into Y
in place (after cuBLAS computed the base), 2 computes the base GEMM in the same tile (fused
forward, or fused ``dx = dy W + drop'(g A_S)``): :func:`expand_kernel` by pointers on any GPU, or on Hopper
:func:`fused_linear_tma_kernel`, the same tile with its GEMM operands moved by TMA on a
persistent grid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import settings
from .._launch import DECODE_TOKENS, ExpandMode, cdiv, launch_triton, next_pow2, num_sms
from .common import _keep, _token_range, _token_tile
from .tuning import (DOT_MIN, PLANS, autotuning, blocks, dot_kind, finish, launch_opts, or_, overrides_key,
                     precision, remember, search_steps, tl_dtype, tuned)

USE_TMA = settings.value("FLIX_TRITON_TMA")
try:  # host-side TMA descriptors (Triton 3.4 and later)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the Triton version
    TensorDescriptor = None


@triton.jit
def _grouped_tile(tile, tiles_t, tiles_n, GROUP_T: tl.constexpr):
    """``(pid_t, pid_n)`` of linear tile index ``tile``: groups of GROUP_T token tiles walk the
    column tiles together, so consecutive tiles share W's column tiles in L2."""
    per_group = GROUP_T * tiles_n
    first_t = (tile // per_group) * GROUP_T
    group_size = tl.minimum(tiles_t - first_t, GROUP_T)
    return first_t + (tile % per_group) % group_size, (tile % per_group) // group_size


@triton.jit
def _update_tile(H, M, slot_rank, slot_feature, cu_ptr, offs_t, e_first, e_last, offs_n, T, N, R_slots, seq_len,
                 stride_ht, stride_mr, stride_mn, IS_PACKED: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """``(lora, active)``: the fp32 (BLOCK_T, BLOCK_N) tile of ``H M_S`` for tokens ``offs_t``
    (of examples e_first..e_last) and columns ``offs_n``; ``active`` is 1 when some token of the
    tile uses a feature."""
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
    return lora, active


@triton.jit
def expand_kernel(
    H, M, Y, X2, W2, bias, slot_rank, slot_feature, cu_ptr, seed_ptr,
    T, N, K2, R_slots, B, seq_len, p_drop,
    stride_ht, stride_mr, stride_mn, stride_yt, stride_yn, stride_xt, stride_xk, stride_wn, stride_wk,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, IS_PACKED: tl.constexpr, SEARCH_STEPS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, BASE_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BASE_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_T: tl.constexpr,
):
    # One program per (token tile, column tile) on a 1-D grid, in groups of GROUP_T token tiles
    # that walk the column tiles together, so a fused base GEMM reuses W's tiles from L2.
    pid_t, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(T, BLOCK_T), tl.cdiv(N, BLOCK_N), GROUP_T)
    offs_t, e_first, e_last = _token_tile(pid_t, T, cu_ptr, B, seq_len, IS_PACKED, SEARCH_STEPS, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_in = offs_t < T
    n_in = offs_n < N
    offs_t64 = offs_t.to(tl.int64)

    lora, active = _update_tile(H, M, slot_rank, slot_feature, cu_ptr, offs_t, e_first, e_last, offs_n, T, N,
                                R_slots, seq_len, stride_ht, stride_mr, stride_mn, IS_PACKED, COMPUTE_DTYPE, PRECISION,
                                BLOCK_T, BLOCK_N, BLOCK_R)
    if HAS_DROPOUT:
        keep = _keep(tl.load(seed_ptr), offs_t, offs_n, N, p_drop)
        lora = tl.where(keep, lora * (1.0 / (1.0 - p_drop)), 0.0)

    y_ptrs = Y + offs_t64[:, None] * stride_yt + offs_n.to(tl.int64)[None, :] * stride_yn
    y_mask = t_in[:, None] & n_in[None, :]
    if MODE == 2:
        # The low-rank term seeds the base GEMM's accumulator: one (BLOCK_T, BLOCK_N) fp32 tile.
        acc = lora
        for k0 in range(0, K2, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_in = offs_k < K2
            a = tl.load(X2 + offs_t64[:, None] * stride_xt + offs_k.to(tl.int64)[None, :] * stride_xk,
                        mask=t_in[:, None] & k_in[None, :], other=0.0)
            w = tl.load(W2 + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k.to(tl.int64)[:, None] * stride_wk,
                        mask=n_in[None, :] & k_in[:, None], other=0.0)
            acc = tl.dot(a.to(BASE_DTYPE), w.to(BASE_DTYPE), acc, input_precision=BASE_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_mask)
    elif MODE == 1:
        # Tiles whose tokens use no feature leave Y untouched: no read, no write.
        if active > 0:
            y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (y + lora).to(Y.dtype.element_ty), mask=y_mask)
    else:
        tl.store(y_ptrs, lora.to(Y.dtype.element_ty), mask=y_mask)


@triton.jit
def fused_linear_tma_kernel(
    X2_desc, W2_desc, Y_desc, H, M, bias, slot_rank, slot_feature, cu_ptr, seed_ptr,
    T, N, K2, R_slots, B, seq_len, p_drop, stride_ht, stride_mr, stride_mn,
    W_ROWS_ARE_N: tl.constexpr, HAS_BIAS: tl.constexpr, IS_PACKED: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BASE_PRECISION: tl.constexpr,
    OUT_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_T: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    """Mode 2 of :func:`expand_kernel` for Hopper: ``Y = X2 W2^T + bias + drop(H M_S)`` with X2,
    W2 and Y through TMA tensor descriptors (a box past the edge reads zeros and is not
    written back, so no masks), on a persistent grid of NUM_PROGRAMS programs that walk the
    grouped tile order. W2 is stored (N, K2) (``W_ROWS_ARE_N``: the forward's weight) or (K2, N)
    (the weight itself in ``dx = dy W``); either way its rows are contiguous."""
    tiles_t = tl.cdiv(T, BLOCK_T)
    tiles_n = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), tiles_t * tiles_n, NUM_PROGRAMS):
        pid_t, pid_n = _grouped_tile(tile, tiles_t, tiles_n, GROUP_T)
        offs_t, e_first, e_last = _token_tile(pid_t, T, cu_ptr, B, seq_len, IS_PACKED, SEARCH_STEPS, BLOCK_T)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc, active = _update_tile(H, M, slot_rank, slot_feature, cu_ptr, offs_t, e_first, e_last, offs_n, T, N,
                                   R_slots, seq_len, stride_ht, stride_mr, stride_mn, IS_PACKED, COMPUTE_DTYPE,
                                   PRECISION, BLOCK_T, BLOCK_N, BLOCK_R)
        if HAS_DROPOUT:
            keep = _keep(tl.load(seed_ptr), offs_t, offs_n, N, p_drop)
            acc = tl.where(keep, acc * (1.0 / (1.0 - p_drop)), 0.0)
        t0 = pid_t * BLOCK_T
        n0 = pid_n * BLOCK_N
        for k0 in range(0, K2, BLOCK_K):
            a = X2_desc.load([t0, k0])
            if W_ROWS_ARE_N:
                w = W2_desc.load([n0, k0]).T
            else:
                w = W2_desc.load([k0, n0])
            acc = tl.dot(a, w, acc, input_precision=BASE_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        Y_desc.store([t0, n0], acc.to(OUT_DTYPE))


def config(T: int, N: int, K2: int, R: int, device: torch.device, dtype: torch.dtype, compute_dtype: torch.dtype, *,
           sms: int | None = None) -> dict:
    """Untuned launch configuration for one shape (see :mod:`.tuning`); ``K2 > 0``: the fused
    base GEMM (mode 2), through TMA on a persistent grid where the device has TMA (``TMA``);
    ``dtype``: the base GEMM's operands (the update's when ``K2 == 0``), ``compute_dtype``: the
    update's; ``sms`` as in :func:`.shrink.config`."""
    decode = T <= DECODE_TOKENS
    if decode:
        cfg = dict(BLOCK_T=16, BLOCK_N=64, BLOCK_R=next_pow2(R, DOT_MIN, 64), BLOCK_K=64, GROUP_T=1, num_warps=4)
    elif K2 > 0:
        # A GEMM tile (the update seeds its accumulator), grouped for L2 reuse of W; slot blocks of
        # at most 32 keep the dropout variant free of spills at 64 slots on sm_90. With TMA: one
        # program per SM, 4 stages of (x, W) boxes in shared memory. 128-byte K steps (64 bf16 or
        # fp16, 32 tf32) keep 4 stages and the output box under sm_90's 227 KiB. IEEE fp32 dots
        # (the base's or the update's) run on FMA units with their operands in registers: 64-token
        # tiles, and 16-wide K steps for an fp32 base, are the largest that do not spill. 128 x 256
        # tiles spill on sm_90 (a tile straddling examples needs a second accumulator) and 4
        # stages of them exceed shared memory.
        ieee = "ieee" in (dot_kind(dtype), dot_kind(compute_dtype))
        block_k = {"16-bit": 64, "tf32": 32, "ieee": 16}[dot_kind(dtype)]
        cfg = dict(BLOCK_T=64 if ieee else 128, BLOCK_N=128, BLOCK_R=next_pow2(R, DOT_MIN, 32), BLOCK_K=block_k,
                   GROUP_T=8, num_warps=8, TMA=has_tma(device), PROGRAMS=num_sms(device) if sms is None else sms,
                   TMA_STAGES=4)
    else:
        # 64 x 64 tiles with 8 warps for the in-place update: with 4 warps, up to 64 rank slots
        # and dropout reach 255 registers per thread and spill on sm_90 (test_triton_compile.py);
        # IEEE fp32 (FMA dots) takes slot blocks of 32.
        ieee = dot_kind(compute_dtype) == "ieee"
        cfg = dict(BLOCK_T=64, BLOCK_N=64, BLOCK_R=next_pow2(R, DOT_MIN, 32 if ieee else 64), BLOCK_K=64, GROUP_T=1,
                   num_warps=8)
    return finish("expand", cfg, device)


def has_tma(device: torch.device) -> bool:
    """Whether fused base GEMMs on ``device`` go through TMA descriptors: on Hopper and later,
    with a Triton that has host-side descriptors, unless ``FLIX_TRITON_TMA=0`` (to compare the
    pointer kernel); elsewhere only when ``OVERRIDES["expand"]["TMA"]``."""
    return (TensorDescriptor is not None and USE_TMA and device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device)[0] >= 9)


def candidates(cfg: dict) -> list[dict]:
    """Configurations autotuning tries around the default ``cfg`` (the default first)."""
    return [cfg] + [{**cfg, "BLOCK_T": bt, "BLOCK_N": bn, "num_warps": w}
                    for bt in (16, 32, 64, 128) for bn in (32, 64, 128, 256) for w in (4, 8)]


def expand(H, M, stride_mr, stride_mn, Y, slot_rank, slot_feature, cu, seq_len, compute_dtype, *,
           mode: ExpandMode,
           X2=None, W2=None, stride_wn=0, stride_wk=0, bias=None, seed=None, p_drop=0.0) -> torch.Tensor:
    """``Y (T, N)``: WRITE ``= U``, ACCUMULATE ``+= U``, FUSED_BASE ``= X2 W2^T + bias + U`` where
    ``U = drop(H M_S)`` (dropout only with a seed: the input-gradient path)."""
    T, N = Y.shape
    B, R = slot_rank.shape
    if T == 0 or N == 0 or (mode == ExpandMode.ACCUMULATE and R == 0):
        return Y
    fused = mode == ExpandMode.FUSED_BASE
    K2 = X2.shape[1] if fused else 0
    base_dtype = X2.dtype if fused else compute_dtype
    flags = (int(mode), bias is not None, cu is not None, seed is not None)
    if autotuning():
        def run(cfg, Y=Y):
            _launch_expand(H, M, stride_mr, stride_mn, Y, slot_rank, slot_feature, cu, seq_len, mode, X2, W2,
                           stride_wn, stride_wk, bias, seed, p_drop,
                           _plan(cfg, T, N, B, flags, compute_dtype, base_dtype))

        key = (T <= DECODE_TOKENS, next_pow2(T), next_pow2(N), next_pow2(K2), next_pow2(R), Y.dtype, M.dtype,
               int(mode), seed is not None)
        cfg = tuned("expand", config(T, N, K2, R, Y.device, base_dtype, compute_dtype), candidates, key,
                    lambda c: run(c, Y.clone()), Y.device)
        run(cfg)  # the tuning runs on a scratch copy: ACCUMULATE adds to Y
        return Y
    key = ("expand", T, N, K2, R, B, flags, compute_dtype, base_dtype, Y.device, precision(compute_dtype),
           precision(base_dtype), overrides_key("expand"))
    plan = PLANS.get(key)
    if plan is None:
        plan = remember(key, _plan(config(T, N, K2, R, Y.device, base_dtype, compute_dtype), T, N, B, flags,
                                   compute_dtype, base_dtype))
    _launch_expand(H, M, stride_mr, stride_mn, Y, slot_rank, slot_feature, cu, seq_len, mode, X2, W2, stride_wn,
                   stride_wk, bias, seed, p_drop, plan)
    return Y


def _plan(cfg, T, N, B, flags, compute_dtype, base_dtype) -> tuple:
    """``(grid, constexprs, tma)``: the launch of :func:`expand_kernel`, and for a fused base GEMM
    where ``cfg["TMA"]``, ``tma = (grid, constexprs)`` of :func:`fused_linear_tma_kernel` (taken
    when the operands' layout allows descriptors, see :func:`_descriptors`)."""
    mode, has_bias, packed, has_seed = flags
    common = dict(HAS_BIAS=has_bias, IS_PACKED=packed, SEARCH_STEPS=search_steps(B), HAS_DROPOUT=has_seed,
                  COMPUTE_DTYPE=tl_dtype(compute_dtype), PRECISION=precision(compute_dtype),
                  BASE_PRECISION=precision(base_dtype), **blocks(cfg, "BLOCK_T", "BLOCK_N", "BLOCK_R", "BLOCK_K",
                                                                   "GROUP_T"))
    tiles = cdiv(T, cfg["BLOCK_T"]) * cdiv(N, cfg["BLOCK_N"])
    tma = None
    if mode == ExpandMode.FUSED_BASE and cfg.get("TMA"):
        programs = min(tiles, cfg["PROGRAMS"])
        opts = {k: v for k, v in launch_opts(cfg).items() if k != "num_stages"}
        if "num_warps" in cfg:  # compiled (not the interpreter): the pipeline depth of the K loop
            opts["num_stages"] = cfg.get("TMA_STAGES", 3)
        # Descriptors need one dtype for X2, W2 and Y (see _descriptors): the output's is X2's.
        tma = ((programs,), dict(common, OUT_DTYPE=tl_dtype(base_dtype), NUM_PROGRAMS=programs, **opts))
    return (tiles,), dict(common, MODE=mode, BASE_DTYPE=tl_dtype(base_dtype), **launch_opts(cfg)), tma


def _descriptors(X2, W2, stride_wn, stride_wk, Y, constexprs):
    """``(X2, W2, Y)`` TMA descriptors and whether W2's rows are its N axis, or None where TMA
    cannot address them (mixed dtypes, no columns, a non-unit inner stride, row pitches or base
    addresses not 16-byte aligned): the pointer kernel then runs."""
    (T, K2), N, elt = X2.shape, Y.shape[1], X2.element_size()
    if not X2.dtype == W2.dtype == Y.dtype or K2 == 0:
        return None
    if stride_wk == 1:
        w_rows_are_n, w_shape, w_pitch = True, [N, K2], stride_wn
    elif stride_wn == 1:
        w_rows_are_n, w_shape, w_pitch = False, [K2, N], stride_wk
    else:
        return None
    for t, inner, pitch in ((X2, X2.stride(1), X2.stride(0)), (W2, 1, w_pitch), (Y, Y.stride(1), Y.stride(0))):
        if inner != 1 or (pitch * elt) % 16 or t.data_ptr() % 16:
            return None
    bt, bn, bk = constexprs["BLOCK_T"], constexprs["BLOCK_N"], constexprs["BLOCK_K"]
    return (TensorDescriptor(X2, [T, K2], [X2.stride(0), 1], [bt, bk]),
            TensorDescriptor(W2, w_shape, [w_pitch, 1], [bn, bk] if w_rows_are_n else [bk, bn]),
            TensorDescriptor(Y, [T, N], [Y.stride(0), 1], [bt, bn]), w_rows_are_n)


def _launch_expand(H, M, stride_mr, stride_mn, Y, slot_rank, slot_feature, cu, seq_len, mode, X2, W2, stride_wn,
                   stride_wk, bias, seed, p_drop, plan):
    T, N = Y.shape
    B, R = slot_rank.shape
    grid, constexprs, tma = plan
    if tma is not None:
        descriptors = _descriptors(X2, W2, stride_wn, stride_wk, Y, tma[1])
        if descriptors is not None:
            x_desc, w_desc, y_desc, w_rows_are_n = descriptors
            launch_triton(fused_linear_tma_kernel, tma[0],
                          x_desc, w_desc, y_desc, H, M, or_(bias, Y), slot_rank, slot_feature, or_(cu, slot_rank),
                          or_(seed, slot_rank), T, N, X2.shape[1], R, B, seq_len, float(p_drop), H.stride(0),
                          stride_mr, stride_mn, W_ROWS_ARE_N=w_rows_are_n, **tma[1])
            return
    if mode == ExpandMode.FUSED_BASE:
        K2 = X2.shape[1]
        stride_xm, stride_xk = X2.stride()
    else:
        K2 = stride_xm = stride_xk = 0
    launch_triton(expand_kernel, grid,
                  H, M, Y, or_(X2, Y), or_(W2, Y), or_(bias, Y), slot_rank, slot_feature, or_(cu, slot_rank),
                  or_(seed, slot_rank),
                  T, N, K2, R, B, seq_len, float(p_drop),
                  H.stride(0), stride_mr, stride_mn, *Y.stride(), stride_xm, stride_xk, stride_wn, stride_wk,
                  **constexprs)
