"""Hugging Face transformers: route a model from its batch, collate feature dicts, generate.

A training script keeps its usual shape: examples carry a feature dict, :class:`FeatureCollator`
turns a list of them into model inputs plus ``feature_ids`` (and ``cu_seqlens`` when packing),
and a model prepared with :func:`accept_feature_ids` builds the batch's :class:`Routing` from
those inputs inside ``forward``, so ``model(**batch)`` (what ``Trainer`` calls) needs no custom
code. :func:`generate` wraps ``model.generate`` so that the routing follows the batch as
beam search or several return sequences repeat each example.

Nothing here imports transformers: the hooks only read keyword arguments, so any model whose
forward takes the inputs as keywords works.
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..features import FeatureSpace
from .. import _call_routing
from ..model import _require_layers, check_head, prepare_routing
from ..routing import Routing

__all__ = ["FeatureCollator", "accept_feature_ids", "cu_seqlens_from_position_ids", "feature_ids_tensor", "generate"]

# Inputs that fix a forward's batch size, most specific first: an encoder-decoder's top-level
# forward runs the decoder on decoder_input_ids while input_ids may be absent.
_BATCH_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds", "input_ids", "inputs_embeds")


def _layers_of(model: nn.Module) -> list:
    return [layer for _, layer in _require_layers(model)]


def feature_ids_tensor(feature_ids, space: FeatureSpace) -> torch.Tensor:
    """``feature_ids`` as a forward or :func:`generate` takes them: ``(B, num_groups)`` ids (as
    :meth:`FeatureSpace.encode` gives) or a list of one ``{group: value}`` dict per example
    (encoded with ``space``)."""
    if isinstance(feature_ids, torch.Tensor):
        return feature_ids
    if isinstance(feature_ids, Mapping):
        raise ValueError("feature_ids must be (B, num_groups) ids or a list of one {group: value} dict per example; "
                         "got a single dict (for a batch of one, pass [that dict])")
    if isinstance(feature_ids, (list, tuple)) and any(isinstance(e, Mapping) for e in feature_ids):
        for i, e in enumerate(feature_ids):
            if not isinstance(e, Mapping):
                raise ValueError(f"feature_ids given as a list of {{group: value}} dicts must hold one dict per "
                                 f"example; example {i} is a {type(e).__name__}")
        return space.encode(feature_ids)
    try:
        return torch.as_tensor(feature_ids)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"feature_ids must be (B, {space.num_groups}) integer ids (FeatureSpace.encode) or a list of "
                         f"one {{group: value}} dict per example; could not read {type(feature_ids).__name__}: {e}"
                         ) from None


# What a layer of a model prepared by accept_feature_ids says when a forward left it unrouted.
_NO_ROUTING_HINT = (
    "this model takes its routing from its inputs (flix_kernels.accept_feature_ids): pass feature_ids= to its "
    "forward, (B, num_groups) ids from FeatureSpace.encode or a list of one {group: value} dict per example "
    "(FeatureCollator adds them to a batch), or generate with flix_kernels.generate(model, ..., feature_ids=...)"
)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``(B + 1,)`` example boundaries of a packed ``(1, T)`` or ``(T,)`` position_ids row that
    restarts at 0 for each example (what packing collators emit)."""
    pos = position_ids.detach().reshape(-1).to("cpu", torch.long)
    if pos.numel() == 0:
        return torch.zeros(1, dtype=torch.long)
    starts = (pos == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("packed position_ids must start at 0 and restart at 0 for every example")
    return torch.cat([starts, torch.tensor([pos.numel()])])


class _FeatureInputs:
    """The forward hooks installed by :func:`accept_feature_ids`. Each forward's routing belongs
    to that forward (:mod:`flix_kernels._call_routing`): forwards running at once in several
    threads or asyncio tasks each use their own ``feature_ids``."""

    # The dropout generator's state in the model's state dict (so checkpoints carry it)
    GENERATOR_STATE = "flix_feature_dropout_generator_state"

    def __init__(self, model: nn.Module, feature_dropout: float, generator: torch.Generator | None):
        if not (0.0 <= float(feature_dropout) < 1.0):
            raise ValueError(f"feature_dropout must be in [0, 1), got {feature_dropout}")
        if generator is not None and not (isinstance(generator, torch.Generator) and generator.device.type == "cpu"):
            raise TypeError(f"generator must be a CPU torch.Generator (feature dropout is drawn on the host), got "
                            f"{generator!r}")
        # The FLix layers, found once: a forward only routes them.
        self.model, self.layers = model, _layers_of(model)
        self.space = self.layers[0].space
        self.feature_dropout, self.generator = float(feature_dropout), generator
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, always_call=True),
        ]
        if generator is not None:
            # Checkpoints (Trainer's, Accelerate's, torch.save of the state dict) carry the
            # generator's state, so a resumed run draws the same feature dropout as an unbroken one.
            model.register_buffer(self.GENERATOR_STATE, generator.get_state(), persistent=True)
            self._handles += [model.register_state_dict_pre_hook(self._generator_to_state),
                              model.register_load_state_dict_post_hook(self._generator_from_state)]
        for layer in self.layers:
            layer._no_routing_hint = _NO_ROUTING_HINT

    def _generator_to_state(self, module, prefix, keep_vars) -> None:
        getattr(self.model, self.GENERATOR_STATE).copy_(self.generator.get_state())

    def _generator_from_state(self, module, incompatible_keys) -> None:
        self.generator.set_state(getattr(self.model, self.GENERATOR_STATE).clone())

    def _routing(self, kwargs: dict) -> Routing | None:
        ids = kwargs.pop("feature_ids", None)
        cu = kwargs.pop("cu_seqlens", None)
        if ids is None:
            if cu is not None:
                raise ValueError("cu_seqlens was passed without feature_ids; pass both (FeatureCollator(pack=True) does)")
            return None
        ids = feature_ids_tensor(ids, self.space)
        if cu is None and ids.dim() and ids.shape[0] > 1:
            # A packed row of several examples (batch size 1, position_ids restarting at 0)
            # carries its boundaries in position_ids, e.g. from DataCollatorWithFlattening.
            pos = kwargs.get("position_ids")
            batch = next((kwargs[k] for k in _BATCH_INPUTS if kwargs.get(k) is not None), None)
            if pos is not None and batch is not None and batch.shape[0] == 1:
                cu = cu_seqlens_from_position_ids(pos)
        p = self.feature_dropout if self.model.training else 0.0
        return Routing(ids, self.space, cu_seqlens=cu, feature_dropout=p, generator=self.generator)

    # Run eagerly under torch.compile: building a Routing is host work. The graph breaks here, at
    # the model's entry, and the layers read the routing's prebuilt tables in one graph that every
    # batch reuses.
    @torch.compiler.disable
    def _pre(self, module, args, kwargs):
        routing = self._routing(kwargs)
        if routing is not None:
            prepare_routing(self.layers, routing)
            _call_routing.push(self, self.layers, routing)
        return args, kwargs

    @torch.compiler.disable
    def _post(self, module, args, output):
        _call_routing.remove(owner=self)
        return output

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for layer in self.layers:
            layer._no_routing_hint = None
        if self.generator is not None and self.GENERATOR_STATE in self.model._buffers:
            delattr(self.model, self.GENERATOR_STATE)
        self.model._flix_feature_inputs = None


