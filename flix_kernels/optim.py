"""An optimizer that treats every feature as its own parameters, as separate adapters would be.

All of a layer's features live in one ``lora_A`` / ``lora_B``, so a standard optimizer over those
tensors steps every feature's rows each step: AdamW decays the rows of features no example of
the batch used and keeps moving them with stale momentum; a feature seen in 1% of the batches
gets 99 steps of decay for each step of signal. With separate per-feature parameters (PEFT-style
adapters) an unused feature's gradient is None and the optimizer leaves it alone, its step count
included.

:func:`per_feature_optimizer` builds exactly that optimizer: its parameters are one view per
feature into each layer's ``lora_A`` rows and ``lora_B`` columns (sharing their storage, so the
model sees every update and nothing is copied), and before each step a feature's view gets the
matching slice of the layer's gradient when the feature was used, None when it was not. A
feature counts as used in a step when its slice of the gradient is not exactly zero: our ops give
an unused feature exact zeros (forward and backward isolation), and under data parallelism the
gradients are already reduced, so every rank makes the same decision without communication.
"""

from __future__ import annotations

import weakref
from typing import Mapping

import torch
import torch.nn as nn

from .model import _require_layers

__all__ = ["per_feature_optimizer"]


def per_feature_optimizer(optimizer_class: type[torch.optim.Optimizer], model: nn.Module, *,
                          group_options: Mapping[str, Mapping] | None = None, **defaults) -> torch.optim.Optimizer:
    """``optimizer_class(params, **defaults)`` over ``model``'s trainable parameters, with every
    FLix feature as separate parameters: the rows (of ``lora_A``) and columns (of ``lora_B``) of
    a feature that no example of the batch used are left exactly unchanged by a step, values and
    optimizer state (moments, step count) alike, as with one adapter per feature.

    Returns an instance of a subclass of ``optimizer_class`` (so learning-rate schedulers,
    ``Trainer(optimizers=...)``, ``state_dict`` and gradient scalers work). Its parameter groups:
    one per feature group of the space (``group["feature_group"]`` names it), updated by
    ``group_options[name]`` (``{"language": {"lr": 1e-3}}``), then one ``"other"`` group for the
    model's other trainable parameters, if any. ``zero_grad`` also clears the FLix layers' own
    gradients. A feature is unused in a step when its whole gradient slice is exactly zero (an
    example using it whose every token is masked out of the loss therefore does not count). The
    views alias the adapters' storage: build the optimizer after moving the model to its device
    and dtype. Not for FSDP2-sharded adapters (each rank would see only its shard's gradient).

    The optimizer hooks each adapter's ``lora_A`` / ``lora_B`` (a post-accumulate-grad hook that
    hands the views their gradient slices). ``optimizer.close()`` removes those hooks and the
    views' gradients; it is idempotent, and a ``step`` after it raises ``RuntimeError`` (its
    ``state_dict`` still works, to save or move the state to a new optimizer). An optimizer
    dropped without ``close()`` loses its hooks when it is garbage-collected, so building many
    over one model (a learning-rate search, a notebook) neither slows backward nor keeps
    gradients alive.
    """
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
    layers = [layer for _, layer in _require_layers(model) if layer.lora_A.requires_grad or layer.lora_B.requires_grad]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no trainable FLix layers")
    space = layers[0].space
    options = dict(group_options or {})
    unknown = sorted(set(options) - set(space.groups))
    if unknown:
        raise ValueError(f"group_options names {unknown}, which are not feature groups of the space "
                         f"(its groups: {list(space.groups)})")
    slices = _FeatureSlices(layers)
    flix = {id(p) for layer in layers for p in (layer.lora_A, layer.lora_B)}
    groups = [{"params": slices.by_group[g], "feature_group": g, **options.get(g, {})}
              for g in space.groups if slices.by_group[g]]
    seen, other = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in flix and id(p) not in seen:
            seen.add(id(p))
            other.append(p)
    if other:
        groups.append({"params": other, "feature_group": "other"})
    cls = type(f"PerFeature{optimizer_class.__name__}", (_PerFeature, optimizer_class), {})
    optimizer = cls(groups, **defaults)
    optimizer._flix_slices = slices
    # The hooks hold the slices only weakly; this removes them once the optimizer is collected
    # (the callback must not reference the optimizer, or it would never be collected).
    optimizer._flix_finalizer = weakref.finalize(optimizer, _remove_hooks, slices.handles)
    optimizer._flix_finalizer.atexit = False
    return optimizer


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class _PerFeature:
    """Mixed in before the optimizer class: before the step, the views of features unused by the
    step's gradient lose their gradient; ``zero_grad`` also clears the layers' gradients."""

    _flix_slices: "_FeatureSlices"
    _flix_finalizer: weakref.finalize

    def close(self) -> None:
        """Remove the hooks on the FLix layers and the views' gradients (idempotent); the state
        stays readable (``state_dict``), but ``step`` refuses to run."""
        self._flix_finalizer()  # runs _remove_hooks once, however often close() is called
        self._flix_slices.release()

    @torch.no_grad()
    def step(self, closure=None):
        if not self._flix_finalizer.alive:  # without hooks the views would see no gradient
            raise RuntimeError(f"this {type(self).__name__} was closed (close() removed its gradient hooks); "
                               "build a new one with per_feature_optimizer(...) and load this one's "
                               "state_dict() into it to continue training")
        loss = None
        if closure is not None:  # the closure recomputes the gradients the step uses
            with torch.enable_grad():
                loss = closure()
        self._flix_slices.drop_unused()
        try:
            out = super().step()
        finally:
            self._flix_slices.release()
        return out if loss is None else loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._flix_slices.zero_layer_grads(set_to_none)


