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
backend can also compute the base GEMM in the expand tile, ``fuse_base``). A launcher with a
``decode_plan`` (CUDA) runs a whole layer of at most DECODE_TOKENS tokens its own way: the plan
is prepared once per routing and signature and returns None for inputs it cannot take.

Backward (``flix_kernels::<backend>_lora_backward``): ``g = s_S * (dy B_S)``;
``dx = dy W + drop'(g A_S)``; ``dB = h^T dy`` and ``dA = g^T drop(x)`` per feature, by the
kernels' deterministic segment-owned reductions. Gradients of a trainable W / b are computed
here with torch. The dropout mask is regenerated from the saved seed.

Both ops take the routing's prebuilt :class:`~flix_kernels.routing.KernelMetadata` as its
``meta_args()`` (one list of tensors, one of ints, in the order the dataclass fixes) and have
fake implementations, so ``torch.compile(fullgraph=True)`` traces them without graph breaks,
and nothing inside synchronises with the host (CUDA-graph capturable). Eager calls skip
torch.library's dispatch and pass the metadata object itself to one autograd node
(:class:`_EagerLoRA`) with eight arguments.
"""

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._autograd import any_requires_grad, apply
from .._launch import DECODE_TOKENS, ExpandMode, next_pow2
from ..routing import META_INTS, KernelMetadata, Routing

__all__ = ["KernelOps", "draw_seed", "unfused_base"]


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
    cuBLAS then an in-place expand; ``fused`` calls ``launch.expand(mode=FUSED_BASE)``, which only the
    Triton launcher has; ``fuse_base()`` is the backend's current default for it.
    ``supports(x, lora_A)`` says why inputs cannot use the kernels (None when they can), and
    ``instead`` what to use then. The backend module exposes :meth:`prepare`, :meth:`delta` and
    :meth:`linear` of its instance.
    """

    def __init__(self, name: str, launch, device_types: tuple[str, ...], *, supports: Callable, instead: str,
                 base_path: Callable = unfused_base, fuse_base: Callable[[], bool] = lambda: False):
        self.name = name
        self.launch = launch
        self.decode_plan = getattr(launch, "decode_plan", None)  # the CUDA launcher's whole-layer decode path
        self.base_path = base_path
        self.supports, self.instead, self.fuse_base = supports, instead, fuse_base

        def forward_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                       scaling: Optional[Tensor], seed: Optional[Tensor], meta_tensors: list[Optional[Tensor]],
                       meta_ints: list[int], scale: float, dropout_p: float,
                       fuse_base: bool) -> tuple[Tensor, Tensor]:
            meta = KernelMetadata.from_args(meta_tensors, meta_ints)
            return self.forward(x, weight, bias, lora_A, lora_B, scaling, seed, meta, scale, dropout_p, fuse_base)

        def backward_op(meta_tensors: list[Optional[Tensor]], meta_ints: list[int], dy: Tensor, x: Tensor,
                        weight: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, h: Tensor, scaling: Optional[Tensor],
                        seed: Optional[Tensor], scale: float, dropout_p: float, fuse_base: bool, need_dx: bool,
                        need_dA: bool, need_dB: bool) -> tuple[Tensor, Tensor, Tensor]:
            meta = KernelMetadata.from_args(meta_tensors, meta_ints)
            grads = self.backward(meta, dy, x, weight, lora_A, lora_B, h, scaling, seed, scale, dropout_p, fuse_base,
                                  need_dx, need_dA, need_dB)
            return tuple(x.new_empty(0) if g is None else g for g in grads)  # distinct: op outputs may not alias

        self.forward_op = torch.library.custom_op(f"flix_kernels::{name}_lora_forward", mutates_args=(),
                                                  device_types=device_types)(forward_op)
        self.backward_op = torch.library.custom_op(f"flix_kernels::{name}_lora_backward", mutates_args=(),
                                                   device_types=device_types)(backward_op)
        self.forward_op.register_fake(_forward_fake)
        self.backward_op.register_fake(_backward_fake)
        self.forward_op.register_autograd(self._op_backward, setup_context=_op_setup_context)

    # -- the computation (eager: called by _EagerLoRA; compiled: by the custom ops) ----------
    def forward(self, x, weight, bias, lora_A, lora_B, scaling, seed, meta: KernelMetadata, scale: float,
                dropout_p: float, fuse_base: bool, decode=None, need_h: bool = True) -> tuple[Tensor, Tensor]:
        """``(y, h)``: y ``(T, out)`` = base (if weight) + FLix update; h ``(T, R_max)`` fp32 (may be
        None when not ``need_h``). ``decode``: the launcher's decode plan prepared for these shapes
        (else made here when the launcher has one and the shapes are decode's); it returns None for
        inputs it cannot take."""
        if weight is not None and self.decode_plan is not None and x.shape[0] <= DECODE_TOKENS and not fuse_base:
            if decode is None:
                decode = self.decode_plan(meta, x.shape[0], x.shape[1], weight.shape[0], lora_A.shape[0], x.dtype,
                                          lora_A.dtype, x.device)
            out = None if decode is None else decode(x, weight, bias, lora_A, lora_B, scaling, scale, seed, dropout_p,
                                                     need_h)
            if out is not None:
                return out
        launch, cdt = self.launch, lora_A.dtype
        cu, seq_len, slot_rank, slot_feature = meta.cu_seqlens, meta.seq_len, meta.slot_rank, meta.slot_feature
        h = launch.shrink(x, lora_A, *lora_A.stride(), slot_rank, slot_feature, cu, scaling, scale, seed, dropout_p,
                          seq_len, cdt)
        stride_br, stride_bn = lora_B.stride(1), lora_B.stride(0)
        if weight is None:
            y = x.new_empty((x.shape[0], lora_B.shape[0]))
            return launch.expand(h, lora_B, stride_br, stride_bn, y, slot_rank, slot_feature, cu, seq_len, cdt,
                                 mode=ExpandMode.WRITE), h

        def cublas_then_expand():
            if torch.is_autocast_enabled(x.device.type):  # x and weight are already in its dtype
                with torch.autocast(x.device.type, enabled=False):
                    y = F.linear(x, weight, bias)
            else:
                y = F.linear(x, weight, bias)
            return launch.expand(h, lora_B, stride_br, stride_bn, y, slot_rank, slot_feature, cu, seq_len, cdt,
                                 mode=ExpandMode.ACCUMULATE)

        if not fuse_base and self.base_path is unfused_base:
            return cublas_then_expand(), h

        def fused():
            y = x.new_empty((x.shape[0], lora_B.shape[0]))
            return launch.expand(h, lora_B, stride_br, stride_bn, y, slot_rank, slot_feature, cu, seq_len, cdt,
                                 mode=ExpandMode.FUSED_BASE, X2=x, W2=weight, stride_wn=weight.stride(0),
                                 stride_wk=weight.stride(1), bias=bias)

        T, N = x.shape[0], lora_B.shape[0]
        key = ("forward", T <= DECODE_TOKENS, next_pow2(T), N, x.shape[1], x.dtype)
        return self.base_path(key, fuse_base, fused, cublas_then_expand, x.device)(), h

    def backward(self, meta: KernelMetadata, dy, x, weight, lora_A, lora_B, h, scaling, seed, scale: float,
                 dropout_p: float, fuse_base: bool, need_dx: bool, need_dA: bool,
                 need_dB: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``(dx, dA, dB)`` of the FLix update (+ ``dy W`` in dx when weight is given); None for
        the gradients not asked for."""
        launch, cdt = self.launch, lora_A.dtype
        cu, seq_len, slot_rank, slot_feature = meta.cu_seqlens, meta.seq_len, meta.slot_rank, meta.slot_feature
        g = dB = None
        if need_dB and (need_dx or need_dA) and hasattr(launch, "dy_pass"):  # g and dB from one read of dy
            dB = torch.empty_like(lora_B)
            g = launch.dy_pass(dy, lora_B, lora_B.stride(1), lora_B.stride(0), h, dB, dB.stride(1), dB.stride(0), meta,
                               seq_len, meta.max_length, scaling, scale, cdt)
            if g is None:  # not at these sizes: the two passes below
                dB = None
        if g is None and (need_dx or need_dA):
            g = launch.shrink(dy, lora_B, lora_B.stride(1), lora_B.stride(0), slot_rank, slot_feature, cu, scaling,
                              scale, None, 0.0, seq_len, cdt)
        dx = dA = None
        if need_dx:
            stride_ar, stride_ak = lora_A.stride()
            if weight is None:
                dx = launch.expand(g, lora_A, stride_ar, stride_ak, x.new_empty(x.shape), slot_rank, slot_feature, cu,
                                   seq_len, cdt, mode=ExpandMode.WRITE, seed=seed, p_drop=dropout_p)
            else:
                def cublas_then_expand():
                    base = dy @ weight
                    return launch.expand(g, lora_A, stride_ar, stride_ak, base if base.dtype == x.dtype else
                                         base.to(x.dtype), slot_rank, slot_feature, cu, seq_len, cdt,
                                         mode=ExpandMode.ACCUMULATE, seed=seed, p_drop=dropout_p)

                if not fuse_base and self.base_path is unfused_base:
                    dx = cublas_then_expand()
                else:
                    def fused():
                        return launch.expand(g, lora_A, stride_ar, stride_ak, x.new_empty(x.shape), slot_rank,
                                             slot_feature, cu, seq_len, cdt, mode=ExpandMode.FUSED_BASE, X2=dy,
                                             W2=weight, stride_wn=weight.stride(1), stride_wk=weight.stride(0),
                                             seed=seed, p_drop=dropout_p)

                    T, K = x.shape
                    key = ("input_grad", T <= DECODE_TOKENS, next_pow2(T), K, dy.shape[1], x.dtype)
                    dx = self.base_path(key, fuse_base, fused, cublas_then_expand, x.device)()
        if need_dA and need_dB and dB is None and hasattr(launch, "weight_grad_pair"):  # one launch where it can
            dB, dA = torch.empty_like(lora_B), torch.empty_like(lora_A)
            launch.weight_grad_pair(h, dy, dB, dB.stride(1), dB.stride(0), g, x, dA, *dA.stride(), meta,
                                    seq_len, meta.max_length, cdt, seed=seed, p_drop=dropout_p)
            return dx, dA, dB
        if need_dB and dB is None:
            dB = torch.empty_like(lora_B)
            launch.weight_grad(h, dy, dB, dB.stride(1), dB.stride(0), meta, seq_len, meta.max_length, cdt)
        if need_dA:
            dA = torch.empty_like(lora_A)
            launch.weight_grad(g, x, dA, *dA.stride(), meta, seq_len, meta.max_length, cdt,
                               seed=seed, p_drop=dropout_p)
        return dx, dA, dB

    def _op_backward(self, ctx, dy, dh):
        saved = ctx.saved_tensors
        backward = functools.partial(self.backward_op, list(saved[7:]), ctx.meta_ints)
        return _grads(ctx, dy, saved[:7], backward, ctx.needs_input_grad[:5]) + (None,) * 7

    # -- backend entry points (inputs validated by flix_kernels.ops) ---------------------------
    def _check(self, x, lora_A) -> None:
        reason = self.supports(x, lora_A)
        if reason is not None:
            raise TypeError(f"{reason}; use {self.instead}")

    def prepare(self, routing: Routing, x, weight, lora_A, scaling) -> Callable:
        """The call for inputs shaped like these under ``routing`` (see :meth:`_prepare`)."""
        self._check(x, lora_A)
        return self._prepare(routing, x, weight, lora_A, scaling)

    def delta(self, x, lora_A, lora_B, routing, scaling, dropout_p, generator) -> Tensor:
        """Low-rank FLix update, shape ``x.shape[:-1] + (out,)``, dtype of x."""
        self._check(x, lora_A)
        return self._run(x, None, None, lora_A, lora_B, routing, scaling, dropout_p, generator)

    def linear(self, x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, generator) -> Tensor:
        """``F.linear(x, weight, bias) + delta(...)`` in one custom op (autocast's dtype if on)."""
        self._check(x, lora_A)
        return self._run(x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, generator)

    def _prepare(self, routing: Routing, x, weight, lora_A, scaling) -> Callable:
        """The call for inputs shaped like ``x`` under ``routing``: ``call(x, weight, bias, lora_A,
        lora_B, scaling, dropout_p, generator)`` -> ``x.shape[:-1] + (out,)``. Everything that
        depends only on the routing and the shapes is decided here, once."""
        if torch.is_tensor(scaling) and scaling.requires_grad:
            raise ValueError(f"backend {self.name!r} treats the per-feature scaling as a constant, but the scaling "
                             "tensor requires grad; detach it, or use backend='torch' to learn the scales")
        token_shape = tuple(x.shape[:-1])
        meta = routing.layer_metadata(x.device, token_shape)
        T = routing.classify(token_shape)[1]
        flat = len(token_shape) == 1  # x is (T, in) already
        decode = None
        if self.decode_plan is not None and weight is not None and T <= DECODE_TOKENS:
            act = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            decode = self.decode_plan(meta, T, x.shape[-1], weight.shape[0], lora_A.shape[0], act, lora_A.dtype,
                                      x.device)

        def call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, generator):
            if weight is not None and torch.is_autocast_enabled(x.device.type):
                dt = torch.get_autocast_dtype(x.device.type)
                x, weight = x.to(dt), weight.to(dt)
                bias = None if bias is None else bias.to(dt)
            seed = draw_seed(x.device, generator) if dropout_p > 0 else None
            if torch.is_tensor(scaling):
                scale_t, scale_f = scaling, 0.0
            else:
                scale_t, scale_f = None, float(scaling)
            fuse = weight is not None and self.fuse_base()
            x2d = x if flat else x.reshape(T, x.shape[-1])  # a reshape to the same shape is still a graph node
            if not (torch.is_grad_enabled() and any_requires_grad(x, weight, bias, lora_A, lora_B)):
                # Nothing to differentiate (inference, decode): no autograd node, whose apply alone
                # costs about as much host time as a launch; the decode plan called directly.
                out = None if decode is None else decode(x2d, weight, bias, lora_A, lora_B, scale_t, scale_f, seed,
                                                         dropout_p, need_h=False)
                y = out[0] if out is not None else self.forward(x2d, weight, bias, lora_A, lora_B, scale_t, seed, meta,
                                                                 scale_f, dropout_p, fuse, decode)[0]
            else:
                # The constants travel as one tuple: Function.apply inspects every argument.
                y, _ = apply(_EagerLoRA, (self, meta, scale_f, dropout_p, fuse, decode), x2d, weight, bias, lora_A,
                             lora_B, scale_t, seed)
            return y if flat else y.view(*token_shape, lora_B.shape[0])

        return call

    def _run(self, x, weight, bias, lora_A, lora_B, routing: Routing, scaling, dropout_p, generator) -> Tensor:
        """``flix_linear`` (weight given) or ``flix_delta`` in one call: eager through
        :meth:`_prepare`, under torch.compile through the custom op."""
        if not torch.compiler.is_compiling():
            return self._prepare(routing, x, weight, lora_A, scaling)(x, weight, bias, lora_A, lora_B, scaling, dropout_p, generator)
        kind, T, seq_len = routing.classify(x.shape[:-1])
        tensors, ints = routing.kernel_metadata(x.device).for_layout(kind, seq_len).meta_args()
        # The graph is specialised on these ints: bound the batch's largest feature rank (it only
        # sizes tiles) by the space's, a constant, so that batches of other feature sets reuse it.
        ints[META_INTS.index("max_pair_rank")] = ints[META_INTS.index("max_feature_rank")]
        if weight is not None and torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dt), weight.to(dt)
            bias = None if bias is None else bias.to(dt)
        seed = draw_seed(x.device, generator) if dropout_p > 0 else None
        scale_t = scaling if torch.is_tensor(scaling) else None
        scale_f = 0.0 if torch.is_tensor(scaling) else float(scaling)
        y, _ = self.forward_op(x.reshape(T, x.shape[-1]), weight, bias, lora_A, lora_B, scale_t, seed, tensors, ints,
                               scale_f, float(dropout_p), bool(weight is not None and self.fuse_base()))
        return y.view(*x.shape[:-1], lora_B.shape[0])