def accept_feature_ids(model: nn.Module, *, feature_dropout: float = 0.0,
                       generator: torch.Generator | None = None) -> _FeatureInputs:
    """Let ``model(..., feature_ids=ids, cu_seqlens=None)`` route its FLix layers.

    Installs forward hooks on ``model`` that take ``feature_ids`` ``(B, num_groups)`` (as
    :meth:`FeatureSpace.encode` and :class:`FeatureCollator` produce them, or a list of one
    ``{group: value}`` dict per example, encoded with the layers' space) and the optional
    ``cu_seqlens`` out of the forward's keyword arguments, build the batch's :class:`Routing`
    (with ``feature_dropout`` while the model is in training mode), route every FLix layer for
    that forward and restore the previous routing afterwards. For a packed row (batch size 1)
    with ``position_ids`` and no ``cu_seqlens`` the boundaries are read from the positions.
    A forward without ``feature_ids`` keeps whatever routing the layers have
    (:func:`~flix_kernels.set_routing`; with none, the error names ``feature_ids=``).
    Activation checkpointing replays each forward's own routing. Returns a handle whose
    ``remove()`` uninstalls the hooks; calling it again replaces the previous hooks;
    :func:`~flix_kernels.unload` and :func:`~flix_kernels.merge_and_unload` remove them.

    With ``transformers.Trainer`` set ``TrainingArguments(remove_unused_columns=False)``: the
    Trainer otherwise drops dataset columns its model's signature does not name. Call it after
    :func:`~flix_kernels.inject` (the hooks route the FLix layers the model has at that time).
    """
    check_head(model)
    old = getattr(model, "_flix_feature_inputs", None)
    if old is not None:
        old.remove()
    handle = _FeatureInputs(model, feature_dropout, generator)
    model._flix_feature_inputs = handle
    return handle


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for key in _BATCH_INPUTS:
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor):
            return int(t.shape[0])
    if args and isinstance(args[0], torch.Tensor):
        return int(args[0].shape[0])
    return None


