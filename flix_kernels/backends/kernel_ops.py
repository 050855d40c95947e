"""The FLix forward and backward as autograd-aware ``torch.library`` custom ops, over one set of
fused kernels. Backends "triton" (:mod:`flix_kernels.triton.launch`) and "cuda"
(:mod:`flix_kernels.cuda.launch`) each provide the same three launchers, with the same
arguments and semantics, and get their own pair of ops from :class:`KernelOps`:

* ``shrink(X, M, stride_mr, stride_mk, slot_rank, slot_feature, cu, scaling, scale, seed, p_drop,
  seq_len, compute_dtype) -> H``: ``H (T, R_slots)`` fp32 ``= s_S * drop(X) M_S^T``;
* ``expand(H, M, stride_mr, stride_mn, Y, slot_rank, slot_feature, cu, seq_len, compute_dtype, *,
  mode, seed=None, p_drop=0.0)``: ``Y = (mode 0) | += (mode 1) drop(H M_S)``;
* ``weight_grad(L, R, G, stride_gr, stride_gn, meta, seq_len, max_len, compute_dtype, *, seed=None,
  p_drop=0.0)``: per feature k, ``G[k's rows] = sum over k's tokens of L[t, slots of k]^T drop(R)[t]``.

Forward (``flix_kernels::<backend>_lora_forward``), per token t of example e with slots S(e):
``h = s_S * drop(x) A_S^T`` (fp32, T x R_max: tiny next to x, and one rounding fewer before the
expand and in dB), then ``y = x W^T + b`` by cuBLAS and ``y += h B_S^T`` in place (the Triton
backend can also compute the base GEMM in the expand tile, ``fuse_base``).

Backward (``flix_kernels::<backend>_lora_backward``): ``g = s_S * (dy B_S)``;
``dx = dy W + drop'(g A_S)``; ``dB = h^T dy`` and ``dA = g^T drop(x)`` per feature, by the
kernels' deterministic segment-owned reductions. Gradients of a trainable W / b are computed
here with torch. The dropout mask is regenerated from the saved seed.

Both ops take the routing's prebuilt :class:`~flix_kernels.routing.KernelMetadata` tensors and
have fake implementations, so ``torch.compile(fullgraph=True)`` traces them without graph
breaks, and nothing inside synchronises with the host (CUDA-graph capturable).
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..routing import KernelMetadata, Routing

__all__ = ["DECODE_TOKENS", "KernelOps", "draw_seed", "unfused_base"]

# Token counts up to this are the decode shape class (both kernel backends pick launch plans by it).
DECODE_TOKENS = 64

# Names of the forward op's arguments, in order (setup_context reads them by name).
_FWD_ARGS = ("x", "weight", "bias", "lora_A", "lora_B", "slot_rank", "slot_feature", "cu_seqlens",
             "pair_example", "pair_slot", "pair_feature", "feature_pair_start", "feature_rank", "rank_offsets",
             "scaling", "scale", "seq_len", "max_len", "max_pair_rank", "max_feature_rank", "present_features",
             "dropout_p", "seed", "fuse_base")
_SAVED = ("x", "weight", "lora_A", "lora_B", "slot_rank", "slot_feature", "cu_seqlens", "pair_example", "pair_slot",
          "pair_feature", "feature_pair_start", "feature_rank", "rank_offsets", "scaling", "seed", "present_features")
_SCALARS = ("scale", "seq_len", "max_len", "max_pair_rank", "max_feature_rank", "dropout_p")


def unfused_base(key, fuse_base, fused, unfused, device):
    """Base-path policy of a backend without a fused base GEMM: always cuBLAS + in-place expand."""
    return unfused


def draw_seed(device: torch.device, generator: Optional[torch.Generator] = None) -> Tensor:
    """The dropout seed of one call: a (1,) int64 tensor on ``device`` (no host sync, so a CUDA
    graph replays a fresh draw from the device generator). Both kernel backends turn it into the
    same keep-mask bits (Philox on the element's (k, t))."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64, generator=generator)


class KernelOps:
    """The custom ops ``flix_kernels::<name>_lora_forward`` / ``_lora_backward`` over ``launch``.

    ``base_path(key, fuse_base, fused, unfused, device) -> callable`` picks how ``x W^T + b``
    (and ``dy W`` in the input gradient) is combined with the low-rank update: ``unfused`` is
    cuBLAS then an in-place expand; ``fused`` calls ``launch.expand(mode=2)``, which only the
    Triton launcher has.
    """

    def __init__(self, name: str, launch, device_types: tuple[str, ...], base_path: Callable = unfused_base):
        self.name = name
        self.launch = launch
        self.base_path = base_path
        self.forward_body, self.backward_body = self._forward_impl(), self._backward_impl()
        self.forward_op = torch.library.custom_op(f"flix_kernels::{name}_lora_forward", mutates_args=(),
                                                  device_types=device_types)(self.forward_body)
        self.backward_op = torch.library.custom_op(f"flix_kernels::{name}_lora_backward", mutates_args=(),
                                                   device_types=device_types)(self.backward_body)
        self.forward_op.register_fake(_forward_fake)
        self.backward_op.register_fake(_backward_fake)
        self.forward_op.register_autograd(self._backward, setup_context=_setup_context)

    # -- the ops' bodies (closures over the launcher; torch.library infers the schema) ----------
    def _forward_impl(self):
        launch, base_path = self.launch, self.base_path

        def lora_forward(
            x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
            slot_rank: Tensor, slot_feature: Tensor, cu_seqlens: Optional[Tensor],
            pair_example: Tensor, pair_slot: Tensor, pair_feature: Tensor, feature_pair_start: Tensor,
            feature_rank: Tensor, rank_offsets: Tensor,
            scaling: Optional[Tensor], scale: float, seq_len: int, max_len: int, max_pair_rank: int,
            max_feature_rank: int, present_features: Tensor, dropout_p: float, seed: Optional[Tensor],
            fuse_base: bool,
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

            key = ("forward", T <= DECODE_TOKENS, _bucket(T), N, x.shape[1], x.dtype)
            return base_path(key, fuse_base, fused, cublas_then_expand, x.device)(), h

        return lora_forward

    def _backward_impl(self):
        launch, base_path = self.launch, self.base_path

        def lora_backward(
            dy: Tensor, x: Tensor, weight: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, h: Tensor,
            slot_rank: Tensor, slot_feature: Tensor, cu_seqlens: Optional[Tensor],
            pair_example: Tensor, pair_slot: Tensor, pair_feature: Tensor, feature_pair_start: Tensor,
            feature_rank: Tensor, rank_offsets: Tensor,
            scaling: Optional[Tensor], scale: float, seq_len: int, max_len: int, max_pair_rank: int,
            max_feature_rank: int, present_features: Tensor, dropout_p: float, seed: Optional[Tensor],
            fuse_base: bool, need_dx: bool, need_dA: bool, need_dB: bool,
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
                g = launch.shrink(dy, lora_B, lora_B.stride(1), lora_B.stride(0), slot_rank, slot_feature,
                                  cu_seqlens, scaling, scale, None, 0.0, seq_len, cdt)
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
                        return launch.expand(*common, dx, *kmeta, mode=2, X2=dy, W2=weight,
                                             stride_wn=weight.stride(1), stride_wk=weight.stride(0), seed=seed,
                                             p_drop=dropout_p)

                    def cublas_then_expand():
                        dx = (dy @ weight).to(x.dtype)
                        return launch.expand(*common, dx, *kmeta, mode=1, seed=seed, p_drop=dropout_p)

                    key = ("input_grad", T <= DECODE_TOKENS, _bucket(T), K, dy.shape[1], x.dtype)
                    dx = base_path(key, fuse_base, fused, cublas_then_expand, x.device)()
            if need_dB:
                dB = torch.empty_like(lora_B)
                launch.weight_grad(h, dy, dB, dB.stride(1), dB.stride(0), meta, seq_len, max_len, cdt)
            if need_dA:
                dA = torch.empty_like(lora_A)
                launch.weight_grad(g, x, dA, dA.stride(0), dA.stride(1), meta, seq_len, max_len, cdt,
                                   seed=seed, p_drop=dropout_p)
            return dx, dA, dB

        return lora_backward

    def _backward(self, ctx, dy, dh, eager: bool = False):
        (h, x, weight, lora_A, lora_B, slot_rank, slot_feature, cu, pe, ps, pf, fps, fr, ro, scaling, seed,
         present) = ctx.saved_tensors
        scale, seq_len, max_len, max_pair_rank, max_feature_rank, dropout_p = ctx.scalars
        need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[1:6] if eager else ctx.needs_input_grad[:5]
        dx, dA, dB = (self.backward_body if eager else self.backward_op)(
            dy, x, weight, lora_A, lora_B, h, slot_rank, slot_feature, cu, pe, ps, pf, fps, fr, ro, scaling,
            scale, seq_len, max_len, max_pair_rank, max_feature_rank, present, dropout_p, seed, ctx.fuse_base,
            need_dx, need_dA, need_dB)
        dW = (dy.t() @ x).to(weight.dtype) if need_dW else None
        db = dy.sum(0).to(weight.dtype) if (need_db and ctx.has_bias) else None
        return (dx if need_dx else None, dW, db, dA if need_dA else None, dB if need_dB else None) + (None,) * 19

    # -- backend entry point (inputs validated by flix_kernels.ops) ----------------------------
    def run(self, x, weight, bias, lora_A, lora_B, routing: Routing, scaling, dropout_p, generator,
            fuse_base: bool = False) -> Tensor:
        """``flix_linear`` (weight given) or ``flix_delta`` through the ops; output ``x.shape[:-1] + (out,)``."""
        if torch.is_tensor(scaling) and scaling.requires_grad:
            raise ValueError(f"backend {self.name!r} treats the per-feature scaling as a constant, but the scaling "
                             "tensor requires grad; detach it, or use backend='torch' to learn the scales")
        kind, T, seq_len = routing.classify(x.shape[:-1])
        meta = routing.kernel_metadata(x.device)
        # A packed routing may also route a (B, in) input, one token per example (decode).
        cu = meta.cu_seqlens if kind == "packed" else None
        max_len = meta.max_length if kind == "packed" else seq_len
        if weight is not None and torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dt), weight.to(dt)
            bias = None if bias is None else bias.to(dt)
        x2d = x.reshape(T, x.shape[-1])
        seed = draw_seed(x.device, generator) if dropout_p > 0 else None
        scale_t = scaling if torch.is_tensor(scaling) else None
        scale_f = 0.0 if torch.is_tensor(scaling) else float(scaling)
        # Eager calls skip torch.library's dispatch (hundreds of us per forward+backward on the host);
        # torch.compile traces the custom op, whose fake implementation keeps the graph whole.
        args = (
            x2d, weight, bias, lora_A, lora_B, meta.slot_rank, meta.slot_feature, cu,
            meta.pair_example, meta.pair_slot, meta.pair_feature, meta.feature_pair_start, meta.feature_rank,
            meta.rank_offsets, scale_t, scale_f, seq_len, max_len, meta.max_pair_rank,
            meta.max_feature_rank, meta.present_features, float(dropout_p), seed, bool(fuse_base and weight is not None))
        if torch.compiler.is_compiling():
            y, _ = self.forward_op(*args)
        else:
            y, _ = _EagerLoRA.apply(self, *args)
        return y.view(*x.shape[:-1], lora_B.shape[0])


class _EagerLoRA(torch.autograd.Function):
    """The custom ops' bodies and autograd, called directly: same kernels, same saved tensors."""

    @staticmethod
    def forward(ctx, ops: KernelOps, *args):
        y, h = ops.forward_body(*args)
        _setup_context(ctx, args, (y, h))
        ctx.ops = ops
        ctx.mark_non_differentiable(h)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        return (None,) + ctx.ops._backward(ctx, dy, dh, eager=True)


def _bucket(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _forward_fake(x, weight, bias, lora_A, lora_B, slot_rank, *args):
    return x.new_empty(x.shape[0], lora_B.shape[0]), x.new_empty(x.shape[0], slot_rank.shape[1], dtype=torch.float32)


def _backward_fake(dy, x, weight, lora_A, lora_B, h, *args):
    need_dx, need_dA, need_dB = args[-3:]
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            torch.empty_like(lora_A) if need_dA else x.new_empty(0),
            torch.empty_like(lora_B) if need_dB else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    named = dict(zip(_FWD_ARGS, inputs))
    _, h = output
    ctx.save_for_backward(h, *(named[n] for n in _SAVED))
    ctx.scalars = tuple(named[n] for n in _SCALARS)
    ctx.fuse_base = named["fuse_base"]
    ctx.has_bias = named["bias"] is not None
