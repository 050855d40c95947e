"""Model utilities: inject FLix layers, route a whole model, merge a feature set, unload.

An injected model's ``state_dict()`` keeps the plain model's names for the base parameters
(``...q_proj.weight``; see :class:`~flix_kernels.FLixLinear`) with the adapters as extra keys
(``...q_proj.lora_A`` / ``lora_B``), so its checkpoints (``save_pretrained``, ``Trainer``)
load into the plain model (the adapters reported as unexpected keys) and back into an
injected one. :func:`merge_and_unload` and :func:`unload` give back plain layers.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterable, Mapping

import torch.nn as nn

from . import _call_routing
from .features import FeatureSpace
from .nn import FLixLinear, check_alpha, is_conv1d
from .routing import Routing

__all__ = ["flix_layers", "inject", "set_routing", "use_routing", "merge", "unmerge", "merge_and_unload", "unload"]


def flix_layers(model: nn.Module) -> list[tuple[str, FLixLinear]]:
    """``(name, layer)`` for every FLixLinear in ``model`` (the model itself included)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FLixLinear)]


def _require_layers(model: nn.Module) -> list[tuple[str, FLixLinear]]:
    layers = flix_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no FLix layers; call flix_kernels.inject(model, space, ...) first")
    return layers


def _output_head(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return None


def _reads_head_weight(model: nn.Module) -> str | None:
    """The name of ``model``'s forward when it reads its output head's weight itself instead of
    calling the head (Liger-Kernel's fused linear cross-entropy, which never materialises the
    logits), else None. A FLix head under such a forward would train without its update."""
    forward = model.__dict__.get("forward") or getattr(type(model), "forward", None)
    fn = getattr(forward, "__func__", forward)
    module = getattr(fn, "__module__", None) or ""
    return f"{module}.{getattr(fn, '__qualname__', '?')}" if module.startswith("liger_kernel") else None


def check_head(model: nn.Module) -> None:
    """Raise if ``model``'s output head is a FLix layer and its forward bypasses it (see
    :func:`_reads_head_weight`)."""
    if isinstance(_output_head(model), FLixLinear):
        forward = _reads_head_weight(model)
        if forward is not None:
            raise ValueError(_fused_head_message(forward))


def _fused_head_message(forward: str) -> str:
    return (f"the model's forward ({forward}) computes the loss from the output head's weight directly (fused linear "
            "cross-entropy), so a FLix output head would be bypassed in training and its adapters would get no "
            "gradient; leave the head out of target_modules (\"all-linear\" does), or apply Liger with "
            "fused_linear_cross_entropy=False")


def _candidate_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every nn.Linear (or transformers Conv1D, GPT-2's linear) not already inside a FLix
    layer, each occurrence of a shared module.

    Linears inside nn.MultiheadAttention are left out: it reads ``out_proj.weight`` directly
    instead of calling the module, so a wrapper there would be bypassed (or break it).
    """
    skip = [n + "." for n, m in model.named_modules() if isinstance(m, (FLixLinear, nn.MultiheadAttention))]
    out = []
    for name, m in model.named_modules(remove_duplicate=False):
        if (isinstance(m, nn.Linear) or is_conv1d(m)) and name and not any(name.startswith(p) for p in skip):
            out.append((name, m))
    return out


def _match(names: list[str], target_modules, head_names: set[str]) -> list[str]:
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return [n for n in names if n not in head_names]
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex: {e}") from None
        return [n for n in names if pattern.fullmatch(n)]
    if isinstance(target_modules, Iterable):
        targets = list(target_modules)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"target_modules must be non-empty names, got {targets!r}")
        return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    raise TypeError(f"target_modules must be a list of names, a regex or 'all-linear', got {type(target_modules).__name__}")


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def inject(model: nn.Module, space: FeatureSpace, *, target_modules, alpha: float = 8.0, dropout: float = 0.0,
           use_rslora: bool = False, init: str = "lora", adapter_dtype=None, backend: str = "auto") -> list[str]:
    """Replace matching ``nn.Linear`` modules by :class:`FLixLinear` in place; freeze the rest.

    ``target_modules``: module-name suffixes (``["q_proj", "v_proj"]``), a regex matched
    against full names, or ``"all-linear"`` (every nn.Linear but the output head). Returns the
    replaced names. Afterwards only the FLix ``lora_A``/``lora_B`` parameters require grad.
    Injecting again wraps more modules with the same space; modules that are FLix layers already
    are skipped (targets matching only those raise), and another FeatureSpace raises.
    :func:`unload` undoes it, :func:`merge_and_unload` folds one feature set in and undoes it.
    """
    if not isinstance(space, FeatureSpace):
        raise TypeError(f"space must be a FeatureSpace, got {type(space).__name__}")
    check_alpha(alpha)
    existing = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, FLixLinear)]
    for name, layer in existing:
        if layer.space != space:
            raise ValueError(f"{type(model).__name__} already has FLix layers of another FeatureSpace ({name!r}: "
                             f"{layer.space.describe_difference(space)}); a model has one FeatureSpace: inject with "
                             "the same space, or call flix_kernels.unload(model) first")
    candidates = _candidate_linears(model)
    head = _output_head(model)
    head_names = {n for n, m in candidates if m is head}
    names = _match([n for n, _ in candidates], target_modules, head_names)
    if not names:
        already = _match([n for n, _ in existing], target_modules, set()) if existing else []
        if already:
            shown = already if len(already) <= 8 else already[:8] + ["..."]
            raise ValueError(f"target_modules {target_modules!r} match only modules that are already FLix layers: "
                             f"{shown} are already FLix layers; call flix_kernels.unload(model) first to inject "
                             "anew, or target other modules")
        shown = [n for n, _ in candidates][:20]
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear in {type(model).__name__}; "
                         f"its linear modules include {shown}")
    fused = _reads_head_weight(model)
    if fused is not None and head_names.intersection(names):
        raise ValueError(_fused_head_message(fused))
    by_name = dict(candidates)
    wrapped: dict[int, FLixLinear] = {}  # a Linear shared by several names gets one FLix layer
    try:  # every layer built (and checked) before the model changes
        for name in names:
            lin = by_name[name]
            if id(lin) not in wrapped:
                wrapped[id(lin)] = FLixLinear.from_linear(lin, space, alpha=alpha, dropout=dropout,
                                                          use_rslora=use_rslora, init=init,
                                                          adapter_dtype=adapter_dtype, backend=backend)
    except BaseException:
        for layer in wrapped.values():  # wrapping froze their base weights
            layer._release_base()
        raise
    for name in names:
        _replace(model, name, wrapped[id(by_name[name])])
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in flix_layers(model):
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    return names


def set_routing(model: nn.Module, routing: Routing | None) -> None:
    """Route every FLix layer of ``model`` with ``routing`` until replaced (None clears), in every
    thread: the model-wide default under any per-call routing (:func:`use_routing`,
    :func:`~flix_kernels.accept_feature_ids`, :func:`~flix_kernels.generate`). All or nothing."""
    check_head(model)
    layers = [layer for _, layer in _require_layers(model)]
    if routing is not None:
        prepare_routing(layers, routing)
    for layer in layers:
        layer._routing = routing


def prepare_routing(layers, routing: Routing | None) -> None:
    """Check ``routing`` against every layer and build what their forwards read; raises before
    anything is routed."""
    if routing is not None:
        for layer in layers:
            layer.prepare_routing(routing)


@contextlib.contextmanager
def use_routing(model: nn.Module, routing: Routing | None):
    """``with use_routing(model, routing): ...`` routes the model inside the block only, and only
    for the thread or asyncio task running the block (other threads' forwards keep their own
    routing); None runs the block unrouted."""
    check_head(model)
    layers = [layer for _, layer in _require_layers(model)]
    prepare_routing(layers, routing)
    frame = _call_routing.push(use_routing, layers, routing)
    try:
        yield model
    finally:
        _call_routing.remove(frame)


def merge(model: nn.Module, features: Mapping[str, str]) -> None:
    """Fold the update of one feature set (``{group: value}``) into every FLix layer's base weight.

    A merged model needs no routing. A routing left set (say the last training batch's) that
    asks for other features raises at forward: clear it with ``set_routing(model, None)`` (or
    route every example with the merged set) to run the merged model, or :func:`unmerge` to
    route other features. Backward through a merged layer in training mode raises (it has no
    adapter path); eval and ``no_grad`` inference, ``generate`` included, work. Each layer
    keeps a copy of its original weight so that :func:`unmerge` restores it bit for bit; for
    a plain model without that copy use :func:`merge_and_unload`.
    """
    layers = _require_layers(model)
    for name, layer in layers:
        if layer.merged is not None:
            raise RuntimeError(f"layer {name!r} is already merged; call flix_kernels.unmerge(model) first")
    for _, layer in layers:
        layer.merge(layer.space.feature_ids(features))


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` on every FLix layer."""
    for _, layer in _require_layers(model):
        layer.unmerge()


def _unwrap(model: nn.Module, release) -> nn.Module:
    """Replace every occurrence of every FLix layer by ``release(layer)`` (once per layer, so a
    module shared by several names stays shared). Removes the hooks of
    :func:`~flix_kernels.accept_feature_ids`: the model is plain after."""
    layers = _require_layers(model)
    for name, layer in layers:
        if layer._parallel is not None:
            raise RuntimeError(f"layer {name!r} is tensor-parallel; merge_and_unload / unload need the model before "
                               "tensor parallelism is applied")
    bases = {id(layer): release(layer) for _, layer in layers}
    if isinstance(model, FLixLinear):  # the model is one FLix layer: its base is the plain model
        return bases[id(model)]
    for name, layer in [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, FLixLinear)]:
        _replace(model, name, bases[id(layer)])
    hooks = getattr(model, "_flix_feature_inputs", None)
    if hooks is not None:
        hooks.remove()
    _call_routing.remove_hooks(model)
    return model


def merge_and_unload(model: nn.Module, features: Mapping[str, str]) -> nn.Module:
    """Fold the feature set ``features`` (``{group: value}``) into every FLix layer's base weight
    and replace each FLix layer by its base module (the ``nn.Linear`` or ``Conv1D`` that
    :func:`inject` wrapped, the same object); returns ``model`` (the base module when ``model``
    is itself a FLix layer), now a plain model computing what the FLix model computed for
    examples with exactly these features.

    The merged weight is ``W + sum_k s_k B_k A_k`` rounded once to W's dtype (the update is
    computed in float32, float64 for float64 weights). A model already merged with the same
    set (:func:`merge`) keeps that merge; another set raises. The restored weights and biases
    get back the ``requires_grad`` they had when wrapped; the other parameters stay as
    :func:`inject` left them (frozen). To keep the adapters, use :func:`merge` (reversible).
    """
    if not isinstance(features, Mapping):
        raise TypeError(f"merge_and_unload takes one feature set {{group: value}} (the model then applies that set "
                        f"to every input), got {type(features).__name__}")
    layers = _require_layers(model)
    ids = {id(layer): tuple(layer.space.feature_ids(features)) for _, layer in layers}  # unknown features raise
    for name, layer in layers:  # every check before any layer changes
        layer._merge_ids(ids[id(layer)], "merge_and_unload")
        if layer.merged is not None and layer.merged != ids[id(layer)]:
            raise RuntimeError(f"layer {name!r} is merged with {layer._describe(layer.merged)}, not "
                               f"{layer._describe(ids[id(layer)])}; call flix_kernels.unmerge(model) first")
    return _unwrap(model, lambda layer: layer._merged_base(ids[id(layer)]))


def unload(model: nn.Module) -> nn.Module:
    """Replace every FLix layer by its base module, unchanged (a merged layer's original weight is
    restored bit for bit first); returns ``model``, as it was before :func:`inject` (or
    :func:`~flix_kernels.load_adapters`) wrapped its layers. The adapters are dropped: save them
    first with :func:`~flix_kernels.save_adapters`. ``requires_grad`` as in :func:`merge_and_unload`.
    """
    return _unwrap(model, lambda layer: layer._original_base())
