"""The fused factorized-embedding lookup of OFA: ``out[t] = P[ids[t]] @ Q``.

OFA factorizes an embedding matrix ``E (V x D)`` as coordinates ``P (V x k)`` times a primitive
``Q (k x D)``. :func:`factorized_embedding` looks tokens up without ever forming ``E``:

* backend "torch": ``F.embedding(ids, P, padding_idx) @ Q`` (the reference semantics);
* backend "triton": one kernel, grid (D tiles, token tiles), gathers the ``BLOCK_T x k`` rows
  of P for its tokens (in ``BLOCK_K`` chunks) and multiplies them by the ``k x BLOCK_D`` tile of
  Q with fp32 accumulation; neither ``E`` nor the ``T x k`` gathered rows reach global memory.
  Backward: ``dQ = P[ids]^T dout`` by a kernel whose programs each own one ``k x D`` tile of one
  token range and walk its token tiles in order (the gather again, no ``T x k`` copy), the
  ranges' fp32 partial sums then added in a fixed order; ``dP``: ``g = dout Q^T`` (``T x k``,
  fp32) by the same gather-matmul kernel, then the ids are sorted (stable) and a segment kernel
  sums each id's contiguous run of ``g`` rows in a fixed order and writes that row of ``dP``
  (one program per sorted position; runs are found on the device, no host sync).
  No atomics: gradients are bit-identical run to run. Rows not referenced, and the
  ``padding_idx`` row, get zero gradient (as ``nn.Embedding``).
* "auto": "torch". Measured on an H200 (bf16, 16k tokens, ``benchmarks/results/h200/ofa/``):
  the fused lookup ties with gather + cuBLAS at D = 1024 and is 1.3-1.4x slower at D = 4096,
  and its backward is slower than torch's (cuBLAS GEMMs and the sort-based, also deterministic,
  embedding backward). "triton" stays for what it alone gives: no ``T x k`` intermediate, and a
  single op that torch.compile and CUDA graphs take whole.

:func:`tied_logits` is the tied output head ``hidden Q^T P^T (+ bias)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._launch import cdiv, launch_triton, next_pow2, num_sms
from ..backends import BackendUnavailableError, unavailable_reason

try:  # Triton is optional; backend "triton" then reports why it is off (unavailable_reason).
    import triton
    import triton.language as tl

    from ..triton import tuning as _tuning
except Exception:  # pragma: no cover - depends on the install
    triton = tl = _tuning = None

__all__ = ["factorized_embedding", "tied_logits", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def gather_matmul_kernel(
        IDS, A, B, OUT, T, K, N, V,
        stride_am, stride_ak, stride_bk, stride_bn, stride_ot, stride_on,
        HAS_IDS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """``OUT[t, n] = sum_k A[row(t), k] B[k, n]`` with ``row(t) = IDS[t]`` (or t), fp32 acc.

        Forward: A = P, B = Q. Backward ``g = dout Q^T``: A = dout, no ids, B = Q^T by strides.
        An id outside ``[0, V)`` reads nothing and gives a NaN row (reachable only when the host
        check is skipped: under torch.compile or CUDA-graph capture)."""
        # program_id(0) (the fastest-launched axis) walks the N tiles, so the programs of one token
        # tile run side by side and read its gathered rows of A from L2, not from HBM each time.
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_in = offs_t < T
        n_in = offs_n < N
        if HAS_IDS:
            rows = tl.load(IDS + offs_t, mask=t_in, other=0).to(tl.int64)
            t_ok = t_in & (rows >= 0) & (rows < V)
        else:
            rows = offs_t.to(tl.int64)
            t_ok = t_in
        offs_n64 = offs_n.to(tl.int64)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_in = offs_k < K
            a = tl.load(A + rows[:, None] * stride_am + offs_k.to(tl.int64)[None, :] * stride_ak,
                        mask=t_ok[:, None] & k_in[None, :], other=0.0)
            b = tl.load(B + offs_k.to(tl.int64)[:, None] * stride_bk + offs_n64[None, :] * stride_bn,
                        mask=k_in[:, None] & n_in[None, :], other=0.0)
            acc += tl.dot(a.to(COMPUTE_DTYPE), b.to(COMPUTE_DTYPE), input_precision=PRECISION)
        if HAS_IDS:
            acc = tl.where(t_ok[:, None], acc, float("nan"))
        tl.store(OUT + offs_t.to(tl.int64)[:, None] * stride_ot + offs_n64[None, :] * stride_on,
                 acc.to(OUT.dtype.element_ty), mask=t_in[:, None] & n_in[None, :])

    @triton.jit
    def gathered_outer_kernel(
        IDS, A, G, OUT, T, K, N, V, tokens_per_split,
        stride_am, stride_ak, stride_gt, stride_gn, stride_os, stride_ok, stride_on,
        COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """``OUT[split, k, n] = sum over the split's tokens t of A[IDS[t], k] G[t, n]`` (partial
        dQ = P[ids]^T dout): each program owns one (k, n) tile of one token split and walks its
        token tiles in order (fp32). Ids outside ``[0, V)`` contribute nothing."""
        offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(2)
        k_in = offs_k < K
        n_in = offs_n < N
        offs_k64 = offs_k.to(tl.int64)
        offs_n64 = offs_n.to(tl.int64)
        t_lo = split * tokens_per_split
        t_hi = tl.minimum(t_lo + tokens_per_split, T)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_in = offs_t < t_hi
            rows = tl.load(IDS + offs_t, mask=t_in, other=0).to(tl.int64)
            t_ok = t_in & (rows >= 0) & (rows < V)
            at = tl.load(A + rows[None, :] * stride_am + offs_k64[:, None] * stride_ak,
                         mask=k_in[:, None] & t_ok[None, :], other=0.0)
            g = tl.load(G + offs_t.to(tl.int64)[:, None] * stride_gt + offs_n64[None, :] * stride_gn,
                        mask=t_in[:, None] & n_in[None, :], other=0.0)
            acc += tl.dot(at.to(COMPUTE_DTYPE), g.to(COMPUTE_DTYPE), input_precision=PRECISION)
        tl.store(OUT + split.to(tl.int64) * stride_os + offs_k64[:, None] * stride_ok + offs_n64[None, :] * stride_on,
                 acc, mask=k_in[:, None] & n_in[None, :])

    @triton.jit
    def segment_sum_kernel(
        G, ORDER, SORTED_IDS, RUN_END, OUT, K, V, padding_idx,
        stride_gt, stride_ov,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """``OUT[id, k] = sum of G[ORDER[j], k]`` over the run ``j in [s, RUN_END[s])`` of equal
        sorted ids that starts at position s, summed in a fixed order. Program s is one position of
        the sorted ids: it does the work if a run starts there and nothing otherwise, so the launch
        needs no count of distinct ids from the host. The padding row and ids outside ``[0, V)``
        are not written."""
        s = tl.program_id(0)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        row = tl.load(SORTED_IDS + s).to(tl.int64)
        prev = tl.load(SORTED_IDS + tl.maximum(s - 1, 0)).to(tl.int64)
        starts_run = (s == 0) | (prev != row)
        stop = tl.where(starts_run, tl.load(RUN_END + s), s)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for j0 in range(s, stop, BLOCK_T):
            offs_j = j0 + tl.arange(0, BLOCK_T)
            j_in = offs_j < stop
            tok = tl.load(ORDER + offs_j, mask=j_in, other=0).to(tl.int64)
            g = tl.load(G + tok[:, None] * stride_gt + offs_k[None, :], mask=j_in[:, None] & k_in[None, :], other=0.0)
            acc += tl.sum(g.to(tl.float32), axis=0)
        if starts_run & (row != padding_idx) & (row >= 0) & (row < V):
            tl.store(OUT + row * stride_ov + offs_k, acc.to(OUT.dtype.element_ty), mask=k_in)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# Launch configs by kernel role ("lookup", "grad_gather" = dout Q^T, "grad_primitive", "segment");
# benchmarks/tune_ofa.py sets entries here to time candidate configs on a GPU.
_CONFIG_OVERRIDE: dict = {}


def _blocks(role: str, T: int, K: int, N: int, device: torch.device) -> dict:
    """Tile sizes: small tiles in the interpreter (fast CPU tests), larger on the GPU. The GPU
    choices are the H200 sweep's (benchmarks/results/h200/ofa/tune_ofa.json): for both gather-matmul
    roles 128 x 256 (N) x 64 (K) tiles with 8 warps were fastest or within 5% on every shape but
    the k = 100 backward. The dQ and segment kernels keep their first configs: the best candidate
    gained at most 15% on dQ, and on the segment sum only uniform ids gained (0.44 -> 0.26 ms,
    with 8 x 512 tiles that lose on Zipf ids)."""
    if role in _CONFIG_OVERRIDE:
        return dict(_CONFIG_OVERRIDE[role])
    small = device.type != "cuda"
    block = lambda n, hi: next_pow2(n, _tuning.DOT_MIN, hi)  # noqa: E731
    if small:
        cfg = dict(BLOCK_T=block(T, 16), BLOCK_K=block(K, 32), BLOCK_N=block(N, 32))
    elif role in ("lookup", "grad_gather"):
        cfg = dict(BLOCK_T=128, BLOCK_K=64, BLOCK_N=block(N, 256), num_stages=3)
        cfg["num_warps"] = 8 if cfg["BLOCK_N"] == 256 else 4
    else:
        cfg = dict(BLOCK_T=block(T, 64), BLOCK_K=block(K, 64), BLOCK_N=block(N, 128), num_warps=4)
    if role == "segment":
        cfg.pop("BLOCK_N")
    return cfg


def _gather_matmul(ids: Optional[Tensor], V: int, A: Tensor, stride_am: int, stride_ak: int, B: Tensor,
                   stride_bk: int, stride_bn: int, T: int, K: int, N: int, out_dtype: torch.dtype,
                   compute_dtype: torch.dtype) -> Tensor:
    out = torch.empty(T, N, device=A.device, dtype=out_dtype)
    if T == 0 or N == 0:
        return out
    if K == 0:  # an empty sum, but an id out of range still gives its NaN row
        out.zero_()
        if ids is not None:
            out.masked_fill_(((ids < 0) | (ids >= V))[:, None], float("nan"))
        return out
    cfg = _blocks("lookup" if ids is not None else "grad_gather", T, K, N, A.device)
    grid = (cdiv(N, cfg["BLOCK_N"]), cdiv(T, cfg["BLOCK_T"]))
    launch_triton(
        gather_matmul_kernel, grid, ids if ids is not None else A, A, B, out, T, K, N, V,
        stride_am, stride_ak, stride_bk, stride_bn, out.stride(0), out.stride(1),
        HAS_IDS=ids is not None, COMPUTE_DTYPE=_tuning.tl_dtype(compute_dtype),
        PRECISION=_tuning.precision(compute_dtype), **cfg,
    )
    return out


def _forward(ids: Tensor, P: Tensor, Q: Tensor) -> Tensor:
    T, (K, D) = ids.numel(), Q.shape
    return _gather_matmul(ids, P.shape[0], P, P.stride(0), P.stride(1), Q, Q.stride(0), Q.stride(1), T, K, D,
                          P.dtype, P.dtype)


def _token_splits(T: int, tiles: int, block_t: int, device: torch.device) -> int:
    """How many token ranges the dQ reduction is cut into: enough programs to fill the GPU
    (a k x D grid alone can be a few dozen tiles), each range at least 4 token tiles long."""
    if device.type != "cuda":
        return min(2, cdiv(T, block_t))  # the interpreter: still exercise the split path
    sms = num_sms(device)
    want = cdiv(2 * sms, max(tiles, 1))
    return max(1, min(want, cdiv(T, 4 * block_t)))


def _grad_primitive(ids: Tensor, P: Tensor, dout: Tensor, dtype: torch.dtype) -> Tensor:
    """``dQ = P[ids]^T dout`` (k x D) in ``dtype``: fp32 partial sums over token ranges, then
    their sum in a fixed order (deterministic)."""
    T, D = dout.shape
    V, K = P.shape
    if T == 0 or K == 0 or D == 0:
        return torch.zeros(K, D, device=P.device, dtype=dtype)
    cfg = _blocks("grad_primitive", T, K, D, P.device)
    tiles = cdiv(K, cfg["BLOCK_K"]) * cdiv(D, cfg["BLOCK_N"])
    splits = _token_splits(T, tiles, cfg["BLOCK_T"], P.device)
    per_split = cdiv(cdiv(T, splits), cfg["BLOCK_T"]) * cfg["BLOCK_T"]
    splits = cdiv(T, per_split)
    partial = torch.empty(splits, K, D, device=P.device, dtype=torch.float32)
    grid = (cdiv(K, cfg["BLOCK_K"]), cdiv(D, cfg["BLOCK_N"]), splits)
    launch_triton(
        gathered_outer_kernel, grid, ids, P, dout, partial, T, K, D, V, per_split, P.stride(0), P.stride(1),
        dout.stride(0), dout.stride(1), partial.stride(0), partial.stride(1), partial.stride(2),
        COMPUTE_DTYPE=_tuning.tl_dtype(P.dtype), PRECISION=_tuning.precision(P.dtype), **cfg,
    )
    return (partial[0] if splits == 1 else partial.sum(0)).to(dtype)


def _grad_coords(ids: Tensor, Q: Tensor, dout: Tensor, V: int, padding_idx: int, dtype: torch.dtype) -> Tensor:
    """``dP (V x k)``: ``g = dout Q^T`` (T x k, fp32) then a deterministic sum over each id's run
    of the stably sorted ids. Sort and ``searchsorted`` stay on the device (no host sync)."""
    T, D = dout.shape
    K = Q.shape[0]
    dP = torch.zeros(V, K, device=Q.device, dtype=dtype)
    if T == 0 or K == 0:
        return dP
    # g = dout @ Q^T: the gather-matmul kernel with no ids and B = Q^T read through strides.
    g = _gather_matmul(None, V, dout, dout.stride(0), dout.stride(1), Q, Q.stride(1), Q.stride(0), T, D, K,
                       torch.float32, dout.dtype)
    sorted_ids, order = torch.sort(ids, stable=True)
    run_end = torch.searchsorted(sorted_ids, sorted_ids, right=True)
    cfg = _blocks("segment", T, K, 0, Q.device)
    grid = (T, cdiv(K, cfg["BLOCK_K"]))
    launch_triton(segment_sum_kernel, grid, g, order, sorted_ids, run_end, dP, K, V, padding_idx, g.stride(0),
                  dP.stride(0), **cfg)
    return dP


def _backward(dout: Tensor, ids: Tensor, coords: Tensor, primitive: Tensor, padding_idx: int, need_coords: bool,
              need_primitive: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    dout = dout.to(coords.dtype).contiguous()
    dP = _grad_coords(ids, primitive, dout, coords.shape[0], padding_idx, coords.dtype) if need_coords else None
    dQ = _grad_primitive(ids, coords, dout, primitive.dtype) if need_primitive else None
    return dP, dQ


class _FactorizedEmbedding(torch.autograd.Function):
    """Eager calls: the kernels directly, without torch.library's per-call dispatch cost."""

    @staticmethod
    def forward(ctx, ids: Tensor, coords: Tensor, primitive: Tensor, padding_idx: int) -> Tensor:
        ctx.save_for_backward(ids, coords, primitive)
        ctx.padding_idx = padding_idx
        return _forward(ids, coords, primitive)

    @staticmethod
    def backward(ctx, dout: Tensor):
        ids, coords, primitive = ctx.saved_tensors
        dP, dQ = _backward(dout, ids, coords, primitive, ctx.padding_idx, *ctx.needs_input_grad[1:3])
        return None, dP, dQ, None


