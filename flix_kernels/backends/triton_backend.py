"""Backend "triton": the fused FLix kernels as autograd-aware ``torch.library`` custom ops.

Forward (``flix_kernels::lora_forward``), per token t of example e with rank slots S(e):

1. shrink: ``h[t] = s_S * (drop(x[t]) A_S^T)``, fp32 (T x R_max; tiny next to x, and keeping
   it in fp32 saves one rounding before the expand and in dB);
2. base + expand: ``y = x W^T + b`` by cuBLAS, then the expand kernel adds ``h B_S^T`` into y
   in place (``fuse_base=True`` instead runs the base GEMM in the expand kernel's tile, so y
   is written once).

Backward (``flix_kernels::lora_backward``): ``g = s_S * (dy B_S)`` (shrink kernel on dy);
``dx = dy W + drop'(g A_S)`` (cuBLAS + in-place expand, or fused); ``dB`` and ``dA`` by the
deterministic segment-owned reduction over (feature, example) pairs. Gradients of a trainable
W / b are computed here with torch. The dropout mask is regenerated from a saved seed.

Both ops take the routing's prebuilt :class:`~flix_kernels.routing.KernelMetadata` tensors and
have fake implementations, so ``torch.compile(fullgraph=True)`` traces them without graph
breaks, and no host-device synchronisation happens inside (CUDA-graph capturable).
"""

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..routing import KernelMetadata, Routing

try:  # Triton is optional (no wheels for some platforms); the backend reports why it is off.
    import triton  # noqa: F401

    from ..triton import launch

    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the install
    launch = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Default for the fused base GEMM (see module doc). Off until measured per shape on a GPU:
# cuBLAS + in-place expand is the safe default. FLIX_FUSE_BASE=1 turns it on.
FUSE_BASE = os.environ.get("FLIX_FUSE_BASE", "0") == "1"


def unavailable_reason(device) -> Optional[str]:
    if launch is None:
        return f"triton could not be imported ({_IMPORT_ERROR})"
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        return None
    if launch.interpreting():
        return None
    if dev is None and torch.cuda.is_available():
        return None
    return "the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 to run them on CPU tensors, slowly)"


def supports(x: Tensor, lora_A: Tensor) -> Optional[str]:
    """Why these inputs cannot use the Triton kernels (None when they can)."""
    for name, t in (("x", x), ("lora_A/lora_B", lora_A)):
        if t.dtype not in launch.SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} is not supported by the Triton kernels (float32, float16, bfloat16)"
    return None


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("flix_kernels::lora_forward", mutates_args=(), device_types=("cuda", "cpu"))
def lora_forward(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
    slot_rank: Tensor, slot_feature: Tensor, cu_seqlens: Optional[Tensor],
    pair_example: Tensor, pair_slot: Tensor, pair_feature: Tensor, feature_pair_start: Tensor,
    feature_rank: Tensor, rank_offsets: Tensor,
    scaling: Optional[Tensor], scale: float, seq_len: int, max_len: int, max_pair_rank: int,
    max_feature_rank: int, present_features: Tensor, dropout_p: float, seed: Optional[Tensor], fuse_base: bool,
) -> tuple[Tensor, Tensor]:
    """``(y, h)``: y ``(T, out)`` = base (if weight) + FLix update; h ``(T, R_max)`` fp32."""
    cdt = lora_A.dtype
    h = launch.shrink(x, lora_A, lora_A.stride(0), lora_A.stride(1), slot_rank, slot_feature, cu_seqlens,
                      scaling, scale, seed, dropout_p, seq_len, cdt)
    T, N = x.shape[0], lora_B.shape[0]
    common = (h, lora_B, lora_B.stride(1), lora_B.stride(0))
    meta = (slot_rank, slot_feature, cu_seqlens, seq_len, cdt)
    if weight is None:
        y = x.new_empty(T, N)
        launch.expand(*common, y, *meta, mode=0)
        return y, h

    def fused():
        y = x.new_empty(T, N)
        return launch.expand(*common, y, *meta, mode=2, X2=x, W2=weight, stride_wn=weight.stride(0),
                             stride_wk=weight.stride(1), bias=bias)

    def cublas_then_expand():
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x, weight, bias)
        return launch.expand(*common, y, *meta, mode=1)

    key = ("forward", T <= launch.DECODE_TOKENS, launch._bucket(T), N, x.shape[1], x.dtype)
    return _base_path(key, fuse_base, fused, cublas_then_expand, x.device)(), h