class _FeatureSlices:
    """One parameter per (layer, feature, factor) viewing the feature's rows of ``lora_A`` or
    columns of ``lora_B``. After each backward (a post-accumulate-grad hook) every view gets its
    slice of the layer's gradient, so that gradient clipping and ``GradScaler.unscale_`` over the
    optimizer's parameters see them; just before the step the unused features' views lose it."""

    def __init__(self, layers):
        space = layers[0].space
        self.offsets = list(space.rank_offsets)
        self._offsets_on: dict[torch.device, torch.Tensor] = {}  # built once per device, not per step
        self.by_group: dict[str, list[nn.Parameter]] = {g: [] for g in space.groups}
        self.views: list[tuple[object, list[nn.Parameter], list[nn.Parameter]]] = []
        self.handles: list = []  # the hooks' RemovableHandles, removed by close() or collection
        me = weakref.ref(self)  # the hooks must not keep the slices (and their views' grads) alive
        for i, layer in enumerate(layers):
            a_views, b_views = [], []
            for k, (group, _) in enumerate(space.feature_names):
                start, size = self.offsets[k], self.offsets[k + 1] - self.offsets[k]
                a = nn.Parameter(layer.lora_A.data.narrow(0, start, size), requires_grad=layer.lora_A.requires_grad)
                b = nn.Parameter(layer.lora_B.data.narrow(1, start, size), requires_grad=layer.lora_B.requires_grad)
                a_views.append(a)
                b_views.append(b)
                self.by_group[group] += [v for v in (a, b) if v.requires_grad]
            self.views.append((layer, a_views, b_views))
            for factor, side, axis in ((layer.lora_A, 1, 0), (layer.lora_B, 2, 1)):
                if factor.requires_grad:
                    self.handles.append(factor.register_post_accumulate_grad_hook(_hand_out(me, i, side, axis)))

    def hand_out(self, grad: torch.Tensor, layer: int, side: int, axis: int) -> None:
        offsets = self.offsets
        for k, v in enumerate(self.views[layer][side]):
            v.grad = grad.narrow(axis, offsets[k], offsets[k + 1] - offsets[k])

    def _used(self) -> list[list[bool] | None]:
        """Per layer, per feature: whether its gradient slice has a nonzero entry (None for a layer
        without gradients); one device-to-host copy for all layers."""
        masks, where = [], []
        for layer, _, _ in self.views:
            rows = [(g != 0).any(axis) for g, axis in ((layer.lora_A.grad, 1), (layer.lora_B.grad, 0)) if g is not None]
            if not rows:
                where.append(None)
                continue
            count = torch.stack(rows).any(0).to(torch.int32).cumsum(0)  # nonzero rank rows up to each
            count = torch.cat([count.new_zeros(1), count])
            offs = self._offsets_on.get(count.device)
            if offs is None:
                offs = self._offsets_on[count.device] = torch.tensor(self.offsets, device=count.device)
            where.append(len(masks))
            masks.append((count[offs[1:]] - count[offs[:-1]]) > 0)
        flat = torch.stack(masks).cpu().tolist() if masks else []
        return [None if i is None else flat[i] for i in where]

    def drop_unused(self) -> None:
        for (_, a_views, b_views), used in zip(self.views, self._used()):
            for k in range(len(a_views)):
                if used is None or not used[k]:
                    a_views[k].grad = b_views[k].grad = None

    def release(self) -> None:
        for _, a_views, b_views in self.views:
            for v in (*a_views, *b_views):
                v.grad = None

    def zero_layer_grads(self, set_to_none: bool) -> None:
        for layer, _, _ in self.views:
            for p in (layer.lora_A, layer.lora_B):
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.zero_()


def _hand_out(slices: weakref.ref, layer: int, side: int, axis: int):
    """The post-accumulate-grad hook of one factor of one layer: its views get their slices of
    the gradient; nothing once the optimizer (and so its slices) is gone."""
    def hook(param):
        owner = slices()
        if owner is not None:
            owner.hand_out(param.grad, layer, side, axis)
    return hook
