"""Launchers of the Triton kernels: launch configurations by shape class, grids from shapes.

Every grid is computed from tensor shapes and host ints that the routing fixed when it was
built, never from device values, so a launch needs no host-device synchronisation and can be
captured in a CUDA graph. Block sizes are chosen per shape class (decode: at most 64 tokens;
prefill/training otherwise) by :func:`configs`; ``OVERRIDES`` replaces any of them (tests use
it to force K splits, token chunks and small tiles).

Autotuning (``FLIX_TRITON_AUTOTUNE=1``): the first launch of each kernel for a *shape class*
(decode or not, and the power-of-two buckets of tokens, N, K and R, the dtype and the mode)
times a few candidate configurations around the default on scratch outputs and keeps the
fastest for the process. Off by default so that a first call never waits on tuning; it is
skipped during CUDA-graph capture.
"""

from __future__ import annotations

import os
import time

import torch
import triton.language as tl

from .._launch import DECODE_TOKENS, cdiv, launch_triton, next_pow2, num_sms
from . import kernels

# Test/tuning hook: {"shrink": {...}, "expand": {...}, "rank_outer": {...}} entries override configs().
OVERRIDES: dict[str, dict] = {}
AUTOTUNE = os.environ.get("FLIX_TRITON_AUTOTUNE", "0") == "1"
_TUNED: dict[tuple, dict] = {}
# Workspace budget for the split weight-gradient reduction (bytes of fp32 partial tiles).
WORKSPACE_BYTES = 256 << 20

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul setting (tf32 only when torch allows it)."""
    # The getter behind torch.backends.cuda.matmul.allow_tf32, without its Python __getattr__.
    if dtype is torch.float32 and torch._C._get_cublas_allow_tf32():
        return "tf32"
    return "ieee"


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    return next_pow2(n, lo, hi)


def configs(kind: str, T: int, N: int, K: int, R: int, device: torch.device) -> dict:
    """Launch configuration of one kernel for one shape (untuned defaults; see the module doc)."""
    decode = T <= DECODE_TOKENS
    if kind == "shrink":
        cfg = dict(BLOCK_T=16 if decode else 64, BLOCK_R=_pow2(R, hi=64), BLOCK_K=128 if decode else 64,
                   num_warps=4)
        # Decode reads A_S once per example: split K so every SM streams a part of it.
        tiles = cdiv(T, cfg["BLOCK_T"]) * cdiv(R, cfg["BLOCK_R"])
        cfg["splits"] = max(1, min(cdiv(2 * num_sms(device), max(tiles, 1)), cdiv(K, cfg["BLOCK_K"])))
    elif kind == "expand":
        # 64 x 64 tiles: a 64 x 128 tile with 8 warps needs ~230 registers/thread on sm_90
        # (one CTA per SM) for what is a memory-bound read-modify-write of y.
        cfg = dict(BLOCK_T=16 if decode else 64, BLOCK_N=64, BLOCK_R=_pow2(R, hi=64), BLOCK_K=64, num_warps=4)
    elif kind == "rank_outer":
        rk = _pow2(R)
        cfg = dict(BLOCK_RK=rk, BLOCK_T=64, BLOCK_N=64 if rk <= 64 else 32, num_warps=4,
                   target_programs=4 * num_sms(device))
    else:
        raise ValueError(kind)
    cfg.update(OVERRIDES.get(kind, {}))
    if device.type != "cuda":
        cfg.pop("num_warps", None)
    return cfg


def _candidates(kind: str, cfg: dict) -> list[dict]:
    """Configurations tried around the default ``cfg`` (the default first)."""
    out = [cfg]
    if kind == "shrink":
        for bt in (16, 32, 64, 128):
            for bk in (32, 64, 128):
                out.append({**cfg, "BLOCK_T": bt, "BLOCK_K": bk})
    elif kind == "expand":
        for bt in (16, 32, 64, 128):
            for bn in (32, 64, 128, 256):
                for w in (4, 8):
                    out.append({**cfg, "BLOCK_T": bt, "BLOCK_N": bn, "num_warps": w})
    elif kind == "rank_outer":
        for bt in (32, 64, 128):
            for bn in (32, 64, 128):
                out.append({**cfg, "BLOCK_T": bt, "BLOCK_N": bn})
    if "num_warps" not in cfg:  # interpreter: no warps to vary
        out = [{k: v for k, v in c.items() if k != "num_warps"} for c in out]
    seen, unique = set(), []
    for c in out:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def _time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=25)
    start = time.perf_counter()  # interpreter: only the tuning logic is exercised
    fn()
    return (time.perf_counter() - start) * 1e3


def tuned(kind: str, cfg: dict, key: tuple, run, device: torch.device) -> dict:
    """``cfg``, or with autotuning on, the fastest candidate for this shape class.

    ``run(cfg)`` launches the kernel on scratch outputs (it must not change real results)."""
    if not AUTOTUNE or OVERRIDES.get(kind) or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return cfg
    key = (kind, device.type) + key
    if key not in _TUNED:
        best, best_ms = cfg, float("inf")
        for cand in _candidates(kind, cfg):
            try:
                ms = _time_ms(lambda: run(cand), device)
            except Exception:  # e.g. a tile that needs more shared memory than the device has
                continue
            if ms < best_ms:
                best, best_ms = cand, ms
        _TUNED[key] = best
    return _TUNED[key]


def choose(key: tuple, options: dict, device: torch.device) -> str:
    """With autotuning on, the fastest of ``options`` (name -> side-effect-free callable) for
    this shape class, timed once per process; else the first option."""
    if not AUTOTUNE or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return next(iter(options))
    key = ("choice", device.type) + key
    if key not in _TUNED:
        _TUNED[key] = min(options, key=lambda name: _time_ms(options[name], device))
    return _TUNED[key]


def _search_steps(num_examples: int) -> int:
    """Binary-lifting steps to find a token's example among ``num_examples`` (constexpr)."""
    return max(1, (max(num_examples, 1) - 1).bit_length())