def _base_path(key, fuse_base, fused, unfused, device):
    """The fused or the cuBLAS + expand path: ``fuse_base`` decides, unless autotuning is on,
    in which case the faster of the two for this shape class is timed once and kept."""
    if launch.AUTOTUNE:
        fuse_base = launch.choose(key, {"cublas": unfused, "fused": fused}, device) == "fused"
    return fused if fuse_base else unfused


@lora_forward.register_fake
def _(x, weight, bias, lora_A, lora_B, slot_rank, *args):
    return x.new_empty(x.shape[0], lora_B.shape[0]), x.new_empty(x.shape[0], slot_rank.shape[1], dtype=torch.float32)


@torch.library.custom_op("flix_kernels::lora_backward", mutates_args=(), device_types=("cuda", "cpu"))
def lora_backward(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, h: Tensor,
    slot_rank: Tensor, slot_feature: Tensor, cu_seqlens: Optional[Tensor],
    pair_example: Tensor, pair_slot: Tensor, pair_feature: Tensor, feature_pair_start: Tensor,
    feature_rank: Tensor, rank_offsets: Tensor,
    scaling: Optional[Tensor], scale: float, seq_len: int, max_len: int, max_pair_rank: int,
    max_feature_rank: int, present_features: Tensor, dropout_p: float, seed: Optional[Tensor], fuse_base: bool,
    need_dx: bool, need_dA: bool, need_dB: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dA, dB)`` of the FLix update (+ ``dy W`` in dx when weight is given); empty
    tensors for the gradients not asked for."""
    cdt = lora_A.dtype
    T, K = x.shape
    meta = KernelMetadata(
        device=slot_rank.device, slot_rank=slot_rank, slot_feature=slot_feature, pair_example=pair_example,
        pair_slot=pair_slot, pair_feature=pair_feature, feature_pair_start=feature_pair_start,
        feature_rank=feature_rank, rank_offsets=rank_offsets, cu_seqlens=cu_seqlens, max_length=max_len,
        max_pair_rank=max_pair_rank, max_feature_rank=max_feature_rank, present_features=present_features)
    g = None
    if need_dx or need_dA:
        g = launch.shrink(dy, lora_B, lora_B.stride(1), lora_B.stride(0), slot_rank, slot_feature, cu_seqlens,
                          scaling, scale, None, 0.0, seq_len, cdt)
    dx, dA, dB = x.new_empty(0), x.new_empty(0), x.new_empty(0)  # distinct: op outputs may not alias
    if need_dx:
        common = (g, lora_A, lora_A.stride(0), lora_A.stride(1))
        kmeta = (slot_rank, slot_feature, cu_seqlens, seq_len, cdt)
        if weight is None:
            dx = x.new_empty(T, K)
            launch.expand(*common, dx, *kmeta, mode=0, seed=seed, p_drop=dropout_p)
        else:
            def fused():
                dx = x.new_empty(T, K)
                return launch.expand(*common, dx, *kmeta, mode=2, X2=dy, W2=weight, stride_wn=weight.stride(1),
                                     stride_wk=weight.stride(0), seed=seed, p_drop=dropout_p)

            def cublas_then_expand():
                dx = (dy @ weight).to(x.dtype)
                return launch.expand(*common, dx, *kmeta, mode=1, seed=seed, p_drop=dropout_p)

            key = ("input_grad", T <= launch.DECODE_TOKENS, launch._bucket(T), K, dy.shape[1], x.dtype)
            dx = _base_path(key, fuse_base, fused, cublas_then_expand, x.device)()
    if need_dB:
        dB = torch.empty_like(lora_B)
        launch.weight_grad(h, dy, dB, dB.stride(1), dB.stride(0), meta, seq_len, max_len, cdt)
    if need_dA:
        dA = torch.empty_like(lora_A)
        launch.weight_grad(g, x, dA, dA.stride(0), dA.stride(1), meta, seq_len, max_len, cdt,
                           seed=seed, p_drop=dropout_p)
    return dx, dA, dB


@lora_backward.register_fake
def _(dy, x, weight, lora_A, lora_B, h, *args):
    need_dx, need_dA, need_dB = args[-3:]
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            torch.empty_like(lora_A) if need_dA else x.new_empty(0),
            torch.empty_like(lora_B) if need_dB else x.new_empty(0))


_FWD_ARGS = ("x", "weight", "bias", "lora_A", "lora_B", "slot_rank", "slot_feature", "cu_seqlens",
             "pair_example", "pair_slot", "pair_feature", "feature_pair_start", "feature_rank", "rank_offsets",
             "scaling", "scale", "seq_len", "max_len", "max_pair_rank", "max_feature_rank", "present_features",
             "dropout_p", "seed", "fuse_base")


def _setup_context(ctx, inputs, output):
    named = dict(zip(_FWD_ARGS, inputs))
    _, h = output
    saved = [named[n] for n in ("x", "weight", "lora_A", "lora_B", "slot_rank", "slot_feature", "cu_seqlens",
                                "pair_example", "pair_slot", "pair_feature", "feature_pair_start", "feature_rank",
                                "rank_offsets", "scaling", "seed", "present_features")]
    ctx.save_for_backward(h, *saved)
    ctx.scalars = tuple(named[n] for n in ("scale", "seq_len", "max_len", "max_pair_rank", "max_feature_rank",
                                           "dropout_p"))
    ctx.fuse_base = named["fuse_base"]
    ctx.has_bias = named["bias"] is not None


def _backward(ctx, dy, dh):
    (h, x, weight, lora_A, lora_B, slot_rank, slot_feature, cu, pe, ps, pf, fps, fr, ro, scaling, seed,
     present) = ctx.saved_tensors
    scale, seq_len, max_len, max_pair_rank, max_feature_rank, dropout_p = ctx.scalars
    need = ctx.needs_input_grad
    need_dx, need_dW, need_db, need_dA, need_dB = need[0], need[1], need[2], need[3], need[4]
    dx, dA, dB = torch.ops.flix_kernels.lora_backward(
        dy, x, weight, lora_A, lora_B, h, slot_rank, slot_feature, cu, pe, ps, pf, fps, fr, ro, scaling,
        scale, seq_len, max_len, max_pair_rank, max_feature_rank, present, dropout_p, seed, ctx.fuse_base,
        need_dx, need_dA, need_dB)
    dW = (dy.t() @ x).to(weight.dtype) if need_dW else None
    db = dy.sum(0).to(weight.dtype) if (need_db and ctx.has_bias) else None
    return (dx if need_dx else None, dW, db, dA if need_dA else None, dB if need_dB else None) + (None,) * 19


lora_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Backend entry points (inputs validated by flix_kernels.ops)
# ---------------------------------------------------------------------------------------------
def _run(x, weight, bias, lora_A, lora_B, routing: Routing, scaling, dropout_p, generator):
    reason = supports(x, lora_A)
    if reason is not None:
        raise TypeError(reason + "; use backend='torch'")
    if torch.is_tensor(scaling) and scaling.requires_grad:
        raise ValueError("backend 'triton' treats the per-feature scaling as a constant, but the scaling tensor "
                         "requires grad; detach it, or use backend='torch' to learn the scales")
    kind, T, seq_len = routing.classify(x.shape[:-1])
    meta = routing.kernel_metadata(x.device)
    # A packed routing may also route a (B, in) input, one token per example (decode).
    cu = meta.cu_seqlens if kind == "packed" else None
    max_len = meta.max_length if kind == "packed" else seq_len
    in_f, out_f = x.shape[-1], lora_B.shape[0]
    if weight is not None and torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    x2d = x.reshape(T, in_f)
    seed = draw_seed(x.device, generator) if dropout_p > 0 else None
    scale_t = scaling if torch.is_tensor(scaling) else None
    scale_f = 0.0 if torch.is_tensor(scaling) else float(scaling)
    y, _ = torch.ops.flix_kernels.lora_forward(
        x2d, weight, bias, lora_A, lora_B, meta.slot_rank, meta.slot_feature, cu,
        meta.pair_example, meta.pair_slot, meta.pair_feature, meta.feature_pair_start, meta.feature_rank,
        meta.rank_offsets, scale_t, scale_f, seq_len, max_len, meta.max_pair_rank,
        meta.max_feature_rank, meta.present_features, float(dropout_p), seed, bool(FUSE_BASE and weight is not None))
    return y.view(*x.shape[:-1], out_f)


def draw_seed(device: torch.device, generator: Optional[torch.Generator] = None) -> Tensor:
    """The dropout seed of one call: a (1,) int64 tensor on ``device`` (no host sync, so a
    CUDA graph replays a fresh draw from the device generator)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64, generator=generator)


def delta(x, lora_A, lora_B, routing, scaling, dropout_p, generator):
    """Low-rank FLix update, shape ``x.shape[:-1] + (out,)``, dtype of x."""
    return _run(x, None, None, lora_A, lora_B, routing, scaling, dropout_p, generator)


def linear(x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, generator):
    """``F.linear(x, weight, bias) + delta(...)`` in one custom op (autocast's dtype if on)."""
    return _run(x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, generator)
