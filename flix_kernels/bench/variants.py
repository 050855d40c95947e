"""What ``flix-kernels bench`` compares: the same FLix layer computed every way a user might.

Each variant turns one input set into ``(fn, leaves)``: ``fn()`` is the layer's output and
``leaves`` the tensors its backward differentiates. ``problem`` says which function it computes,
and so which oracle checks it: "flix" (the FLix layer on x, W, lora_A, lora_B), "single" (one
LoRA adapter of the active rank on every token, PEFT's layer: the same FLOPs with no routing) or
"base" (F.linear alone, the floor).

* ``base F.linear``: cuBLAS (or the CPU's BLAS) alone;
* ``torch loop``: a Python loop over the batch's features with index_select / index_add, as
  PEFT's mixed-batch inference and most hand-written multi-adapter code do;
* ``torch dense-masked``: every feature's rank rows for every token, masked per token;
* ``PEFT LoRA``: ``peft``'s own LoRA Linear with one adapter of rank = active rank;
* ``torch._grouped_mm``: (token, feature) pairs sorted by feature, two grouped GEMMs and a
  scatter-add, where this torch has the op;
* ``torch backend + compile``: ``torch.compile`` of our vectorised torch backend;
* ``ours: torch|triton|cuda``: :func:`flix_kernels.flix_linear` with that backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..ops import flix_linear
from ..reference import token_example_index
from ..routing import Routing
from .cases import SCALING, Case, Inputs


@dataclass
class Variant:
    name: str
    problem: str  # "flix", "single" or "base"
    prepare: Callable  # (ctx, Inputs) -> (fn, leaves)
    graphable: bool = True  # may be captured in a CUDA graph
    ours: bool = False
    # compiled backwards donate their buffers, so a kept graph cannot be walked twice: no "backward" alone
    modes: tuple[str, ...] = ("forward", "backward", "forward+backward")


@dataclass
class Context:
    case: Case
    routing: Routing
    device: torch.device
    cache: dict


# -- the per-feature loop (also the e2e comparison's layer) ------------------------------------
def feature_tokens(routing: Routing, token_shape, device) -> list[tuple[int, torch.Tensor]]:
    """``[(feature k, token indices using k)]`` for the features present, built once per
    routing and token shape (a loop implementation would build it once per batch too)."""
    def build():
        tok_ex = token_example_index(routing.num_examples, tuple(token_shape), routing.cu_seqlens)
        ids = routing.feature_ids
        out = []
        for k in torch.unique(ids[ids >= 0]).tolist():
            tokens = (ids == k).any(1)[tok_ex].nonzero().flatten()
            out.append((k, tokens.to(device)))
        return out

    return routing.cached(("bench_feature_tokens", tuple(token_shape), str(device)), build)


def loop_linear(x, weight, bias, lora_A, lora_B, routing: Routing, scaling) -> torch.Tensor:
    """``F.linear(x, W, b)`` plus each present feature's update on its own tokens, one feature
    at a time (gather, two matmuls, scatter-add); the update alone when ``weight`` is None."""
    offs = routing.space.rank_offsets
    x2 = x.reshape(-1, x.shape[-1])
    y = F.linear(x2, weight, bias) if weight is not None else x2.new_zeros(x2.shape[0], lora_B.shape[0])
    for k, tokens in feature_tokens(routing, x.shape[:-1], x.device):
        s = scaling[k] if torch.is_tensor(scaling) else scaling
        h = x2.index_select(0, tokens) @ lora_A[offs[k]:offs[k + 1]].t()
        y = y.index_add(0, tokens, (h @ lora_B[:, offs[k]:offs[k + 1]].t()) * s)
    return y.view(*x.shape[:-1], -1)


# -- variants ----------------------------------------------------------------------------------
def _base(ctx, s: Inputs):
    return (lambda: F.linear(s.x, s.weight)), [s.x]


def _loop(ctx, s: Inputs):
    return (lambda: loop_linear(s.x, s.weight, None, s.lora_A, s.lora_B, ctx.routing, SCALING)), \
        [s.x, s.lora_A, s.lora_B]


def _token_rank_mask(ctx, dtype):
    """(T, total_rank) mask times the scale: 1 where the token's example uses that rank row."""
    def build():
        r = ctx.routing
        tok_ex = token_example_index(r.num_examples, ctx.case.token_shape, None)
        mask = torch.zeros(r.num_examples, r.space.total_rank)
        valid = r.slot_valid.cpu()
        mask.scatter_add_(1, torch.where(valid, r.slot_rank_index.cpu(), 0), valid.float())  # invalid slots add 0
        return (mask[tok_ex] * SCALING).to(ctx.device, dtype)

    return ctx.cache.setdefault(("mask", dtype), build())


def _dense(ctx, s: Inputs):
    mask = _token_rank_mask(ctx, s.x.dtype)

    def fn():
        x2 = s.x.reshape(-1, s.x.shape[-1])
        y = F.linear(x2, s.weight) + ((x2 @ s.lora_A.t()) * mask) @ s.lora_B.t()
        return y.view(*s.x.shape[:-1], -1)

    return fn, [s.x, s.lora_A, s.lora_B]