@torch.no_grad()
def generate(model: nn.Module, *args, feature_ids=None, routing: Routing | None = None, **kwargs):
    """``model.generate(*args, **kwargs)`` with every example using its own features.

    Pass ``feature_ids`` (``(B, num_groups)`` ids or a list of B ``{group: value}`` dicts) or a
    ``routing`` of the B prompts; one set (a single row or dict in a list) is used for every
    prompt, any other count than B or 1 raises. ``generate`` repeats each prompt for beam search
    and for several return sequences (``[e0, e0, e1, e1, ...]``); every forward it runs (the
    encoder of an encoder-decoder, then prefill and each decode step with the KV cache) is
    routed with the routing of its own batch size, B or a multiple of B, so beams of one example
    keep that example's features. The routing belongs to this call: generations running at
    once in other threads or asyncio tasks keep theirs.
    """
    if (feature_ids is None) == (routing is None):
        raise ValueError("generate needs exactly one of feature_ids= or routing=")
    layers = _layers_of(model)
    space = layers[0].space
    prompts = _batch_size(args, kwargs)
    if routing is None:
        ids = feature_ids_tensor(feature_ids, space)
        if prompts is not None and ids.dim() == 2 and ids.shape[0] == 1 and prompts > 1:
            ids = ids.expand(prompts, -1)  # one feature set for every prompt
        routing = Routing(ids, space)
        what = "feature sets"
    elif not isinstance(routing, Routing):
        raise TypeError(f"routing must be a flix_kernels.Routing, got {type(routing).__name__}")
    else:
        if routing.cu_seqlens is not None:
            raise ValueError("generate needs a routing of padded prompts (B, L), not a packed one (cu_seqlens)")
        if prompts is not None and routing.num_examples == 1 and prompts > 1:
            routing = routing.repeat_interleave(prompts)
        what = "examples in the routing"
    if prompts is not None and routing.num_examples != prompts:
        raise ValueError(f"generate got {routing.num_examples} {what} for {prompts} prompts; pass one per prompt, "
                         "or one for all of them")
    prepare_routing(layers, routing)
    # The encoder of an encoder-decoder is called directly by generate, not through forward.
    modules = [model]
    get_encoder = getattr(model, "get_encoder", None)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and callable(get_encoder):
        modules.append(get_encoder())
    for m in modules:
        _call_routing.install_hooks(m, _generate_pre, _generate_post)
    call = _Generation(modules, layers, routing)
    token = _GENERATIONS.set(_GENERATIONS.get() + (call,))
    outer = _call_routing.push(call, layers, routing)  # also covers forwards the hooks cannot size
    try:
        return model.generate(*args, **kwargs)
    finally:
        _call_routing.remove(outer)
        _GENERATIONS.reset(token)