def _bucket(n: int) -> int:
    return next_pow2(n)


def _launch_opts(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")}


def _blocks(cfg: dict, *names: str) -> dict:
    return {k: cfg[k] for k in names}


# Launch plans of shrink/expand by everything they depend on (shapes, flags, dtypes, the
# precision setting and the tests' OVERRIDES), so a repeated call only assembles its arguments.
_PLANS: dict[tuple, tuple] = {}
_MAX_PLANS = 4096  # cleared when full (batch shapes that keep changing)


def _remember(key: tuple, plan: tuple) -> tuple:
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def _overrides_key(kind: str) -> tuple:
    o = OVERRIDES.get(kind)
    return tuple(sorted(o.items())) if o else ()


def _shrink_plan(T, K, R, B, packed, has_scale, has_seed, compute_dtype, device):
    key = ("shrink", T, K, R, B, packed, has_scale, has_seed, compute_dtype, device, precision(compute_dtype),
           _overrides_key("shrink"))
    plan = _PLANS.get(key)
    if plan is None:
        cfg = configs("shrink", T, 0, K, R, device)
        splits = cfg["splits"]
        k_per_split = cdiv(cdiv(K, splits), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        splits = cdiv(K, k_per_split)
        grid = (cdiv(T, cfg["BLOCK_T"]), cdiv(R, cfg["BLOCK_R"]), splits)
        constexprs = dict(IS_PACKED=packed, SEARCH_STEPS=_search_steps(B), HAS_SCALE_TENSOR=has_scale,
                          HAS_DROPOUT=has_seed, COMPUTE_DTYPE=tl_dtype(compute_dtype),
                          PRECISION=precision(compute_dtype), **_blocks(cfg, "BLOCK_T", "BLOCK_R", "BLOCK_K"),
                          **_launch_opts(cfg))
        plan = _remember(key, (cfg, splits, k_per_split, grid, constexprs))
    return plan


def shrink(X, M, stride_mr, stride_mk, slot_rank, slot_feature, cu, scaling, scale, seed, p_drop, seq_len,
           compute_dtype) -> torch.Tensor:
    """``H (T, R_slots)`` fp32 = per-slot scale * drop(X) M_S^T, M_S the example's gathered rows."""
    T, K = X.shape
    B, R = slot_rank.shape
    H = torch.empty((T, R), device=X.device, dtype=torch.float32)
    if T == 0 or R == 0:
        return H
    if AUTOTUNE:
        def run(cfg, H=H):
            k_per = cdiv(cdiv(K, cfg["splits"]), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
            splits = cdiv(K, k_per)
            constexprs = dict(IS_PACKED=cu is not None, SEARCH_STEPS=_search_steps(B),
                              HAS_SCALE_TENSOR=scaling is not None, HAS_DROPOUT=seed is not None,
                              COMPUTE_DTYPE=tl_dtype(compute_dtype), PRECISION=precision(compute_dtype),
                              **_blocks(cfg, "BLOCK_T", "BLOCK_R", "BLOCK_K"), **_launch_opts(cfg))
            _launch_shrink(X, M, H, stride_mr, stride_mk, slot_rank, slot_feature, cu, scaling, scale, seed, p_drop,
                           seq_len, splits, k_per, (cdiv(T, cfg["BLOCK_T"]), cdiv(R, cfg["BLOCK_R"]), splits),
                           constexprs)

        key = (T <= DECODE_TOKENS, _bucket(T), _bucket(K), _bucket(R), X.dtype, M.dtype, seed is not None)
        run(tuned("shrink", configs("shrink", T, 0, K, R, X.device), key, lambda c: run(c, torch.empty_like(H)),
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
    launch_triton(kernels.shrink_kernel, grid,
                  X, M, out, slot_rank, slot_feature, _or(cu, slot_rank), _or(scaling, H), _or(seed, slot_rank),
                  T, K, R, B, seq_len, float(scale), float(p_drop), k_per_split,
                  *X.stride(), stride_mr, stride_mk, T * R, R, **constexprs)
    if splits > 1:
        torch.sum(out, dim=0, out=H)  # fixed order: deterministic


def expand(H, M, stride_mr, stride_mn, Y, slot_rank, slot_feature, cu, seq_len, compute_dtype, *, mode: int,
           X2=None, W2=None, stride_wn=0, stride_wk=0, bias=None, seed=None, p_drop=0.0) -> torch.Tensor:
    """``Y (T, N)``: mode 0 ``= U``, mode 1 ``+= U``, mode 2 ``= X2 W2^T + bias + U`` where
    ``U = drop(H M_S)`` (dropout only with a seed: the input-gradient path)."""
    T, N = Y.shape
    B, R = slot_rank.shape
    if T == 0 or N == 0 or (mode == 1 and R == 0):
        return Y
    K2 = X2.shape[1] if mode == 2 else 0
    base_dtype = X2.dtype if mode == 2 else compute_dtype
    flags = (mode, bias is not None, cu is not None, seed is not None)
    if AUTOTUNE:
        def run(cfg, Y=Y):
            _launch_expand(H, M, stride_mr, stride_mn, Y, slot_rank, slot_feature, cu, seq_len, mode, X2, W2,
                           stride_wn, stride_wk, bias, seed, p_drop,
                           (cdiv(T, cfg["BLOCK_T"]), cdiv(N, cfg["BLOCK_N"])),
                           _expand_constexprs(cfg, B, flags, compute_dtype, base_dtype))

        key = (T <= DECODE_TOKENS, _bucket(T), _bucket(N), _bucket(K2), _bucket(R), Y.dtype, M.dtype, mode,
               seed is not None)
        cfg = tuned("expand", configs("expand", T, N, K2, R, Y.device), key, lambda c: run(c, Y.clone()), Y.device)
        run(cfg)  # the tuning runs on a scratch copy: mode 1 accumulates
        return Y
    key = ("expand", T, N, K2, R, B, flags, compute_dtype, base_dtype, Y.device, precision(compute_dtype),
           precision(base_dtype), _overrides_key("expand"))
    plan = _PLANS.get(key)
    if plan is None:
        cfg = configs("expand", T, N, K2, R, Y.device)
        plan = _remember(key, ((cdiv(T, cfg["BLOCK_T"]), cdiv(N, cfg["BLOCK_N"])),
                               _expand_constexprs(cfg, B, flags, compute_dtype, base_dtype)))
    _launch_expand(H, M, stride_mr, stride_mn, Y, slot_rank, slot_feature, cu, seq_len, mode, X2, W2, stride_wn,
                   stride_wk, bias, seed, p_drop, *plan)
    return Y


def _expand_constexprs(cfg, B, flags, compute_dtype, base_dtype) -> dict:
    mode, has_bias, packed, has_seed = flags
    return dict(MODE=mode, HAS_BIAS=has_bias, IS_PACKED=packed, SEARCH_STEPS=_search_steps(B), HAS_DROPOUT=has_seed,
                COMPUTE_DTYPE=tl_dtype(compute_dtype), BASE_DTYPE=tl_dtype(base_dtype),
                PRECISION=precision(compute_dtype), BASE_PRECISION=precision(base_dtype),
                **_blocks(cfg, "BLOCK_T", "BLOCK_N", "BLOCK_R", "BLOCK_K"), **_launch_opts(cfg))


def _launch_expand(H, M, stride_mr, stride_mn, Y, slot_rank, slot_feature, cu, seq_len, mode, X2, W2, stride_wn,
                   stride_wk, bias, seed, p_drop, grid, constexprs):
    T, N = Y.shape
    B, R = slot_rank.shape
    if mode == 2:
        K2 = X2.shape[1]
        stride_xm, stride_xk = X2.stride()
    else:
        K2 = stride_xm = stride_xk = 0
    launch_triton(kernels.expand_kernel, grid,
                  H, M, Y, _or(X2, Y), _or(W2, Y), _or(bias, Y), slot_rank, slot_feature, _or(cu, slot_rank),
                  _or(seed, slot_rank),
                  T, N, K2, R, B, seq_len, float(p_drop),
                  H.stride(0), stride_mr, stride_mn, *Y.stride(), stride_xm, stride_xk, stride_wn, stride_wk,
                  **constexprs)


def weight_grad(Lmat, Rmat, G, stride_gr, stride_gn, meta, seq_len, max_len, compute_dtype, *, seed=None,
                p_drop=0.0) -> torch.Tensor:
    """Rows of ``G`` per feature k: ``G[k's rows, n] = sum over k's tokens t of L[t, slot] drop(R)[t, n]``.

    Segment-owned and deterministic (no atomics). When the (feature, n-tile) programs fill the
    device, each owns its tile and walks the feature's tokens; otherwise common features are
    split: one program per (pair, token chunk, n-tile) writes its own fp32 tile, then one per
    (feature, n-tile) adds them in a fixed order. Features absent from the batch get zero rows."""
    T, N = Rmat.shape
    P = meta.pair_example.numel()
    F = meta.feature_rank.numel()
    rk = max(meta.max_pair_rank, 1)
    cu = meta.cu_seqlens
    max_len = max(int(max_len), 1)

    def run(cfg, G=G):
        BRK, BN, BT = cfg["BLOCK_RK"], cfg["BLOCK_N"], cfg["BLOCK_T"]
        tiles_n = cdiv(N, BN)
        common = dict(IS_PACKED=cu is not None, HAS_DROPOUT=seed is not None, COMPUTE_DTYPE=tl_dtype(compute_dtype),
                      PRECISION=precision(compute_dtype), BLOCK_T=BT, BLOCK_N=BN, **_launch_opts(cfg))
        # Owner path when one program per (present feature, n-tile) fills the device, or when
        # the batch has at most DECODE_TOKENS tokens (each owner walks a few tokens; a second
        # launch and a workspace would cost more than the parallelism gains); else split: one
        # program per (pair, token chunk, n-tile), at least BLOCK_T tokens per chunk, within the
        # workspace budget, then a fixed-order reduction.
        owner = T <= DECODE_TOKENS or meta.present_features.shape[0] * tiles_n >= cfg["target_programs"]
        chunks = max(1, min(cdiv(cfg["target_programs"], max(P * tiles_n, 1)), cdiv(max_len, BT)))
        chunks = min(chunks, WORKSPACE_BYTES // max(max(P, 1) * BRK * N * 4, 1))
        if cfg.get("force_split"):
            owner = False
        if owner or chunks < 1 or P == 0 or T == 0:
            brk = min(BRK, 64)
            launch_triton(kernels.rank_grad_kernel, (F, tiles_n, cdiv(meta.max_feature_rank, brk)),
                Lmat, Rmat, G, meta.feature_pair_start, meta.pair_example, meta.pair_slot, meta.rank_offsets,
                _or(cu, meta.pair_example), _or(seed, meta.pair_example),
                N, seq_len, float(p_drop), Lmat.stride(0), Rmat.stride(0), Rmat.stride(1), stride_gr, stride_gn,
                BLOCK_RK=brk, **common,
            )
            return
        chunk = cdiv(cdiv(max_len, chunks), BT) * BT
        chunks = cdiv(max_len, chunk)
        ws = torch.empty(P * chunks * BRK * N, device=Rmat.device, dtype=torch.float32)
        launch_triton(kernels.rank_outer_kernel, (P, chunks, tiles_n),
            Lmat, Rmat, ws, meta.pair_example, meta.pair_slot, meta.pair_feature, meta.feature_rank,
            _or(cu, meta.pair_example), _or(seed, meta.pair_example),
            N, seq_len, chunk, chunks, float(p_drop), Lmat.stride(0), Rmat.stride(0), Rmat.stride(1),
            BLOCK_RK=BRK, **common,
        )
        red_rk = min(BRK, 64)
        launch_triton(kernels.rank_reduce_kernel, (F, tiles_n, cdiv(meta.max_feature_rank, red_rk)),
            ws, G, meta.feature_pair_start, meta.pair_example, meta.rank_offsets, _or(cu, meta.pair_example),
            N, seq_len, chunk, chunks, BRK, stride_gr, stride_gn,
            IS_PACKED=cu is not None, BLOCK_RK=red_rk, BLOCK_N=BN,
        )

    cfg = configs("rank_outer", T, N, 0, rk, Rmat.device)
    if AUTOTUNE:
        key = (_bucket(T), _bucket(N), _bucket(rk), _bucket(P), Rmat.dtype, Lmat.dtype, seed is not None)
        cfg = tuned("rank_outer", cfg, key, lambda c: run(c, torch.empty_like(G)), Rmat.device)
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
    if T > DECODE_TOKENS or T == 0 or F == 0 or AUTOTUNE or "rank_outer" in OVERRIDES:
        weight_grad(H, dY, dB, stride_br, stride_bn, meta, seq_len, max_len, compute_dtype)
        weight_grad(Gm, X, dA, stride_ar, stride_an, meta, seq_len, max_len, compute_dtype, seed=seed, p_drop=p_drop)
        return
    cu = meta.cu_seqlens
    key = ("pair", T, N0, N1, F, meta.max_pair_rank, meta.max_feature_rank, cu is not None, seed is not None,
           compute_dtype, dY.device, precision(compute_dtype))
    plan = _PLANS.get(key)
    if plan is None:
        cfg = configs("rank_outer", T, N0, 0, max(meta.max_pair_rank, 1), dY.device)
        BN, brk = cfg["BLOCK_N"], min(cfg["BLOCK_RK"], 64)
        tiles0, tiles1 = cdiv(N0, BN), cdiv(N1, BN)
        plan = _remember(key, (tiles0, (F, tiles0 + tiles1, cdiv(meta.max_feature_rank, brk)),
                               dict(IS_PACKED=cu is not None, HAS_DROPOUT=seed is not None,
                                    COMPUTE_DTYPE=tl_dtype(compute_dtype), PRECISION=precision(compute_dtype),
                                    BLOCK_RK=brk, BLOCK_T=cfg["BLOCK_T"], BLOCK_N=BN, **_launch_opts(cfg))))
    tiles0, grid, constexprs = plan
    if grid[1] == 0:
        return
    launch_triton(kernels.rank_grad_pair_kernel, grid,
                  H, dY, dB, N0, H.stride(0), *dY.stride(), stride_br, stride_bn, tiles0,
                  Gm, X, dA, N1, Gm.stride(0), *X.stride(), stride_ar, stride_an,
                  meta.feature_pair_start, meta.pair_example, meta.pair_slot, meta.rank_offsets,
                  _or(cu, meta.pair_example), _or(seed, meta.pair_example), seq_len, float(p_drop), **constexprs)


def keep_mask(seed: torch.Tensor, T: int, K: int, p_drop: float) -> torch.Tensor:
    """The (T, K) bool dropout keep-mask the kernels use for ``seed`` (tests, debugging)."""
    out = torch.empty(T, K, device=seed.device, dtype=torch.int8)
    if T and K:
        launch_triton(kernels.keep_mask_kernel, (cdiv(T, 16), cdiv(K, 64)), out, seed, T, K,
                      float(p_drop), BLOCK_T=16, BLOCK_K=64)
    return out.bool()


def _or(t, fallback):
    """A dummy pointer for an absent optional tensor (the kernel never reads it)."""
    return fallback if t is None else t
