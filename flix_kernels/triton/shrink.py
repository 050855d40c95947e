"""The shrink kernel family: ``H (T, R_slots) = s_S * drop(X) M_S^T`` in fp32, each token against
its example's gathered rank slots (``csrc/shrink.cu`` is the CUDA counterpart).

One program per (token tile, slot tile, K split); at decode sizes K is split so that every SM
streams a part of A_S, and the launcher adds the fp32 partials in a fixed order (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import DECODE_TOKENS, cdiv, launch_triton, next_pow2, num_sms
from .common import _keep, _token_range, _token_tile
from .tuning import (DOT_MIN, PLANS, autotuning, blocks, dot_kind, finish, launch_opts, or_, overrides_key,
                     precision, remember, search_steps, tl_dtype, tuned)


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


def config(T: int, K: int, R: int, device: torch.device, compute_dtype: torch.dtype = torch.bfloat16, *,
           sms: int | None = None) -> dict:
    """Untuned launch configuration for one shape (see :mod:`.tuning`); ``sms``: the device's SM
    count when known without asking it (the traffic model, ahead-of-time checks)."""
    decode = T <= DECODE_TOKENS
    # Prefill tiles: 8 warps and 128-byte K steps keep every variant (dropout, up to 64 rank
    # slots, fp32) free of register spills on sm_90 (tests/test_triton_compile.py reads the SASS).
    # IEEE fp32 dots run on FMA units with their operands in registers: 32 x 32 tiles (Triton 3.6
    # caps these kernels at 128 registers and spilled 64 x 32 with dropout).
    block_k = 128 if decode else 128 // max(compute_dtype.itemsize, 2)
    ieee = not decode and dot_kind(compute_dtype) == "ieee"
    cfg = dict(BLOCK_T=16 if decode else 32 if ieee else 64, BLOCK_R=next_pow2(R, DOT_MIN, 32 if ieee else 64),
               BLOCK_K=block_k, num_warps=4 if decode else 8)
    # Decode reads A_S once per example: split K so every SM streams a part of it.
    tiles = cdiv(T, cfg["BLOCK_T"]) * cdiv(R, cfg["BLOCK_R"])
    sms = num_sms(device) if sms is None else sms
    cfg["splits"] = max(1, min(cdiv(2 * sms, max(tiles, 1)), cdiv(K, cfg["BLOCK_K"])))
    return finish("shrink", cfg, device)


def candidates(cfg: dict) -> list[dict]:
    """Configurations autotuning tries around the default ``cfg`` (the default first)."""
    return [cfg] + [{**cfg, "BLOCK_T": bt, "BLOCK_K": bk} for bt in (16, 32, 64, 128) for bk in (32, 64, 128)]


def _shrink_plan(T, K, R, B, packed, has_scale, has_seed, compute_dtype, device):
    key = ("shrink", T, K, R, B, packed, has_scale, has_seed, compute_dtype, device, precision(compute_dtype),
           overrides_key("shrink"))
    plan = PLANS.get(key)
    if plan is None:
        cfg = config(T, K, R, device, compute_dtype)
        splits = cfg["splits"]
        k_per_split = cdiv(cdiv(K, splits), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        splits = cdiv(K, k_per_split)
        grid = (cdiv(T, cfg["BLOCK_T"]), cdiv(R, cfg["BLOCK_R"]), splits)
        constexprs = dict(IS_PACKED=packed, SEARCH_STEPS=search_steps(B), HAS_SCALE_TENSOR=has_scale,
                          HAS_DROPOUT=has_seed, COMPUTE_DTYPE=tl_dtype(compute_dtype),
                          PRECISION=precision(compute_dtype), **blocks(cfg, "BLOCK_T", "BLOCK_R", "BLOCK_K"),
                          **launch_opts(cfg))
        plan = remember(key, (cfg, splits, k_per_split, grid, constexprs))
    return plan


def shrink(X, M, stride_mr, stride_mk, slot_rank, slot_feature, cu, scaling, scale, seed, p_drop, seq_len,
           compute_dtype) -> torch.Tensor:
    """``H (T, R_slots)`` fp32 = per-slot scale * drop(X) M_S^T, M_S the example's gathered rows."""
    T, K = X.shape
    B, R = slot_rank.shape
    H = torch.empty((T, R), device=X.device, dtype=torch.float32)
    if T == 0 or R == 0:
        return H
    if autotuning():
        def run(cfg, H=H):
            k_per = cdiv(cdiv(K, cfg["splits"]), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
            splits = cdiv(K, k_per)
            constexprs = dict(IS_PACKED=cu is not None, SEARCH_STEPS=search_steps(B),
                              HAS_SCALE_TENSOR=scaling is not None, HAS_DROPOUT=seed is not None,
                              COMPUTE_DTYPE=tl_dtype(compute_dtype), PRECISION=precision(compute_dtype),
                              **blocks(cfg, "BLOCK_T", "BLOCK_R", "BLOCK_K"), **launch_opts(cfg))
            _launch_shrink(X, M, H, stride_mr, stride_mk, slot_rank, slot_feature, cu, scaling, scale, seed, p_drop,
                           seq_len, splits, k_per, (cdiv(T, cfg["BLOCK_T"]), cdiv(R, cfg["BLOCK_R"]), splits),
                           constexprs)

        key = (T <= DECODE_TOKENS, next_pow2(T), next_pow2(K), next_pow2(R), X.dtype, M.dtype, seed is not None)
        run(tuned("shrink", config(T, K, R, X.device, compute_dtype), candidates, key, lambda c: run(c, torch.empty_like(H)),
                  X.device))
        return H
    _, splits, k_per_split, grid, constexprs = _shrink_plan(T, K, R, B, cu is not None, scaling is not None,
                                                             seed is not None, compute_dtype, X.device)
    _launch_shrink(X, M, H, stride_mr, stride_mk, slot_rank, slot_feature, cu, scaling, scale, seed, p_drop, seq_len,
                   splits, k_per_split, grid, constexprs)
    return H


def _launch_shrink(X, M, H, stride_mr, stride_mk, slot_rank, slot_feature, cu, scaling, scale, seed, p_drop, seq_len,
                   splits, k_per_split, grid, constexprs):
    T, K = X.shape
    B, R = slot_rank.shape
    out = H if splits == 1 else torch.empty((splits, T, R), device=X.device, dtype=torch.float32)
    launch_triton(shrink_kernel, grid,
                  X, M, out, slot_rank, slot_feature, or_(cu, slot_rank), or_(scaling, H), or_(seed, slot_rank),
                  T, K, R, B, seq_len, float(scale), float(p_drop), k_per_split,
                  *X.stride(), stride_mr, stride_mk, T * R, R, **constexprs)
    if splits > 1:
        torch.sum(out, dim=0, out=H)  # fixed order: deterministic