class _Generation:
    """One :func:`generate` call: its modules, layers and the routing of each batch size."""

    def __init__(self, modules: list[nn.Module], layers: list, routing: Routing):
        self.modules, self.layers = modules, layers
        self.by_size: dict[int, Routing] = {routing.num_examples: routing}
        self.num_examples = routing.num_examples

    def routing_for(self, n: int) -> Routing:
        routing = self.by_size.get(n)
        if routing is None:
            B = self.num_examples
            if B == 0 or n % B:
                raise ValueError(f"generate ran a forward on a batch of {n} sequences, which is not a multiple of the "
                                 f"routing's {B} examples")
            routing = self.by_size[B].repeat_interleave(n // B)
            prepare_routing(self.layers, routing)
            self.by_size[n] = routing
        return routing


# The generate calls running in this thread or asyncio task, innermost last. The hooks that size
# each forward's routing are installed once per module and act only for this context's calls, so
# generations in other threads neither see them nor race with hooks being added and removed.
_GENERATIONS: contextvars.ContextVar[tuple[_Generation, ...]] = contextvars.ContextVar("flix_kernels_generate",
                                                                                       default=())


def _generation_of(module: nn.Module) -> _Generation | None:
    for call in reversed(_GENERATIONS.get()):
        if any(m is module for m in call.modules):
            return call
    return None


@torch.compiler.disable
def _generate_pre(module, args, kwargs):
    call = _generation_of(module)
    n = None if call is None else _batch_size(args, kwargs)
    if n is not None:
        _call_routing.push(call, call.layers, call.routing_for(n))


@torch.compiler.disable
def _generate_post(module, args, output):
    call = _generation_of(module)
    if call is not None:
        _call_routing.remove(owner=call)


class FeatureCollator:
    """Collate examples that carry a feature dict into model inputs plus ``feature_ids``.

    Each example is a dict with the model's fields (``input_ids``, optional ``labels``,
    ``attention_mask``, ...; lists or 1-D tensors) and ``feature_key`` (default "features")
    holding ``{group: value}``. Returns a dict of tensors with ``feature_ids`` ``(B,
    num_groups)`` added, ready for ``model(**batch)`` on a model prepared with
    :func:`accept_feature_ids`.

    * ``pack=False``: the remaining fields go through ``collator`` (any callable on a list of
      dicts, e.g. a transformers data collator) or, by default, are right-padded (``input_ids``
      with ``pad_token_id``, ``labels`` with ``label_pad_token_id`` (-100), ``attention_mask``
      with 0 and built when absent; ``padding_side="left"`` for generation prompts). The
      per-token fields (``labels``, ``attention_mask``, ``token_type_ids``, ``position_ids``)
      must have as many tokens as ``input_ids`` (a mismatch raises, naming the example): a
      causal LM's labels align with its inputs token by token. ``seq2seq=True`` is for
      encoder-decoder targets (T5): ``labels`` then have their own length and are padded to the
      longest ``labels``.
    * ``pack=True``: the examples are concatenated into one row ``(1, T)`` with
      ``position_ids`` restarting at 0 for each example and ``cu_seqlens`` ``(B + 1,)``; no
      attention mask and ``use_cache=False``, the case in which transformers' attention keeps
      the examples apart from their positions.
      ``labels`` default to ``input_ids``; the first label of every example is -100 so no
      example is trained to predict the start of the next one. ``flash_attn_kwargs=True``
      adds ``cu_seq_lens_q/k`` and ``max_length_q/k`` for flash-attention kernels.
    """

    _PAD_FIELDS = ("input_ids", "labels", "attention_mask", "token_type_ids", "position_ids")

    def __init__(self, space: FeatureSpace, *, feature_key: str = "features", collator: Callable | None = None,
                 pack: bool = False, pad_token_id: int = 0, label_pad_token_id: int = -100,
                 padding_side: str = "right", flash_attn_kwargs: bool = False, seq2seq: bool = False):
        if not isinstance(space, FeatureSpace):
            raise TypeError(f"space must be a FeatureSpace, got {type(space).__name__}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pack and collator is not None:
            raise ValueError("pack=True builds the packed row itself; it does not take a collator")
        if pack and seq2seq:
            raise ValueError("seq2seq=True does not pack: a packed row holds decoder-only examples whose labels align "
                             "with input_ids")
        self.seq2seq = bool(seq2seq)
        self.space, self.feature_key, self.collator, self.pack = space, feature_key, collator, bool(pack)
        self.pad_token_id, self.label_pad_token_id = int(pad_token_id), int(label_pad_token_id)
        self.padding_side, self.flash_attn_kwargs = padding_side, bool(flash_attn_kwargs)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        features, fields = [], []
        for i, ex in enumerate(examples):
            if not isinstance(ex, Mapping):
                raise TypeError(f"example {i}: expected a dict, got {type(ex).__name__}")
            if self.feature_key not in ex:
                raise KeyError(
                    f"example {i} has no {self.feature_key!r} entry (its keys: {sorted(ex)}); with transformers.Trainer "
                    "set TrainingArguments(remove_unused_columns=False), which otherwise drops it")
            features.append(ex[self.feature_key])
            fields.append({k: v for k, v in ex.items() if k != self.feature_key})
        batch = self._packed(fields) if self.pack else (self.collator(fields) if self.collator else self._padded(fields))
        batch = dict(batch)
        batch["feature_ids"] = self.space.encode(features)
        return batch

    @staticmethod
    def _row(ex: Mapping, key: str, i: int) -> torch.Tensor:
        t = torch.as_tensor(ex[key])
        if t.dim() != 1:
            raise ValueError(f"example {i}: {key} must be 1-D (one sequence), got shape {tuple(t.shape)}")
        return t

    def _padded(self, fields: list[dict]) -> dict[str, torch.Tensor]:
        if not fields:
            raise ValueError("cannot collate an empty list of examples")
        keys = list(fields[0])
        for i, ex in enumerate(fields):
            if set(ex) != set(keys):
                raise ValueError(f"example {i} has fields {sorted(ex)}, example 0 has {sorted(keys)}")
        out: dict[str, torch.Tensor] = {}
        lengths = [len(self._row(ex, "input_ids", i)) for i, ex in enumerate(fields)] if "input_ids" in keys else None
        pad_value = {"input_ids": self.pad_token_id, "labels": self.label_pad_token_id, "attention_mask": 0,
                     "token_type_ids": 0, "position_ids": 0}
        for key in keys:
            if key in self._PAD_FIELDS:
                rows = [self._row(ex, key, i) for i, ex in enumerate(fields)]
                if lengths is not None and key != "input_ids" and not (self.seq2seq and key == "labels"):
                    for i, r in enumerate(rows):
                        self._check_aligned(i, key, len(r), lengths[i])
                w = max(len(r) for r in rows)
                out[key] = torch.stack([self._pad(r, w, pad_value[key]) for r in rows])
            else:
                out[key] = torch.utils.data.default_collate([ex[key] for ex in fields])
        if lengths is not None and "attention_mask" not in out:
            w = out["input_ids"].shape[1]
            out["attention_mask"] = torch.stack([self._pad(torch.ones(n, dtype=torch.long), w, 0) for n in lengths])
        return out

    def _check_aligned(self, i: int, key: str, n: int, n_input: int) -> None:
        if n != n_input:
            hint = ("; labels align with input_ids token by token (for an encoder-decoder's targets pass "
                    "FeatureCollator(..., seq2seq=True))") if key == "labels" and not self.pack else ""
            raise ValueError(f"example {i}: {key} has {n} tokens, input_ids {n_input}{hint}")

    def _pad(self, row: torch.Tensor, width: int, value: int) -> torch.Tensor:
        pad = row.new_full((width - len(row),), value)
        return torch.cat([row, pad] if self.padding_side == "right" else [pad, row])

    def _packed(self, fields: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels, positions, lengths = [], [], [], []
        for i, ex in enumerate(fields):
            if "input_ids" not in ex:
                raise KeyError(f"example {i}: packing needs input_ids")
            x = self._row(ex, "input_ids", i)
            y = self._row(ex, "labels", i).clone() if "labels" in ex else x.clone()
            self._check_aligned(i, "labels", len(y), len(x))
            if len(x) == 0:
                raise ValueError(f"example {i} has no tokens; packing needs at least one per example")
            y[0] = self.label_pad_token_id
            ids.append(x), labels.append(y), positions.append(torch.arange(len(x))), lengths.append(len(x))
        cu = torch.zeros(len(lengths) + 1, dtype=torch.long)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        # use_cache=False: transformers only separates packed examples by their positions when
        # the forward has no KV cache (an eval-mode forward would otherwise attend across them).
        out = {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
               "position_ids": torch.cat(positions)[None], "cu_seqlens": cu, "use_cache": False}
        if self.flash_attn_kwargs:
            cu32 = cu.to(torch.int32)
            out.update(cu_seq_lens_q=cu32, cu_seq_lens_k=cu32, max_length_q=max(lengths), max_length_k=max(lengths))
        return out
