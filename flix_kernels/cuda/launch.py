"""Launchers of the CUDA kernels (``flix_kernels._C``): tensor validation, launch plans, workspaces.

Same arguments and semantics as :mod:`flix_kernels.triton.launch` (listed in
:mod:`flix_kernels.backends.kernel_ops`), so the same custom ops drive either. Called directly
(``check=True``, the default) every tensor is validated first: device, dtype, shape, strides,
and the routing metadata's dtypes and sizes, each error naming the argument. The "cuda" backend
calls them with ``check=False`` because ``flix_kernels.ops`` validated its inputs and the
metadata is the routing's own.

Launch plans depend only on shapes and host ints, never on device values (no host sync; CUDA
graph capturable). Workspaces come from torch's caching allocator (a graph's private pool
during capture):

* shrink/expand: 16-token tiles at most 64 tokens (decode), else 64-token tiles; decode shrink
  splits K over blocks until about two blocks per SM, summing the parts in split order;
* weight gradients: the owner path (one block per feature and column tile) when that fills
  the device, else the split path over (example, token chunk) with a fixed-order reduction;
* the decode path (:class:`DecodePlan`, at most DECODE_TOKENS tokens with a base weight): the
  shrink and csrc/decode.cu's base GEMM + FLix update, two launches from one call into the
  extension, K split over about four blocks per SM (:func:`decode_splits`).

K splits are summed in the same launch by the last block of each tile, counted in a zeroed
int32 buffer per stream (:func:`_counters`). ``OVERRIDES`` (tests) forces any choice:
``{"tile": 0|1, "splits": n, "grad_path": "owner"|"split", "chunk": n, "decode_splits": n}``.
"""

from __future__ import annotations

import torch

from .. import _launch, settings
from .._launch import DECODE_TOKENS, ExpandMode, call_extension, cdiv, num_sms
from . import _C, host_path_timing, unavailable_reason

__all__ = ["OVERRIDES", "SUPPORTED_PAIRS", "DecodePlan", "decode_enabled", "decode_plan", "decode_splits", "expand",
           "keep_mask", "shrink", "weight_grad"]

