"""FLixLinear: a drop-in ``nn.Linear`` with one low-rank update per feature."""

from __future__ import annotations

import math
import numbers
import sys
from typing import Sequence

import torch
import torch.nn as nn

from . import _call_routing, _checkpoint
from .quantized import default_adapter_dtype, merge_error, quantized_kind
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


def check_alpha(alpha, ranks: Sequence[int] | None = None, use_rslora: bool = False,
                dtype: torch.dtype | None = None) -> float:
    """``alpha`` as a float; a ``TypeError``/``ValueError`` naming it unless it is a finite number > 0
    and, given the space's ``ranks`` and the adapters' ``dtype``, every per-feature scale
    ``alpha / r_k`` (``alpha / sqrt(r_k)`` with rsLoRA) is finite in that dtype and in the float32
    the scales are kept in (an infinite scale turns a fresh layer's ``inf * 0`` into NaN)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a number, got {alpha!r} ({type(alpha).__name__})")
    value = float(alpha)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if ranks:
        r = min(ranks)
        scale = value / (math.sqrt(r) if use_rslora else r)
        limit = min(torch.finfo(dt).max for dt in {dtype or torch.float32, torch.float32})
        if not scale <= limit:
            raise ValueError(f"alpha={alpha!r} gives the per-feature scale alpha / {'sqrt(r)' if use_rslora else 'r'} "
                             f"= {scale:.3g} for rank {r}, which overflows {dtype or torch.float32} "
                             f"(largest finite {limit:.3g}); choose a smaller alpha")
    return value


def linear_in_out(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if is_conv1d(base):
        return int(base.weight.shape[0]), int(base.weight.shape[1])
    raise TypeError(f"FLixLinear wraps nn.Linear or transformers' Conv1D, got {type(base).__name__}")


def _member(module: nn.Module, table: str, name: str):
    """``getattr(module, name)`` for a parameter, buffer or submodule, read from its own table
    (``Module.__getattr__`` costs about a microsecond a call on the decode path); anything else
    under that name (a parametrization's property, a plain attribute, an unregistered None) is
    read by getattr."""
    found = module.__dict__[table].get(name)
    return found if found is not None else getattr(module, name)


class FLixLinear(nn.Module):
    """``y = base(x) + sum_{k in S(x)} s_k B_k A_k drop(x)`` with a frozen base ``nn.Linear``.

    ``lora_A`` is ``(space.total_rank, in)`` and ``lora_B`` ``(out, space.total_rank)``;
    feature k owns the rank slice ``space.rank_offsets[k]:space.rank_offsets[k+1]``. The
    per-feature scale is ``alpha / r_k`` (``alpha / sqrt(r_k)`` with ``use_rslora``).
    Initialised like LoRA (A Kaiming-uniform, B zero), so a fresh layer equals its base.

    Args beyond ``nn.Linear``'s: ``space`` (the :class:`FeatureSpace`), ``alpha`` (a finite
    number > 0, default 8, PEFT's default ``lora_alpha``), ``dropout`` (on the low-rank input,
    training only), ``use_rslora``, ``init`` ("lora" or "gaussian": A ~ N(0, 1/r)),
    ``adapter_dtype`` (dtype of lora_A/lora_B; default the base weight's), ``backend`` (see
    :func:`flix_linear`).

    ``state_dict()`` keys are ``weight``, ``bias`` (the base layer's, under nn.Linear's names,
    so a plain model loads them), ``lora_A`` and ``lora_B``; loading also accepts the older
    ``base_layer.weight`` / ``base_layer.bias``. A merged layer's state dict holds its unmerged
    weight (a checkpoint is always base + adapters) and loading into a merged layer raises.
    """

    # Set by flix_kernels.distributed.ColwiseFLix / RowwiseFLix (tensor parallelism).
    _parallel = None
    # Set by flix_kernels.accept_feature_ids: how that model is routed, for the no-routing error.
    _no_routing_hint: str | None = None
    # What quantizes the base layer (flix_kernels.quantized.quantized_kind), None for a plain one.
    quantized: str | None = None

    def __init__(self, in_features: int, out_features: int, space: FeatureSpace, *, bias: bool = True,
                 alpha: float = 8.0, dropout: float = 0.0, use_rslora: bool = False, init: str = "lora",
                 adapter_dtype: torch.dtype | None = None, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base, space, alpha, dropout, use_rslora, init, adapter_dtype, backend)
        self._plain_state_dict_names()

    @classmethod
    def from_linear(cls, linear: nn.Linear, space: FeatureSpace, *, alpha: float = 8.0, dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "lora", adapter_dtype: torch.dtype | None = None,
                    backend: str = "auto") -> "FLixLinear":
        """Wrap an existing ``nn.Linear`` or transformers ``Conv1D`` (kept as the frozen
        ``base_layer``; no weight copy). Quantized linears (bitsandbytes ``Linear4bit`` /
        ``Linear8bitLt``, torchao quantized weights; :mod:`flix_kernels.quantized`) are kept as
        they are: their own forward gives ``W x + b``, and ``adapter_dtype`` defaults to float32
        over bitsandbytes' integer storage."""
        linear_in_out(linear)  # type check with a clear message
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, space, alpha, dropout, use_rslora, init, adapter_dtype, backend)
        self._plain_state_dict_names()
        return self

    def _setup(self, base, space, alpha, dropout, use_rslora, init, adapter_dtype, backend):
        if not isinstance(space, FeatureSpace):
            raise TypeError(f"space must be a FeatureSpace, got {type(space).__name__}")
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        check_alpha(alpha, space.ranks, use_rslora, adapter_dtype or default_adapter_dtype(base, quantized_kind(base)))
        self.base_layer = base
        # What unload / merge_and_unload give back to the base parameters.
        self._base_requires_grad = {n: p.requires_grad for n, p in base.named_parameters(recurse=False)}
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.in_features, self.out_features = linear_in_out(base)
        self.fan_in_fan_out = is_conv1d(base)  # base weight stored (in, out), as PEFT calls it
        self.space = space
        self.dropout = float(dropout)
        self.backend = backend
        self.quantized = quantized_kind(base)
        w = base.weight
        dt = adapter_dtype or default_adapter_dtype(base, self.quantized)
        self.lora_A = nn.Parameter(torch.empty(space.total_rank, self.in_features, device=w.device, dtype=dt))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, space.total_rank, device=w.device, dtype=dt))
        self.register_buffer("scaling", torch.empty(space.num_features, device=w.device), persistent=False)
        self.set_scaling(alpha, use_rslora)
        self.reset_adapters(init)
        self._routing: Routing | None = None
        self._last_routing: Routing | None = None  # recompute fallback, see _eager_routing
        self._merged: tuple[int, ...] | None = None
        self._merge_backup: torch.Tensor | None = None  # the base weight before merge, restored by unmerge
        self.train(base.training)  # a layer injected into an eval-mode model must not apply dropout

    # -- state dict ---------------------------------------------------------------------------
    # Keys ``weight`` / ``bias`` (not ``base_layer.weight``) so that a plain model loads an
    # injected model's checkpoint; PEFT's own layers (integrations/peft_layer.py) build
    # themselves without this and keep PEFT's ``base_layer.`` names.
    def _plain_state_dict_names(self) -> None:
        self.register_state_dict_post_hook(_base_keys_to_plain)
        self.register_load_state_dict_pre_hook(_plain_keys_to_base)
        self.register_load_state_dict_post_hook(_missing_base_keys_to_plain)

    def _fqn_modifiers(self) -> dict[str, str]:
        """For torch.distributed.checkpoint's get/set_model_state_dict: the state-dict names that
        live on ``base_layer`` (it reads this to map our keys back to the parameters)."""
        if not self._has_plain_state_dict_names():
            return {}
        return {n: "base_layer" for n in _base_state_names(self.base_layer)}

    def _has_plain_state_dict_names(self) -> bool:
        return _base_keys_to_plain in self._state_dict_hooks.values()

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
        if use_rslora not in (True, False):  # a saved "false" must not read as True
            raise TypeError(f"use_rslora must be True or False, got {use_rslora!r} ({type(use_rslora).__name__})")
        self.alpha = check_alpha(alpha, self.space.ranks, use_rslora, self.lora_A.dtype)
        self.use_rslora = bool(use_rslora)
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
        if self._merge_backup is not None:  # follows the weight's device and dtype
            self._merge_backup = fn(self._merge_backup)
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
        """Route this layer with ``routing`` in every thread until replaced (None clears); a
        per-call routing (``use_routing``, ``accept_feature_ids``, ``generate``) comes first."""
        if routing is not None:
            self.prepare_routing(routing)
        self._routing = routing

    def prepare_routing(self, routing: Routing) -> None:
        """Check that ``routing`` can route this layer (a Routing of this layer's FeatureSpace)
        and build what its forward will read, outside any compiled region or CUDA-graph capture:
        the kernels' metadata, and the slot tables the torch backend reads under torch.compile
        (three small tensors per batch, built once torch.compile's machinery is loaded: nothing
        compiles before)."""
        if not isinstance(routing, Routing):
            raise TypeError(f"routing must be a flix_kernels.Routing or None, got {type(routing).__name__}")
        self._check_space(routing)
        device = self.lora_A.device
        if self.backend == "triton" or (self.backend != "torch" and device.type == "cuda"):
            routing.kernel_metadata(device)
        if self.backend not in ("triton", "cuda") and "torch._dynamo" in sys.modules:
            routing.slot_tables(device)

    def _check_space(self, routing: Routing) -> None:
        """Raise unless ``routing`` was built from a space equal to this layer's: the same groups,
        values in the same order (which fixes the ids) and ranks. Compared once per space object."""
        space = routing.space
        if space is self.space or space is self.__dict__.get("_space_checked"):
            return
        if space != self.space:
            raise ValueError("the routing's FeatureSpace differs from this layer's ("
                             + space.describe_difference(self.space) + "); build the Routing with the model's "
                             "space (flix_kernels.flix_layers(model)[0][1].space)")
        self.__dict__["_space_checked"] = space  # a plain attribute, holding the space (its id stays its own)

    def _resolve_routing(self, routing: Routing | None) -> Routing:
        if torch.compiler.is_compiling():
            # A compiled graph recomputes checkpointed regions itself, not by re-running this.
            if routing is None:
                routing = _call_routing.traced(self, self._routing)
        else:
            routing = self._eager_routing(routing)
        if routing is None:
            raise RuntimeError(
                "FLixLinear has no routing: "
                + (self._no_routing_hint + "; or " if self._no_routing_hint else "pass forward(x, routing=...) or ")
                + "set one for the whole model with flix_kernels.set_routing(model, routing) or "
                "`with flix_kernels.use_routing(model, routing):`"
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
        # An eval-mode forward without grad saves nothing, so no region can recompute it.
        region = (_checkpoint.current_region(scan_stack=recompute or (self.training and not grad))
                  if recompute or grad or self.training else None)
        if recompute:
            if routing is None:
                saved = _checkpoint.recall(region, self) if region is not None else None
                routing = saved or self._last_routing or self._routing
            return routing
        if routing is None:
            routing = _call_routing.current(self, self._routing)
        else:
            self._check_space(routing)
        if region is not None:
            _checkpoint.remember(region, self, routing)
        if self.__dict__.get("_last_routing") is not routing:  # a plain attribute: skip Module.__setattr__
            self.__dict__["_last_routing"] = routing
        return routing

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        if self._merged is not None:
            self._check_merged_routing(routing if routing is not None else _call_routing.current(self, self._routing))
            y = self.base_layer(x)
            if self.training and torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad):
                # A training step: the forward is right, but the adapters would get no gradient.
                y = _NoTrainingWhileMerged.apply(y, self.lora_A, self._describe(self._merged))
            return y
        routing = self._resolve_routing(routing)
        if self._parallel is not None:  # tensor parallel: flix_kernels.distributed
            return self._parallel.forward(self, x, routing)
        p = self.dropout if self.training else 0.0
        base = _member(self, "_modules", "base_layer")
        lora_A, lora_B = _member(self, "_parameters", "lora_A"), _member(self, "_parameters", "lora_B")
        scaling = _member(self, "_buffers", "scaling")
        if type(base) is nn.Linear and self.quantized is None:
            return flix_linear(x, _member(base, "_parameters", "weight"), _member(base, "_parameters", "bias"), lora_A,
                               lora_B, routing, scaling=scaling, dropout_p=p, backend=self.backend)
        return base(x) + flix_delta(x, lora_A, lora_B, routing, scaling=scaling, dropout_p=p, backend=self.backend)

    # -- merging ------------------------------------------------------------------------------
    def _describe(self, feature_ids: Sequence[int]) -> str:
        return "{" + ", ".join(f"{g}={v!r}" for g, v in (self.space.feature_names[k] for k in feature_ids)) + "}"

    def _check_merged_routing(self, routing: Routing | None) -> None:
        if routing is not None and routing.num_examples and routing.uniform_features != self._merged:
            merged = self._describe(self._merged)
            raise RuntimeError(
                f"this layer has feature set {merged} merged into its weights, but the routing (set with "
                "set_routing / use_routing or passed to forward) asks for other features. To run the merged model, "
                "clear the routing with flix_kernels.set_routing(model, None) (a merged model needs none) or route "
                f"every example with {merged}; to route other features, call flix_kernels.unmerge(model) first"
            )

    @torch.no_grad()
    def delta_weight(self, feature_ids: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``sum_k s_k B_k A_k`` over ``feature_ids``, an ``(out, in)`` matrix."""
        rows, owners = self.space.rank_rows(list(feature_ids))
        rows, owners = rows.to(self.lora_A.device), owners.to(self.lora_A.device)
        s = self.scaling.to(dtype)[owners]
        return (self.lora_B[:, rows].to(dtype) * s) @ self.lora_A[rows].to(dtype)

    def _merge_ids(self, feature_ids: Sequence[int], what: str = "merge") -> tuple[int, ...]:
        if self._parallel is not None:
            raise RuntimeError(f"{what} is not supported on a tensor-parallel FLix layer")
        if self.quantized is not None:
            raise merge_error(self.quantized, what)
        ids = tuple(sorted(set(int(k) for k in feature_ids)))
        if not ids:
            raise ValueError(f"{what} needs at least one feature")
        bad = [k for k in ids if not 0 <= k < self.space.num_features]
        if bad:
            raise ValueError(f"{what}: feature ids {bad} are not in 0..{self.space.num_features - 1}")
        return ids

    @torch.no_grad()
    def _fold(self, ids: tuple[int, ...]) -> None:
        """``W <- W + delta`` rounded once to W's dtype (delta in float32, float64 for float64 W)."""
        w = self.base_layer.weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        delta = self._as_base_layout(self.delta_weight(ids, acc))
        if w.dtype == acc:
            w.add_(delta)
        else:
            w.copy_(w.to(acc) + delta)

    @torch.no_grad()
    def merge(self, feature_ids: Sequence[int]) -> None:
        """Fold one feature set into the base weight. A copy of the original weight is kept so that
        :meth:`unmerge` restores it exactly (one weight's memory while merged)."""
        if self._merged is not None:
            raise RuntimeError(f"already merged ({self._describe(self._merged)}); unmerge first")
        ids = self._merge_ids(feature_ids)
        self._merge_backup = self.base_layer.weight.detach().clone()
        self._fold(ids)
        self._merged = ids

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight :meth:`merge` changed, bit for bit."""
        if self._merged is None:
            return
        self.base_layer.weight.copy_(self._merge_backup)
        self._merged, self._merge_backup = None, None

    # For flix_kernels.merge_and_unload / unload (which check every layer first); the layer must
    # not be used after either.
    @torch.no_grad()
    def _merged_base(self, ids: tuple[int, ...]) -> nn.Module:
        """The base module with ``ids`` folded into its weight in place (no copy kept; a merge of
        the same set is kept as it is)."""
        if self._merged is None:
            self._fold(ids)
        self._merged, self._merge_backup = None, None
        return self._release_base()

    def _original_base(self) -> nn.Module:
        """The base module as it was before wrapping (a merge undone bit for bit)."""
        self.unmerge()
        return self._release_base()

    def _release_base(self) -> nn.Module:
        base = self.base_layer
        for name, p in base.named_parameters(recurse=False):
            p.requires_grad_(self._base_requires_grad.get(name, p.requires_grad))
        self._routing = self._last_routing = None
        return base

    def _as_base_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.t() if self.fan_in_fan_out else delta

    @property
    def merged(self) -> tuple[int, ...] | None:
        return self._merged

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, features={self.space.num_features}, "
                f"total_rank={self.space.total_rank}, alpha={self.alpha}, use_rslora={self.use_rslora}, "
                f"dropout={self.dropout}")


class _NoTrainingWhileMerged(torch.autograd.Function):
    """Identity on a merged layer's output whose backward raises: training a merged model would
    silently give the adapters no gradient (or fail in torch with 'element 0 of tensors does not
    require grad'). Forward-only use, e.g. evaluation in training mode, is unaffected."""

    @staticmethod
    def forward(ctx, y, lora_A, merged: str):
        ctx.merged = merged
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            f"backward through a FLix layer with feature set {ctx.merged} merged into its weights: a merged layer has "
            "no adapter path to train; call flix_kernels.unmerge(model) before training (inference works merged)")


# -- state-dict hooks (module-level functions: deepcopy and pickle keep them) ---------------------
_BASE = "base_layer."


def _base_state_names(base: nn.Module) -> list[str]:
    """First components of the base module's state-dict keys (``weight``, ``bias``)."""
    names = [n for n, _ in base.named_parameters(recurse=False)]
    names += [n for n, _ in base.named_buffers(recurse=False) if n not in base._non_persistent_buffers_set]
    names += list(base._modules)
    if type(base)._save_to_state_dict is not nn.Module._save_to_state_dict:
        # Quantized layers write entries of their own (bitsandbytes: SCB, weight_format, weight.absmax, ...).
        names += [k.split(".", 1)[0] for k in base.state_dict(keep_vars=True)]
    return list(dict.fromkeys(names))


def _base_keys_to_plain(module: FLixLinear, state_dict, prefix: str, local_metadata) -> None:
    """``<prefix>base_layer.weight`` -> ``<prefix>weight`` (same for bias), base keys first. A
    merged layer saves its unmerged weight: a checkpoint always means base + adapters."""
    # This module's keys are the last ones written (its own, then base_layer's): reorder them.
    own = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    for key, value in own.items():
        if key.startswith(prefix + _BASE):
            plain = prefix + key[len(prefix + _BASE):]
            merged_weight = module._merged is not None and plain == prefix + "weight"
            state_dict[plain] = module._merge_backup if merged_weight else value
    state_dict.update((k, v) for k, v in own.items() if not k.startswith(prefix + _BASE))


def _plain_keys_to_base(module: FLixLinear, state_dict, prefix: str, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs) -> None:
    """Accept ``<prefix>weight`` and the older ``<prefix>base_layer.weight`` alike."""
    module._loading_prefix = prefix
    if module._merged is not None and any(k.startswith(prefix) for k in state_dict):
        # Loading base weights or adapters under a merge would leave the merged weight stale.
        error_msgs.append(f"{prefix[:-1] or 'the FLix layer'}: has {module._describe(module._merged)} merged into its "
                          "weights; call flix_kernels.unmerge(model) before load_state_dict")
        for k in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[k]
        return
    names = _base_state_names(module.base_layer)
    keys = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0] in names]
    for key in keys:
        rest = key[len(prefix):]
        target = prefix + _BASE + rest
        if target in state_dict:
            error_msgs.append(f"the state dict has both {rest!r} and {_BASE + rest!r} under {prefix!r}: the plain and "
                              "the older name of the same FLix base parameter; keep one")
            continue
        state_dict[target] = state_dict.pop(key)


def _missing_base_keys_to_plain(module: FLixLinear, incompatible_keys) -> None:
    """Report a missing base parameter by the name state_dict() gives it."""
    prefix = getattr(module, "_loading_prefix", None)
    if prefix is None:
        return
    missing = incompatible_keys.missing_keys
    for i, key in enumerate(missing):
        if key.startswith(prefix + _BASE):
            missing[i] = prefix + key[len(prefix + _BASE):]