def _peft(ctx, s: Inputs):
    """PEFT's LoRA layer, built through its public ``inject_adapter_in_model``."""
    from peft import LoraConfig, inject_adapter_in_model

    ra = ctx.case.active_rank
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(ctx.case.d_in, ctx.case.d_out, bias=False, device=ctx.device, dtype=s.x.dtype)
    with torch.no_grad():
        holder.proj.weight.copy_(s.weight)
    holder = inject_adapter_in_model(LoraConfig(r=ra, lora_alpha=SCALING * ra, lora_dropout=0.0,
                                                target_modules=["proj"]), holder)
    layer = holder.proj.to(ctx.device, s.x.dtype)
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        lora_A.copy_(s.single_A)
        lora_B.copy_(s.single_B)
    layer.base_layer.weight.requires_grad_(False)
    return (lambda: layer(s.x)), [s.x, lora_A, lora_B]


def grouped_mm_unavailable(case: Case, device: torch.device, dtype) -> Optional[str]:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (9, 0) or dtype != torch.bfloat16:
            return "torch._grouped_mm runs bf16 on Hopper (sm_90+) GPUs"
    elif dtype != torch.float32:
        return "torch._grouped_mm on CPU is only measured in float32"
    return None


def _pairs(ctx):
    """(token, feature) pairs sorted by feature: gather index, group ends, per-pair scale."""
    def build():
        r = ctx.routing
        tok_ex = token_example_index(r.num_examples, ctx.case.token_shape, None)
        ids = r.feature_ids[tok_ex]  # (T, G)
        tok = torch.arange(ctx.case.tokens).unsqueeze(1).expand_as(ids)
        keep = ids >= 0
        feat, tok = ids[keep], tok[keep]
        order = torch.argsort(feat, stable=True)
        counts = torch.bincount(feat, minlength=ctx.case.features)
        return tok[order].to(ctx.device), torch.cumsum(counts, 0).to(ctx.device, torch.int32)

    return ctx.cache.setdefault("pairs", build())


def _grouped(ctx, s: Inputs):
    c = ctx.case
    pair_token, ends = _pairs(ctx)

    def fn():
        x2 = s.x.reshape(-1, c.d_in)
        a = s.lora_A.view(c.features, c.rank, c.d_in).transpose(1, 2)  # (F, in, r)
        b = s.lora_B.view(c.d_out, c.features, c.rank).permute(1, 2, 0)  # (F, r, out)
        h = torch._grouped_mm(x2.index_select(0, pair_token), a, offs=ends)
        d = torch._grouped_mm(h, b, offs=ends) * SCALING
        y = F.linear(x2, s.weight).index_add(0, pair_token, d)
        return y.view(*s.x.shape[:-1], -1)

    return fn, [s.x, s.lora_A, s.lora_B]


def _ours(backend: str, compiled: bool = False):
    def prepare(ctx, s: Inputs):
        if compiled:
            key = ("compiled", backend)
            if key not in ctx.cache:
                ctx.cache[key] = torch.compile(
                    lambda x, W, A, B: flix_linear(x, W, None, A, B, ctx.routing, scaling=SCALING, backend=backend))
            f = ctx.cache[key]
            return (lambda: f(s.x, s.weight, s.lora_A, s.lora_B)), [s.x, s.lora_A, s.lora_B]
        return (lambda: flix_linear(s.x, s.weight, None, s.lora_A, s.lora_B, ctx.routing, scaling=SCALING,
                                    backend=backend)), [s.x, s.lora_A, s.lora_B]

    return prepare


# The comparison variants by the short name ``flix-kernels bench --compare`` takes (base always runs).
COMPARED_VARIANTS = {"loop": "torch loop", "dense": "torch dense-masked", "peft": "PEFT LoRA (r=active rank)",
                     "grouped_mm": "torch._grouped_mm", "compile": "torch backend + compile"}


def variants(device: torch.device, dtype, case: Case, *, compile_torch: bool, backends: list[str],
             compare: tuple[str, ...] | None = None) -> tuple[list[Variant], dict[str, str]]:
    """The variants that can run here, and ``{name: why not}`` for those that cannot;
    ``compare``: the keys of :data:`COMPARED_VARIANTS` to time beside base and ours (default all)."""
    wanted = set(COMPARED_VARIANTS.values() if compare is None else (COMPARED_VARIANTS[k] for k in compare))
    out = [Variant("base F.linear", "base", _base), Variant("torch loop", "flix", _loop),
           Variant("torch dense-masked", "flix", _dense)]
    skipped = {}
    try:
        import peft  # noqa: F401
        out.append(Variant("PEFT LoRA (r=active rank)", "single", _peft))
    except ImportError:
        skipped["PEFT LoRA (r=active rank)"] = "peft is not installed (pip install peft)"
    why = grouped_mm_unavailable(case, device, dtype)
    if why is None:
        out.append(Variant("torch._grouped_mm", "flix", _grouped))
    else:
        skipped["torch._grouped_mm"] = why
    if compile_torch and case.label.startswith(("headline", "decode")):  # each shape compiles anew: ~1 min per case
        out.append(Variant("torch backend + compile", "flix", _ours("torch", compiled=True), graphable=False,
                           modes=("forward", "forward+backward")))
    else:
        skipped["torch backend + compile"] = ("timed on the headline and decode shapes of GPU runs (or with --compile): "
                                              "each shape compiles anew")
    out = [v for v in out if v.problem == "base" or v.name in wanted]
    skipped = {name: why for name, why in skipped.items() if name in wanted}
    for b in ("torch", "triton", "cuda"):
        if b in backends:
            out.append(Variant(f"ours: {b}", "flix", _ours(b), ours=True))
    return out, skipped
