"""Device helpers shared by the FLix Triton kernels (as ``csrc/common.cuh`` is for the CUDA ones),
and the dropout keep-mask.

Notation of every kernel family: T tokens (rows of the flattened input), B examples, each
owning a contiguous run of tokens (batched: ``seq_len`` tokens each; packed: ``cu_seqlens``).
Example e uses the *rank slots* ``slot_rank[e, :]`` (rows of lora_A / columns of lora_B of its
active features, concatenated; ``slot_feature[e, j] = -1`` marks padding). ``M`` is a low-rank
factor read through a row gather: ``M[slot_rank[e, j], k]`` with arbitrary strides, so lora_A
(shrink of x), lora_B^T (shrink of dy), lora_B (expand of h) and lora_A^T (expand of dh) are
one kernel each.

Token tiles may straddle examples (decode: one token per example); a program then loops over
the examples its rows belong to, masking the others. Masking is a select, never a product with
zero: the rows of other examples and the padding slots contribute exactly nothing even when a
feature's values are inf or NaN (``inf * 0`` is NaN). Dropout regenerates its keep-mask from
the element's (k, t) in every kernel that needs it (:func:`_keep`); the mask is never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import cdiv, launch_triton


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


def keep_mask(seed: torch.Tensor, T: int, K: int, p_drop: float) -> torch.Tensor:
    """The (T, K) bool dropout keep-mask the kernels use for ``seed`` (tests, debugging)."""
    out = torch.empty(T, K, device=seed.device, dtype=torch.int8)
    if T and K:
        launch_triton(keep_mask_kernel, (cdiv(T, 16), cdiv(K, 64)), out, seed, T, K, float(p_drop), BLOCK_T=16,
                      BLOCK_K=64)
    return out.bool()
