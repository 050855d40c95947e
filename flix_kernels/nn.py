"""FLixLinear: a drop-in ``nn.Linear`` with one low-rank update per feature."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from . import _checkpoint
from .features import FeatureSpace
from .ops import flix_delta, flix_linear
from .routing import Routing

__all__ = ["FLixLinear", "is_conv1d"]

_INITS = ("lora", "gaussian")


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 style: a linear layer storing its weight as (in, out)).

    Checked without importing transformers: a model holding one has imported it already.
    """
    import sys
    utils = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(utils, "Conv1D", None) if utils is not None else None
    return cls is not None and isinstance(module, cls)


def linear_in_out(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if is_conv1d(base):
        return int(base.weight.shape[0]), int(base.weight.shape[1])
    raise TypeError(f"FLixLinear wraps nn.Linear or transformers' Conv1D, got {type(base).__name__}")


class FLixLinear(nn.Module):
    """``y = base(x) + sum_{k in S(x)} s_k B_k A_k drop(x)`` with a frozen base ``nn.Linear``.

    ``lora_A`` is ``(space.total_rank, in)`` and ``lora_B`` ``(out, space.total_rank)``;
    feature k owns the rank slice ``space.rank_offsets[k]:space.rank_offsets[k+1]``. The
    per-feature scale is ``alpha / r_k`` (``alpha / sqrt(r_k)`` with ``use_rslora``).
    Initialised like LoRA (A Kaiming-uniform, B zero), so a fresh layer equals its base.

    Args beyond ``nn.Linear``'s: ``space`` (the :class:`FeatureSpace`), ``alpha`` (default 8,
    PEFT's default ``lora_alpha``), ``dropout`` (on the low-rank input, training only),
    ``use_rslora``, ``init`` ("lora" or "gaussian": A ~ N(0, 1/r)), ``adapter_dtype`` (dtype
    of lora_A/lora_B; default the base weight's), ``backend`` (see :func:`flix_linear`).
    """

    # Set by flix_kernels.distributed.ColwiseFLix / RowwiseFLix (tensor parallelism).
    _parallel = None

    def __init__(self, in_features: int, out_features: int, space: FeatureSpace, *, bias: bool = True,
                 alpha: float = 8.0, dropout: float = 0.0, use_rslora: bool = False, init: str = "lora",
                 adapter_dtype: torch.dtype | None = None, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base, space, alpha, dropout, use_rslora, init, adapter_dtype, backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, space: FeatureSpace, *, alpha: float = 8.0, dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "lora", adapter_dtype: torch.dtype | None = None,
                    backend: str = "auto") -> "FLixLinear":
        """Wrap an existing ``nn.Linear`` or transformers ``Conv1D`` (kept as the frozen
        ``base_layer``; no weight copy)."""
        linear_in_out(linear)  # type check with a clear message
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, space, alpha, dropout, use_rslora, init, adapter_dtype, backend)
        return self

    def _setup(self, base, space, alpha, dropout, use_rslora, init, adapter_dtype, backend):
        if not isinstance(space, FeatureSpace):
            raise TypeError(f"space must be a FeatureSpace, got {type(space).__name__}")
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        self.base_layer = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.in_features, self.out_features = linear_in_out(base)
        self.fan_in_fan_out = is_conv1d(base)  # base weight stored (in, out), as PEFT calls it
        self.space = space
        self.dropout = float(dropout)
        self.backend = backend
        w = base.weight
        dt = adapter_dtype or w.dtype
        self.lora_A = nn.Parameter(torch.empty(space.total_rank, self.in_features, device=w.device, dtype=dt))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, space.total_rank, device=w.device, dtype=dt))
        self.register_buffer("scaling", torch.empty(space.num_features, device=w.device), persistent=False)
        self.set_scaling(alpha, use_rslora)
        self.reset_adapters(init)
        self._routing: Routing | None = None
        self._last_routing: Routing | None = None  # recompute fallback, see _eager_routing
        self._merged: tuple[int, ...] | None = None
        self._merge_backup: torch.Tensor | None = None
        self.train(base.training)  # a layer injected into an eval-mode model must not apply dropout

    # Models that inspect a projection's parameters (T5 reads ``wo.weight.dtype``; tied-weight
    # and init code look for ``.weight``) see the frozen base layer's, as with PEFT's layers.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # -- hyper-parameters -----------------------------------------------------------------------
    def set_scaling(self, alpha: float, use_rslora: bool = False) -> None:
        if getattr(self, "_merged", None) is not None:
            raise RuntimeError("cannot change the scaling of a merged layer; call flix_kernels.unmerge(model) first")
        self.alpha, self.use_rslora = float(alpha), bool(use_rslora)
        self._refresh_scaling()

    def _refresh_scaling(self) -> None:
        """(Re)build the per-feature scale buffer: float64 for float64 adapters, else float32."""
        r = torch.tensor(self.space.ranks, dtype=torch.float64)
        s = self.alpha / (r.sqrt() if self.use_rslora else r)
        dt = torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32
        self.scaling = s.to(device=self.scaling.device, dtype=dt)

    def _apply(self, fn, recurse=True):
        # module.to(torch.bfloat16) / .half() would round the scales (alpha / r_k) with the
        # weights; keep them exact as PEFT does with its Python-float scaling.
        out = super()._apply(fn, recurse)
        self._refresh_scaling()
        return out

    @torch.no_grad()
    def reset_adapters(self, init: str = "lora") -> None:
        """A like LoRA (Kaiming-uniform, or N(0, 1/r_k) per slice for "gaussian"), B = 0."""
        if init == "lora":
            # Same bound as PEFT/nn.Linear for each (r_k, in) slice: fan_in = in for all of them.
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            offs = self.space.rank_offsets
            for k, r in enumerate(self.space.ranks):
                nn.init.normal_(self.lora_A[offs[k]:offs[k + 1]], std=1.0 / r)
        else:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        nn.init.zeros_(self.lora_B)

    # -- routing --------------------------------------------------------------------------------
    def set_routing(self, routing: Routing | None) -> None:
        if routing is not None:
            if not isinstance(routing, Routing):
                raise TypeError(f"routing must be a flix_kernels.Routing or None, got {type(routing).__name__}")
            if routing.space != self.space:
                raise ValueError("the routing's FeatureSpace differs from this layer's: "
                                 + routing.space.describe_difference(self.space))
            device = self.lora_A.device
            kernels = self.backend == "triton" or (self.backend != "torch" and device.type == "cuda")
            if kernels and self._parallel is None:  # tensor-parallel layers run backend "torch"
                # Kernel metadata built now, outside any compiled region or CUDA-graph capture.
                routing.to(device)
        self._routing = routing

    def _resolve_routing(self, routing: Routing | None) -> Routing:
        if torch.compiler.is_compiling():
            # A compiled graph recomputes checkpointed regions itself, not by re-running this.
            routing = routing if routing is not None else self._routing
        else:
            routing = self._eager_routing(routing)
        if routing is None:
            raise RuntimeError(
                "FLixLinear has no routing: pass forward(x, routing=...) or set one for the whole model "
                "with flix_kernels.set_routing(model, routing) or `with flix_kernels.use_routing(model, routing):`"
            )
        return routing

    def _eager_routing(self, routing: Routing | None) -> Routing | None:
        """The routing of this call, replaying the original one in a checkpoint recomputation.

        Exact for non-reentrant checkpoint in every mode and for reentrant checkpoint in
        training mode: the routing is stored on the checkpoint region during the original
        forward and read back by its recomputation. Reentrant checkpoint runs the original
        forward under no_grad, which in eval mode is not inspected (that would cost every
        inference forward a stack walk); there, and for checkpoint implementations we do not
        recognise, the recomputation uses the routing of this layer's most recent forward.
        """
        recompute = _checkpoint.in_backward()
        grad = torch.is_grad_enabled()
        region = _checkpoint.current_region(scan_stack=recompute or (self.training and not grad))
        if recompute:
            if routing is None:
                saved = _checkpoint.recall(region, self) if region is not None else None
                routing = saved or self._last_routing or self._routing
            return routing
        routing = routing if routing is not None else self._routing
        if region is not None:
            _checkpoint.remember(region, self, routing)
        self._last_routing = routing
        return routing

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        if self._merged is not None:
            r = routing if routing is not None else self._routing
            if r is not None and r.num_examples and r.uniform_features != self._merged:
                raise RuntimeError(
                    f"this layer has feature set {self._describe(self._merged)} merged into its weights, but the "
                    "routing asks for other features; call flix_kernels.unmerge(model) first"
                )
            return self.base_layer(x)
        routing = self._resolve_routing(routing)
        if self._parallel is not None:  # tensor parallel: flix_kernels.distributed
            return self._parallel.forward(self, x, routing)
        p = self.dropout if self.training else 0.0
        if type(self.base_layer) is nn.Linear:
            w, b = self.base_layer.weight, self.base_layer.bias
            return flix_linear(x, w, b, self.lora_A, self.lora_B, routing, scaling=self.scaling, dropout_p=p,
                               backend=self.backend)
        return self.base_layer(x) + flix_delta(x, self.lora_A, self.lora_B, routing, scaling=self.scaling,
                                               dropout_p=p, backend=self.backend)

    # -- merging ------------------------------------------------------------------------------
    def _describe(self, feature_ids: Sequence[int]) -> str:
        return "{" + ", ".join(f"{g}={v!r}" for g, v in (self.space.feature_names[k] for k in feature_ids)) + "}"

    @torch.no_grad()
    def delta_weight(self, feature_ids: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``sum_k s_k B_k A_k`` over ``feature_ids``, an ``(out, in)`` matrix."""
        rows, owners = self.space.rank_rows(list(feature_ids))
        rows, owners = rows.to(self.lora_A.device), owners.to(self.lora_A.device)
        s = self.scaling.to(dtype)[owners]
        return (self.lora_B[:, rows].to(dtype) * s) @ self.lora_A[rows].to(dtype)

    @torch.no_grad()
    def merge(self, feature_ids: Sequence[int]) -> None:
        """Fold one feature set into the base weight (exact restore kept for low precision)."""
        if self._merged is not None:
            raise RuntimeError(f"already merged ({self._describe(self._merged)}); unmerge first")
        if self._parallel is not None:
            raise RuntimeError("merge is not supported on a tensor-parallel FLix layer")
        ids = tuple(sorted(set(int(k) for k in feature_ids)))
        if not ids:
            raise ValueError("merge needs at least one feature")
        w = self.base_layer.weight
        high = w.dtype in (torch.float32, torch.float64)
        self._merge_backup = None if high else w.detach().clone()
        w.add_(self._as_base_layout(self.delta_weight(ids, torch.float64 if w.dtype == torch.float64 else torch.float32))
               .to(w.dtype))
        self._merged = ids

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._merged is None:
            return
        w = self.base_layer.weight
        if self._merge_backup is not None:
            w.copy_(self._merge_backup)
        else:
            w.sub_(self._as_base_layout(self.delta_weight(self._merged, w.dtype)))
        self._merged, self._merge_backup = None, None

    def _as_base_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.t() if self.fan_in_fan_out else delta

    @property
    def merged(self) -> tuple[int, ...] | None:
        return self._merged

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, features={self.space.num_features}, "
                f"total_rank={self.space.total_rank}, alpha={self.alpha}, use_rslora={self.use_rslora}, "
                f"dropout={self.dropout}")