OVERRIDES: dict = {}
WORKSPACE_BYTES = 256 << 20  # the split weight gradient's fp32 partial tiles, at most
# The extension's dtype codes and block shapes (csrc/flix.h, their one definition), so these plans
# cannot drift from its kernels; nothing launches without the extension.
_DTYPE_CODE = {getattr(torch, name): code for name, code in _C.DTYPE_CODES.items()} if _C is not None else {}
_TILES = {family: [tuple(shape) for shape in shapes] for family, shapes in _C.TILES.items()} if _C is not None else {}
# (activation dtype, adapter dtype) pairs the kernels are built for.
SUPPORTED_PAIRS = {(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                   (torch.float16, torch.float32), (torch.bfloat16, torch.float32)}
_INT32_MAX = 2**31 - 1
_SMALL, _LARGE = 0, 1  # flix::Tile
if _C is not None:
    _SHRINK_TILE = dict(enumerate(_TILES["shrink"]))  # (tokens, rank slots, K step) by tile class
    _GRAD_TILE = {tile: shape[0] for tile, shape in enumerate(_TILES["weight_grad"])}  # rank rows per block
    _GRAD_COLS, _GRAD_TOKENS = _TILES["weight_grad"][_LARGE][1:]  # the same for both tile classes
    _DECODE_COLS, _DECODE_K_STEP = _TILES["decode"][0][1:]  # output columns per block, K per pipeline stage


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _fail(what: str, msg: str, exc=ValueError):
    raise exc(f"flix_kernels.cuda.{what}: {msg}")


def _check_tensor(what, name, t, *, dims=None, dtypes=None, device=None, contiguous=False, output=False,
                  optional=False):
    if t is None:
        if not optional:
            _fail(what, f"{name} is required", TypeError)
        return
    if not torch.is_tensor(t):
        _fail(what, f"{name} must be a tensor, got {type(t).__name__}", TypeError)
    if dims is not None and t.dim() != dims:
        _fail(what, f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        _fail(what, f"{name} has dtype {t.dtype}; expected one of {sorted(map(str, dtypes))}", TypeError)
    if any(s < 0 for s in t.stride()):
        _fail(what, f"{name} has a negative stride {t.stride()}")
    if contiguous and not t.is_contiguous():
        _fail(what, f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    if output and _overlaps(t):
        _fail(what, f"output {name} has overlapping elements (shape {tuple(t.shape)}, strides {t.stride()})")
    if any(n > _INT32_MAX for n in t.shape):
        _fail(what, f"{name} has a dimension above 2**31 - 1: {tuple(t.shape)}")
    if device is not None and t.device != device:
        _fail(what, f"{name} is on {t.device} but x is on {device}")


def _check_device(what, device):
    if device.type != "cuda":
        _fail(what, f"the CUDA kernels need CUDA tensors, got tensors on {device}")
    reason = unavailable_reason(device)
    if reason is not None:
        _fail(what, reason, RuntimeError)


def _check_routing(what, slot_rank, slot_feature, cu, seq_len, T, device):
    i32 = {torch.int32}
    _check_tensor(what, "slot_rank", slot_rank, dims=2, dtypes=i32, contiguous=True)
    _check_tensor(what, "slot_feature", slot_feature, dims=2, dtypes=i32, contiguous=True)
    if slot_rank.shape != slot_feature.shape:
        _fail(what, f"slot_rank {tuple(slot_rank.shape)} and slot_feature {tuple(slot_feature.shape)} differ")
    B = slot_rank.shape[0]
    if cu is not None:
        _check_tensor(what, "cu_seqlens", cu, dims=1, dtypes=i32, contiguous=True)
        if cu.shape[0] != B + 1:
            _fail(what, f"cu_seqlens must have B + 1 = {B + 1} entries, got {cu.shape[0]}")
    elif T > 0 and (seq_len <= 0 or B * seq_len != T):
        _fail(what, f"batched routing of {B} examples with seq_len {seq_len} does not cover T = {T} tokens")
    for name, t in (("slot_rank", slot_rank), ("slot_feature", slot_feature), ("cu_seqlens", cu)):
        if t is not None and t.device != device:
            _fail(what, f"{name} is on {t.device} but x is on {device}")


def _check_pair(what, act, adapters):
    if (act, adapters) not in SUPPORTED_PAIRS:
        _fail(what, f"activation dtype {act} with adapter dtype {adapters} is not supported; the CUDA kernels take "
              "equal dtypes (float32, float16, bfloat16) or float16/bfloat16 activations with float32 adapters",
              TypeError)


def _check_dropout(what, seed, p_drop, device):
    if seed is None:
        return
    _check_tensor(what, "seed", seed, dims=1, dtypes={torch.int64}, device=device)
    if seed.numel() != 1:
        _fail(what, f"seed must hold one value, got {seed.numel()}")
    if not 0.0 <= float(p_drop) < 1.0:
        _fail(what, f"dropout p must be in [0, 1), got {p_drop}")


# ---------------------------------------------------------------------------------------------
# Arguments of _C
# ---------------------------------------------------------------------------------------------
def _matrix(t, rows, cols, stride0, stride1):
    return (t.data_ptr(), int(rows), int(cols), int(stride0), int(stride1), _DTYPE_CODE[t.dtype])


def _routing(slot_rank, slot_feature, cu, seq_len):
    B, R = slot_rank.shape
    return (slot_rank.data_ptr(), slot_feature.data_ptr(), 0 if cu is None else cu.data_ptr(), B, R, int(seq_len))


def _dropout(seed, p_drop):
    return (0, 0.0) if seed is None else (seed.data_ptr(), float(p_drop))


def _launch_context(t):
    """``(device index, current stream handle)`` of tensor ``t``'s device. CPU tensors reach here only
    while :func:`flix_kernels.cuda.host_path_only` times the Python path with every launch skipped."""
    device = t.device
    if device.type != "cuda":
        rec = _launch._RECORD
        if not host_path_timing() or rec is None or rec.run:  # only ever with every launch skipped
            _fail("launch", f"the CUDA kernels need CUDA tensors, got tensors on {device}")
        return -1, 0  # no CUDA device has index -1: nothing made here is used by a real launch
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _RAW_STREAM is not None:  # the handle alone, without a Stream object (about a microsecond less)
        return index, _RAW_STREAM(index)
    return index, torch.cuda.current_stream(index).cuda_stream


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


_COUNTERS: dict = {}


def _counters(index: int, stream: int, device) -> torch.Tensor:
    """The split counters of ``stream`` (see csrc/flix.h): int32 zeros, left zero by every launch;
    one buffer per stream, because kernels on one stream run one after another. During a CUDA-graph
    capture a buffer made then is the graph's own (its zero fill is a node of the graph, replayed
    before the kernels) and is not kept for other launches."""
    key = (index, stream)
    buf = _COUNTERS.get(key)
    if buf is None:
        buf = torch.zeros(_C.MAX_SPLIT_TILES, dtype=torch.int32, device=device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _COUNTERS[key] = buf
    return buf


def _scales(scaling, scale) -> tuple:
    """``(scaling, (pointer, dtype code, scale))``: per-feature scales in their own dtype when it is
    one the kernels read (no conversion launch), else as float32 (returned to keep it alive)."""
    if scaling is None:
        return None, (0, 0, float(scale))
    if scaling.dtype not in _DTYPE_CODE or scaling.stride(0) != 1:
        scaling = scaling.to(torch.float32).contiguous()
    return scaling, (scaling.data_ptr(), _DTYPE_CODE[scaling.dtype], float(scale))


def _rows_tile(rows: int) -> int:
    """The weight-gradient tile class for blocks of ``rows`` rank rows."""
    return _SMALL if max(int(rows), 1) <= _GRAD_TILE[_SMALL] else _LARGE


def _overlaps(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share an address (sizes > 1 sorted by stride must nest)."""
    span = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride < span:
            return True
        span = stride * size
    return False


# ---------------------------------------------------------------------------------------------
# Launch plans (shapes and host ints only; unit-tested on CPU)
# ---------------------------------------------------------------------------------------------
def shrink_plan(T: int, K: int, R: int, sms: int) -> tuple[int, int]:
    """``(tile, splits)`` of a shrink of T tokens, K inputs and R slots: 16-token tiles for decode;
    few tokens split K until the blocks cover the GPU twice, as far as K allows."""
    tile = OVERRIDES.get("tile", _SMALL if T <= DECODE_TOKENS else _LARGE)
    rows, slots_per_block, k_step = _SHRINK_TILE[tile]
    blocks = cdiv(T, rows) * cdiv(R, slots_per_block)
    splits = OVERRIDES.get("splits", max(1, min(cdiv(2 * sms, blocks), cdiv(K, k_step))))
    return tile, splits


def grad_plan(T: int, N: int, B: int, Rs: int, P: int, present: int, max_pair_rank: int, max_len: int,
              sms: int) -> tuple[int, int, int]:
    """``(tile, chunks, chunk)`` of a weight gradient: ``chunks == 0`` is the owner path (used when
    one block per present feature and column tile covers the GPU twice, or the split path's
    workspace would exceed WORKSPACE_BYTES, or a grid dimension 65535); else the split path with
    ``chunks`` chunks of ``chunk`` tokens per example (``chunks * chunk >= max_len``)."""
    col_tiles = cdiv(N, _GRAD_COLS)
    target = 2 * sms
    path = OVERRIDES.get("grad_path") or ("owner" if present * col_tiles >= target else "split")
    chunks = chunk = 0
    tile = _rows_tile(max_pair_rank)
    if path == "split" and T > 0 and P > 0:
        tile = _rows_tile(Rs)  # a split block covers all slots of its example
        max_len = max(int(max_len), 1)
        if "chunk" in OVERRIDES:
            chunk = OVERRIDES["chunk"]
        else:
            per_chunk = B * col_tiles * cdiv(Rs, _GRAD_TILE[tile])
            chunks = max(1, min(cdiv(target, per_chunk), cdiv(max_len, _GRAD_TOKENS)))
            chunk = cdiv(cdiv(max_len, chunks), _GRAD_TOKENS) * _GRAD_TOKENS
        chunks = cdiv(max_len, chunk)
        budget = min(WORKSPACE_BYTES // (B * Rs * N * 4), 65535)
        if col_tiles * cdiv(Rs, _GRAD_TILE[tile]) > 65535:  # grid z of the split kernel
            budget = 0
        if chunks > budget:  # fewer, longer chunks; none fit: the owner path needs no workspace
            chunks = budget
            if chunks >= 1:
                chunk = cdiv(cdiv(max_len, chunks), _GRAD_TOKENS) * _GRAD_TOKENS
                chunks = cdiv(max_len, chunk)
            else:
                chunks, chunk, tile = 0, 0, _rows_tile(max_pair_rank)
    return OVERRIDES.get("tile", tile), chunks, chunk


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def shrink(X, M, stride_mr, stride_mk, slot_rank, slot_feature, cu, scaling, scale, seed, p_drop, seq_len,
           compute_dtype, *, check: bool = True) -> torch.Tensor:
    """``H (T, R_slots)`` fp32 ``= s_slot * drop(X) M_S^T``; ``M[r, k]`` at ``M + r * stride_mr + k * stride_mk``
    (lora_A, or lora_B read transposed), in ``compute_dtype``; X ``(T, K)`` in the activation dtype."""
    if check:
        _check_tensor("shrink", "X", X, dims=2, dtypes=set(_DTYPE_CODE))
        _check_tensor("shrink", "M", M, dtypes={compute_dtype}, device=X.device)
        _check_pair("shrink", X.dtype, compute_dtype)
        _check_routing("shrink", slot_rank, slot_feature, cu, seq_len, X.shape[0], X.device)
        _check_tensor("shrink", "scaling", scaling, dims=1, dtypes={torch.float32, torch.float16, torch.bfloat16,
                                                                     torch.float64}, device=X.device, optional=True)
        _check_dropout("shrink", seed, p_drop, X.device)
        _check_device("shrink", X.device)  # last: every other error is reported on any device
    T, K = X.shape
    B, R = slot_rank.shape
    H = torch.empty(T, R, device=X.device, dtype=torch.float32)
    if T == 0 or R == 0:
        return H
    if K == 0:
        return H.zero_()
    tile, splits = shrink_plan(T, K, R, num_sms(X.device))
    device, stream = _launch_context(X)
    ws = counters = None
    if splits > 1:
        ws = torch.empty(splits, T, R, device=X.device, dtype=torch.float32)
        counters = _counters(device, stream, X.device)
    scaling, scales = _scales(scaling, scale)
    call_extension(_C.shrink, x=_matrix(X, T, K, X.stride(0), X.stride(1)),
                   factor=_matrix(M, M.numel() // max(K, 1), K, stride_mr, stride_mk), h=H.data_ptr(),
                   workspace=0 if ws is None else ws.data_ptr(),
                   counters=0 if counters is None else counters.data_ptr(), splits=splits,
                   routing=_routing(slot_rank, slot_feature, cu, seq_len), scales=scales,
                   dropout=_dropout(seed, p_drop), tile=tile, device=device, stream=stream)
    return H


def expand(H, M, stride_mr, stride_mn, Y, slot_rank, slot_feature, cu, seq_len, compute_dtype, *,
           mode: ExpandMode, X2=None, W2=None, stride_wn=0, stride_wk=0, bias=None, seed=None, p_drop=0.0,
           check: bool = True) -> torch.Tensor:
    """``Y (T, N)``: WRITE ``= U``, ACCUMULATE ``+= U`` where ``U = drop(H M_S)``; ``M[r, n]`` at
    ``M + r * stride_mr + n * stride_mn``. FUSED_BASE (base GEMM in the tile) is Triton's only."""
    if mode not in (ExpandMode.WRITE, ExpandMode.ACCUMULATE):
        _fail("expand", f"mode must be ExpandMode.WRITE (0) or ACCUMULATE (1); mode {int(mode)} (the fused base "
              "GEMM) is only in the Triton backend", NotImplementedError)
    if check:
        _check_tensor("expand", "Y", Y, dims=2, dtypes=set(_DTYPE_CODE), output=True)
        _check_tensor("expand", "H", H, dims=2, dtypes={torch.float32}, device=Y.device)
        _check_tensor("expand", "M", M, dtypes={compute_dtype}, device=Y.device)
        _check_pair("expand", Y.dtype, compute_dtype)
        _check_routing("expand", slot_rank, slot_feature, cu, seq_len, Y.shape[0], Y.device)
        if H.shape != (Y.shape[0], slot_rank.shape[1]) or (H.numel() and H.stride(1) != 1):
            _fail("expand", f"H must be (T={Y.shape[0]}, R_slots={slot_rank.shape[1]}) with unit column stride, got "
                  f"shape {tuple(H.shape)} strides {H.stride()}")
        _check_dropout("expand", seed, p_drop, Y.device)
        _check_device("expand", Y.device)  # last: every other error is reported on any device
    T, N = Y.shape
    B, R = slot_rank.shape
    if T == 0 or N == 0 or (mode == ExpandMode.ACCUMULATE and R == 0):
        return Y
    device, stream = _launch_context(Y)
    tile = OVERRIDES.get("tile", _SMALL if T <= DECODE_TOKENS else _LARGE)
    call_extension(_C.expand, h=_matrix(H, T, R, H.stride(0), 1),
                   factor=_matrix(M, M.numel() // N, N, stride_mr, stride_mn),
                   y=_matrix(Y, T, N, Y.stride(0), Y.stride(1)), accumulate=mode == ExpandMode.ACCUMULATE,
                   routing=_routing(slot_rank, slot_feature, cu, seq_len), dropout=_dropout(seed, p_drop), tile=tile,
                   device=device, stream=stream)
    return Y


def weight_grad(L, R, G, stride_gr, stride_gn, meta, seq_len, max_len, compute_dtype, *, seed=None, p_drop=0.0,
                check: bool = True) -> torch.Tensor:
    """Rows of ``G`` per feature k: ``G[k's rows, n] = sum over k's tokens t of L[t, slot_k + j] drop(R)[t, n]``;
    ``G[r, n]`` at ``G + r * stride_gr + n * stride_gn`` in ``compute_dtype``. Features absent from the batch get
    zero rows. Deterministic (no atomics)."""
    cu = meta.cu_seqlens
    if check:
        _check_tensor("weight_grad", "R", R, dims=2, dtypes=set(_DTYPE_CODE))
        _check_tensor("weight_grad", "L", L, dims=2, dtypes={torch.float32}, device=R.device)
        _check_tensor("weight_grad", "G", G, dims=2, dtypes={compute_dtype}, device=R.device, output=True)
        _check_pair("weight_grad", R.dtype, compute_dtype)
        _check_routing("weight_grad", meta.slot_rank, meta.slot_feature, cu, seq_len, R.shape[0], R.device)
        if L.shape != (R.shape[0], meta.slot_rank.shape[1]) or (L.numel() and L.stride(1) != 1):
            _fail("weight_grad", f"L must be (T={R.shape[0]}, R_slots={meta.slot_rank.shape[1]}) with unit column "
                  f"stride, got shape {tuple(L.shape)} strides {L.stride()}")
        total = int(meta.rank_offsets[-1]) if meta.rank_offsets.numel() else 0  # host sync: checking only
        if G.numel() != total * R.shape[1]:
            _fail("weight_grad", f"G must hold (R_total={total}) x (N={R.shape[1]}) elements, got {G.numel()}")
        for name in ("pair_example", "pair_slot", "feature_pair_start", "rank_offsets", "feature_rank"):
            _check_tensor("weight_grad", name, getattr(meta, name), dims=1, dtypes={torch.int32}, contiguous=True,
                          device=R.device)
        _check_dropout("weight_grad", seed, p_drop, R.device)
        _check_device("weight_grad", R.device)  # last: every other error is reported on any device
    T, N = R.shape
    F = meta.feature_rank.shape[0]
    B, Rs = meta.slot_rank.shape
    P = meta.pair_example.shape[0]
    if G.numel() == 0 or N == 0 or F == 0:
        return G
    if T == 0:  # no token: every gradient row is zero (and a packed routing has seq_len 0)
        return G.zero_()
    tile, chunks, chunk = grad_plan(T, N, B, Rs, P, meta.present_features.shape[0], meta.max_pair_rank, max_len,
                                    num_sms(R.device))
    ws = torch.empty(B * chunks * Rs * N, device=R.device, dtype=torch.float32) if chunks else None
    device, stream = _launch_context(R)
    pairs = (meta.pair_example.data_ptr(), meta.pair_slot.data_ptr(), meta.feature_pair_start.data_ptr(),
             meta.rank_offsets.data_ptr(), F, int(meta.max_feature_rank))
    call_extension(_C.weight_grad, l=_matrix(L, T, Rs, L.stride(0) if L.numel() else Rs, 1),
                   r=_matrix(R, T, N, R.stride(0), R.stride(1)),
                   g=_matrix(G, G.numel() // N, N, stride_gr, stride_gn),
                   routing=_routing(meta.slot_rank, meta.slot_feature, cu, seq_len), pairs=pairs,
                   workspace=0 if ws is None else ws.data_ptr(), chunks=chunks, chunk=chunk,
                   dropout=_dropout(seed, p_drop), tile=tile, device=device, stream=stream)
    return G


# ---------------------------------------------------------------------------------------------
# The decode path: a whole layer in two launches and one call into the extension
# ---------------------------------------------------------------------------------------------


def decode_splits(T: int, K: int, N: int, itemsize: int, sms: int) -> int:
    """K splits of the decode linear kernel (csrc/decode.cu): about four blocks per SM, whole pipeline
    stages per split, and the fp32 partials (written and read once) at most an eighth of W's bytes.
    The count the kernel will use (it recomputes the same)."""
    if "decode_splits" in OVERRIDES:
        want = OVERRIDES["decode_splits"]
    else:
        by_fill = cdiv(4 * sms, cdiv(N, _DECODE_COLS))
        by_bytes = max(1, K * itemsize // (32 * max(T, 1)))
        want = max(1, min(by_fill, by_bytes, cdiv(K, _DECODE_K_STEP), 64))
    if cdiv(N, _DECODE_COLS) > _C.MAX_SPLIT_TILES:
        want = 1
    per_split = max(_DECODE_K_STEP, cdiv(cdiv(K, want), _DECODE_K_STEP) * _DECODE_K_STEP)
    return max(1, cdiv(K, per_split))


def decode_enabled() -> bool:
    """``FLIX_CUDA_DECODE=0`` turns the decode path off (the general kernels and cuBLAS then run);
    read when a call is prepared (once per routing and call signature)."""
    return settings.value("FLIX_CUDA_DECODE")


def decode_plan(meta, T: int, K: int, N: int, R_total: int, act_dtype, adapter_dtype,
                device) -> "DecodePlan | None":
    """The decode path of a layer ``(T, K) -> (T, N)`` with adapters of total rank ``R_total``
    under ``meta``, or None where it does not apply: more than DECODE_TOKENS tokens, K not a whole
    number of 16-byte copies, the path turned off, or a dtype pair the kernels are not built for."""
    if (_C is None or not 0 < T <= DECODE_TOKENS or N == 0 or K == 0 or K % (16 // act_dtype.itemsize)
            or (act_dtype, adapter_dtype) not in SUPPORTED_PAIRS or not decode_enabled()):
        return None
    return DecodePlan(meta, T, K, N, R_total, act_dtype, adapter_dtype, device)


class DecodePlan:
    """``y = x W^T + b + FLix(x)`` for one routing and layer shape at decode sizes: the shrink, then
    csrc/decode.cu's base GEMM + update, in one call into the extension whose fixed arguments
    (routing pointers, sizes, dtypes, splits) are packed once here (``_C.DecodePlan``). A call checks
    what the call signature does not fix (strides, alignment, dtypes of bias and factors) and returns
    None when the inputs need the general path; tensors of other shapes than the plan's raise.

    The K splits share the stream's counter buffer (:func:`_counters`): launches on one stream run
    in order, so they never overlap. Two CUDA graphs captured on one stream and then replayed at the
    same time on two streams would share it; replay such graphs on one stream."""

    def __init__(self, meta, T, K, N, R_total, act_dtype, adapter_dtype, device):
        B, R = meta.slot_rank.shape
        sms = num_sms(device)
        self.T, self.K, self.N, self.R = T, K, N, R
        self.shapes = ((T, K), (N, K), (R_total, K), (N, R_total))
        self.act, self.adapters = act_dtype, adapter_dtype
        self.vec = 16 // act_dtype.itemsize
        shrink_splits = shrink_plan(T, K, R, sms)[1] if R and K else 1  # (its 16-token tiles: T is small)
        self.splits = decode_splits(T, K, N, act_dtype.itemsize, sms)
        self.shrink_splits = shrink_splits
        self.shrink_elems = shrink_splits * T * R if shrink_splits > 1 else 0
        self.linear_elems = self.splits * T * N if self.splits > 1 else 0
        index = device.index if device.type == "cuda" and device.index is not None else 0
        self.packed = _C.DecodePlan(routing=_routing(meta.slot_rank, meta.slot_feature, meta.cu_seqlens, meta.seq_len),
                                    T=T, K=K, N=N, R_total=R_total, act=_DTYPE_CODE[act_dtype],
                                    adapters=_DTYPE_CODE[adapter_dtype], shrink_splits=shrink_splits,
                                    splits=self.splits, device=index)
        self.meta = meta  # keeps the routing tensors the packed pointers point at alive

    def __call__(self, x, weight, bias, lora_A, lora_B, scaling, scale, seed, p_drop, need_h: bool = True):
        """``(y, h)`` (h None unless ``need_h``), or None for inputs the kernel cannot take."""
        act, vec = self.act, self.vec
        if (x.shape, weight.shape, lora_A.shape, lora_B.shape) != self.shapes or (
                bias is not None and bias.shape != (self.N,)):
            _fail("DecodePlan", f"the plan is for x {self.shapes[0]}, weight {self.shapes[1]}, lora_A {self.shapes[2]}, "
                  f"lora_B {self.shapes[3]}; got {tuple(x.shape)}, {tuple(weight.shape)}, {tuple(lora_A.shape)}, "
                  f"{tuple(lora_B.shape)}" + ("" if bias is None else f", bias {tuple(bias.shape)}"))
        sx, sw, sa, sb = x.stride(), weight.stride(), lora_A.stride(), lora_B.stride()
        x_ptr, w_ptr = x.data_ptr(), weight.data_ptr()
        if (x.dtype is not act or weight.dtype is not act or lora_A.dtype is not self.adapters
                or lora_B.dtype is not self.adapters or sx[1] != 1 or sw[1] != 1 or (sx[0] | sw[0]) % vec
                or (x_ptr | w_ptr) & 15 or (bias is not None and (bias.dtype is not act or bias.stride(0) != 1))):
            return None
        index, stream = _launch_context(x)
        device = x.device
        T, R = self.T, self.R
        y = torch.empty(T, self.N, device=device, dtype=act)
        ws_elems = self.shrink_elems + self.linear_elems
        if need_h:
            h = torch.empty(T, R, device=device, dtype=torch.float32)
            h_ptr = h.data_ptr()
            ws = torch.empty(ws_elems, device=device, dtype=torch.float32) if ws_elems else None
            ws_ptr = 0 if ws is None else ws.data_ptr()
        else:  # h only lives inside this call: one buffer for it and the split partials
            h = None
            ws = torch.empty(T * R + ws_elems, device=device, dtype=torch.float32)
            h_ptr = ws.data_ptr()
            ws_ptr = h_ptr + 4 * T * R
        counters = _counters(index, stream, device) if ws_elems else None
        scaling, scales = _scales(scaling, scale)
        call_extension(_C.decode_linear, plan=self.packed, x=x_ptr, sx=sx[0], w=w_ptr, sw=sw[0],
                       bias=0 if bias is None else bias.data_ptr(), a=lora_A.data_ptr(), sar=sa[0], sak=sa[1],
                       m=lora_B.data_ptr(), smr=sb[1], smn=sb[0], y=y.data_ptr(), h=h_ptr,
                       shrink_workspace=ws_ptr if self.shrink_elems else 0,
                       workspace=ws_ptr + 4 * self.shrink_elems if self.linear_elems else 0,
                       counters=0 if counters is None else counters.data_ptr(), scales=scales,
                       dropout=_dropout(seed, p_drop), stream=stream)
        return y, h


def keep_mask(seed: int, T: int, K: int, p_drop: float) -> torch.Tensor:
    """The (T, K) bool keep-mask the CUDA kernels use for ``seed``, computed on the host by the
    extension's own Philox code (runs without a GPU; the tests compare it with Triton's)."""
    if _C is None:
        _fail("keep_mask", "the CUDA extension is not loaded", RuntimeError)
    raw = _C.keep_mask(seed=int(seed), T=int(T), K=int(K), p=float(p_drop))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(T, K).bool() if T * K else torch.zeros(T, K,
                                                                                                           dtype=torch.bool)