# The same kernels as torch.library custom ops with fake implementations, so torch.compile
# traces them (fullgraph) and, with the sync-free backward, CUDA graphs capture them.
if triton is not None:

    @torch.library.custom_op("flix_kernels::ofa_embedding_forward", mutates_args=(), device_types=("cuda", "cpu"))
    def _forward_op(ids: Tensor, coords: Tensor, primitive: Tensor, padding_idx: int) -> Tensor:
        return _forward(ids, coords, primitive)

    @_forward_op.register_fake
    def _(ids, coords, primitive, padding_idx):
        return coords.new_empty(ids.shape[0], primitive.shape[1])

    @torch.library.custom_op("flix_kernels::ofa_embedding_backward", mutates_args=(), device_types=("cuda", "cpu"))
    def _backward_op(dout: Tensor, ids: Tensor, coords: Tensor, primitive: Tensor, padding_idx: int,
                     need_coords: bool, need_primitive: bool) -> tuple[Tensor, Tensor]:
        dP, dQ = _backward(dout, ids, coords, primitive, padding_idx, need_coords, need_primitive)
        # custom ops return tensors, not None: an empty tensor stands for "not asked for"
        return (dP if dP is not None else coords.new_empty(0)), (dQ if dQ is not None else primitive.new_empty(0))

    @_backward_op.register_fake
    def _(dout, ids, coords, primitive, padding_idx, need_coords, need_primitive):
        return (torch.empty_like(coords) if need_coords else coords.new_empty(0),
                torch.empty_like(primitive) if need_primitive else primitive.new_empty(0))

    def _op_setup_context(ctx, inputs, output):
        ids, coords, primitive, padding_idx = inputs
        ctx.save_for_backward(ids, coords, primitive)
        ctx.padding_idx = padding_idx

    def _op_backward(ctx, dout):
        ids, coords, primitive = ctx.saved_tensors
        need_coords, need_primitive = ctx.needs_input_grad[1:3]
        dP, dQ = _backward_op(dout, ids, coords, primitive, ctx.padding_idx, need_coords, need_primitive)
        return None, (dP if need_coords else None), (dQ if need_primitive else None), None

    _forward_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _host_checks_allowed(device: torch.device) -> bool:
    """False while torch.compile traces or a CUDA graph is being captured: a data-dependent
    check would break the graph or fail the capture (the kernels then give NaN rows instead)."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def _validate(ids: Tensor, coords: Tensor, primitive: Tensor, padding_idx: Optional[int],
              check_ids: bool = True) -> Optional[int]:
    """Check the inputs (clear errors); returns padding_idx normalised to [0, V) or None."""
    if not torch.is_tensor(ids) or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor, got {ids.dtype if torch.is_tensor(ids) else type(ids)}")
    if coords.dim() != 2:
        raise ValueError(f"coords must be 2-D (V x k), got shape {tuple(coords.shape)}")
    if primitive.dim() != 2:
        raise ValueError(f"primitive must be 2-D (k x D), got shape {tuple(primitive.shape)}")
    if coords.shape[1] != primitive.shape[0]:
        raise ValueError(f"coords {tuple(coords.shape)} and primitive {tuple(primitive.shape)} do not chain: "
                         f"coords.shape[1] ({coords.shape[1]}) must equal primitive.shape[0] ({primitive.shape[0]})")
    if not (ids.device == coords.device == primitive.device):
        raise ValueError(f"ids ({ids.device}), coords ({coords.device}) and primitive ({primitive.device}) "
                         "must be on the same device")
    for name, t in (("coords", coords), ("primitive", primitive)):
        if t.dtype not in _FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"{name} dtype {t.dtype} is not supported (float32, float16, bfloat16; float64 with "
                            "backend='torch')")
    if coords.dtype != primitive.dtype:
        raise TypeError(f"coords ({coords.dtype}) and primitive ({primitive.dtype}) must have the same dtype")
    V = coords.shape[0]
    if padding_idx is not None:
        if not -V <= padding_idx < V:
            raise ValueError(f"padding_idx {padding_idx} is out of range for coords with {V} rows")
        padding_idx = padding_idx + V if padding_idx < 0 else padding_idx
    if check_ids and ids.numel() and _host_checks_allowed(ids.device):
        lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one host sync; the slow search only on error
        if lo < 0 or hi >= V:
            bad = (ids < 0) | (ids >= V)
            pos = tuple(int(i) for i in bad.nonzero()[0])
            raise IndexError(f"ids{list(pos)} = {int(ids[pos])} is out of range for coords with {V} rows "
                             f"(valid ids: 0..{V - 1})")
    return padding_idx


def factorized_embedding(ids: Tensor, coords: Tensor, primitive: Tensor, *, padding_idx: Optional[int] = None,
                         backend: str = "auto", check_ids: bool = True) -> Tensor:
    """``coords[ids] @ primitive``, shape ``ids.shape + (D,)``, dtype of coords.

    Differentiable in ``coords`` and ``primitive``; the ``padding_idx`` row of coords gets no
    gradient (as ``nn.Embedding``). ``backend``: "auto" (Triton for CUDA tensors when it imports,
    else torch), "torch" or "triton" (float32/float16/bfloat16 only). Ids out of ``[0, V)`` raise
    an IndexError naming the first bad id and its position, before any kernel runs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    padding_idx = _validate(ids, coords, primitive, padding_idx, check_ids)
    if ids.dtype not in (torch.int32, torch.int64):  # F.embedding and the kernels take int32/int64
        ids = ids.to(torch.int64)
    if backend == "auto":  # measured: cuBLAS after the gather is as fast or faster (see the docstring)
        backend = "torch"
    if backend == "torch":
        return F.embedding(ids, coords, padding_idx) @ primitive
    reason = unavailable_reason("triton", coords.device)  # the same rule as the FLix kernels
    if reason is not None:
        raise BackendUnavailableError(f"backend 'triton' is unavailable: {reason}")
    if coords.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype {coords.dtype} is not supported by the Triton kernels (float32, float16, "
                        "bfloat16); use backend='torch'")
    flat = ids.reshape(-1)
    args = (flat.contiguous(), coords, primitive, -1 if padding_idx is None else padding_idx)
    out = _forward_op(*args) if torch.compiler.is_compiling() else _FactorizedEmbedding.apply(*args)
    return out.reshape(*ids.shape, primitive.shape[1])


def tied_logits(hidden: Tensor, coords: Tensor, primitive: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The tied output head ``hidden Q^T P^T (+ bias)``, shape ``hidden.shape[:-1] + (V,)``.

    Computed as ``(hidden @ Q^T) @ P^T``: two dense GEMMs whose intermediate is only T x k (k is
    small), so cuBLAS already runs at full speed and a fused kernel would gain nothing; the
    V x D matrix is never formed."""
    if coords.dim() != 2 or primitive.dim() != 2 or coords.shape[1] != primitive.shape[0]:
        raise ValueError(f"coords {tuple(coords.shape)} and primitive {tuple(primitive.shape)} must be "
                         "V x k and k x D")
    if hidden.shape[-1] != primitive.shape[1]:
        raise ValueError(f"hidden's last dimension ({hidden.shape[-1]}) must equal primitive.shape[1] "
                         f"({primitive.shape[1]})")
    logits = (hidden @ primitive.t()) @ coords.t()
    return logits if bias is None else logits + bias