def _grads(ctx, dy, saved, backward, needs):
    """The five gradients ``(dx, dW, db, dA, dB)`` of a forward (eager or custom op);
    ``backward`` is :meth:`KernelOps.backward` or the backward op, bound to the metadata."""
    x, weight, lora_A, lora_B, h, scaling, seed = saved
    need_dx, need_dW, need_db, need_dA, need_dB = needs
    dx, dA, dB = backward(dy, x, weight, lora_A, lora_B, h, scaling, seed, ctx.scale, ctx.dropout_p,
                          ctx.fuse_base, need_dx, need_dA, need_dB)
    dW = (dy.t() @ x).to(weight.dtype) if need_dW else None
    db = dy.sum(0).to(weight.dtype) if (need_db and ctx.has_bias) else None
    return dx if need_dx else None, dW, db, dA if need_dA else None, dB if need_dB else None


class _EagerLoRA(torch.autograd.Function):
    """The ops' computation and autograd, called directly: same kernels, same saved tensors, the
    metadata passed as one object (torch.library's dispatch costs hundreds of us per step)."""

    @staticmethod
    def forward(ctx, constants, x, weight, bias, lora_A, lora_B, scaling, seed):
        ops, meta, scale, dropout_p, fuse_base, decode = constants
        y, h = ops.forward(x, weight, bias, lora_A, lora_B, scaling, seed, meta, scale, dropout_p, fuse_base, decode)
        ctx.save_for_backward(x, weight, lora_A, lora_B, h, scaling, seed)
        ctx.ops, ctx.meta = ops, meta
        _keep_scalars(ctx, scale, dropout_p, fuse_base, bias)
        ctx.mark_non_differentiable(h)
        ctx.set_materialize_grads(False)  # h gets no gradient: no zero tensor (a launch) for it
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        if dy is None:  # grads are not materialized (see forward)
            return (None,) * 8
        backward = functools.partial(ctx.ops.backward, ctx.meta)
        grads = _grads(ctx, dy, ctx.saved_tensors, backward, ctx.needs_input_grad[1:6])
        return (None,) + grads + (None,) * 2


def _keep_scalars(ctx, scale, dropout_p, fuse_base, bias):
    ctx.scale, ctx.dropout_p, ctx.fuse_base, ctx.has_bias = scale, dropout_p, fuse_base, bias is not None


def _op_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, seed, meta_tensors, meta_ints, scale, dropout_p, fuse_base = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], scaling, seed, *meta_tensors)
    ctx.meta_ints = meta_ints
    _keep_scalars(ctx, scale, dropout_p, fuse_base, bias)


def _forward_fake(x, weight, bias, lora_A, lora_B, scaling, seed, meta_tensors, *args):
    slots = meta_tensors[0].shape[1]  # slot_rank (B, R_max)
    return x.new_empty(x.shape[0], lora_B.shape[0]), x.new_empty(x.shape[0], slots, dtype=torch.float32)


def _backward_fake(meta_tensors, meta_ints, dy, x, weight, lora_A, lora_B, h, *args):
    need_dx, need_dA, need_dB = args[-3:]
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            torch.empty_like(lora_A) if need_dA else x.new_empty(0),
            torch.empty_like(lora_B) if need_dB else x.new_empty(0))
