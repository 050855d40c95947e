"""Routing: which features each example of a batch uses, built once per batch.

One :class:`Routing` is shared by every FLix layer of a model. It validates the feature ids
once, on the host, and derives everything a backend needs from them:

* per example, the *rank slots* it uses: the concatenated rank rows of its active features
  (``slot_rank_index``), the feature owning each slot (``slot_feature``) and which slots are
  real (``slot_valid``), padded to the largest active rank of the batch (``max_active_rank``);
* per token layout (the shape of the layer input: ``(B, L)``, ``(B,)`` or packed with
  ``cu_seqlens``), how tokens map to examples (:class:`TokenLayout`).

Backends cache their own per-layout device tensors through :meth:`Routing.cached`, so
metadata is computed and copied to the device once per batch, not once per layer, and no
layer forces a host-device synchronisation.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Callable, Hashable, Mapping, Sequence

import torch

from .features import FeatureSpace

__all__ = ["KernelMetadata", "Routing", "TokenLayout"]

_UNSET = object()  # a lazily computed attribute not computed yet (None is a value)


@dataclass(frozen=True)
class KernelMetadata:
    """A routing's metadata as int32 tensors on one device, for the fused kernels.

    Built once per routing and device (:meth:`Routing.to`), so a layer's forward and backward
    only pass tensors: no host work, no host-device copy, nothing a CUDA graph cannot replay.

    * ``slot_rank`` / ``slot_feature`` ``(B, R_max)``: per example, its rank slots (rows of
      lora_A) and the feature owning each (-1 for padding).
    * ``pair_example`` / ``pair_slot`` / ``pair_feature`` ``(P,)``: every (example, active
      feature) pair, sorted by feature then example; ``pair_slot`` is where the feature's
      slots start in the example's slot list. ``feature_pair_start`` ``(F + 1,)`` indexes the
      pairs of each feature (empty for features absent from the batch).
    * ``feature_rank`` ``(F,)`` and ``rank_offsets`` ``(F + 1,)``: the feature space.
    * ``cu_seqlens`` ``(B + 1,)`` for packed routings, else None; ``max_length`` the longest
      packed example (host int); ``max_pair_rank`` the largest rank of a feature in the batch,
      ``max_feature_rank`` of the space; ``present_features`` ``(F_p,)`` the features the batch
      uses (its length matters to the kernels' launch plan).
    * ``seq_len``: tokens per example of a batched layer input (0 for packed inputs, whose
      examples ``cu_seqlens`` delimits); see :meth:`for_layout`.

    Every batch-dependent size is a tensor dimension marked dynamic for ``torch.compile``, so
    a new batch with other sizes does not recompile a compiled model; ``max_length`` is
    rounded up to a power of two for the same reason (it only bounds a launch grid).
    """

    device: torch.device
    slot_rank: torch.Tensor
    slot_feature: torch.Tensor
    pair_example: torch.Tensor
    pair_slot: torch.Tensor
    pair_feature: torch.Tensor
    feature_pair_start: torch.Tensor
    feature_rank: torch.Tensor
    rank_offsets: torch.Tensor
    cu_seqlens: torch.Tensor | None
    max_length: int
    max_pair_rank: int
    max_feature_rank: int
    present_features: torch.Tensor
    seq_len: int = 0

    def for_layout(self, kind: str, seq_len: int) -> "KernelMetadata":
        """This metadata for a layer input of ``kind`` (:meth:`Routing.classify`): a batched input
        of a packed routing (decode after a packed prefill) has no ``cu_seqlens``, and its longest
        example is ``seq_len`` tokens."""
        if kind == "packed":
            return self
        return replace(self, cu_seqlens=None, max_length=seq_len, seq_len=seq_len)

    def meta_args(self) -> tuple[list, list]:
        """``(tensors, ints)``: the fields as the custom ops take them, in the one order that
        :data:`META_TENSORS` and :data:`META_INTS` fix (:meth:`from_args` inverts it)."""
        return [getattr(self, n) for n in META_TENSORS], [getattr(self, n) for n in META_INTS]

    @classmethod
    def from_args(cls, tensors, ints) -> "KernelMetadata":
        return cls(device=tensors[0].device, **dict(zip(META_TENSORS, tensors)), **dict(zip(META_INTS, ints)))


META_INTS = ("max_length", "max_pair_rank", "max_feature_rank", "seq_len")
META_TENSORS = tuple(f.name for f in fields(KernelMetadata) if f.name not in META_INTS and f.name != "device")


def _graph_input(t: torch.Tensor, dynamic=(), unbacked=()) -> torch.Tensor:
    """``t`` ready to be a compiled graph's input whose sizes vary by batch: ``dynamic`` dims
    marked dynamic, ``unbacked`` ones too with sizes 0 and 1 included (torch.compile otherwise
    specialises those), and an empty tensor given the strides of a non-empty one of its shape
    (torch gives empty tensors strides of 1, which a graph's stride guards reject)."""
    if t.numel() == 0 and t.dim() > 1:
        t = t.as_strided(t.shape, [math.prod(t.shape[i + 1:]) for i in range(t.dim())])
    if "torch._dynamo" in sys.modules:  # nothing is compiled without it
        for dim in dynamic:
            torch._dynamo.maybe_mark_dynamic(t, dim)
        for dim in unbacked:
            torch._dynamo.decorators.mark_unbacked(t, dim)
    return t


@dataclass(frozen=True)
class TokenLayout:
    """How the tokens of one layer input map to the examples of the routing.

    ``lengths[b]`` tokens belong to example b; they are tokens ``offsets[b]:offsets[b+1]`` of
    the input flattened to ``(num_tokens, in)``. ``kind`` is "batched" (input ``(B, L, in)``
    or ``(B, in)``, every example ``L`` tokens) or "packed" (``(T, in)`` / ``(1, T, in)`` split
    by ``cu_seqlens``). Host-side (CPU) tensors only.
    """

    kind: str
    num_tokens: int
    lengths: torch.Tensor  # (B,) int64, CPU
    offsets: torch.Tensor  # (B + 1,) int64, CPU

    @property
    def key(self) -> tuple:
        if self.kind == "batched":
            return ("batched", int(self.lengths.numel()), self.num_tokens)
        return ("packed", self.num_tokens)

    def token_example(self) -> torch.Tensor:
        """(num_tokens,) int64: the example of each token (CPU)."""
        return torch.repeat_interleave(torch.arange(self.lengths.numel()), self.lengths)


class Routing:
    """Per-example active features of a batch, shared by every FLix layer.

    Args:
        feature_ids: ``(B, num_groups)`` integer ids as :meth:`FeatureSpace.encode` returns
            them: column g holds the global id of the example's feature of group g, or -1.
        space: the :class:`FeatureSpace` the ids refer to.
        cu_seqlens: ``(B + 1,)`` cumulative token counts for packed inputs ``(T, in)`` or
            ``(1, T, in)``; example b owns tokens ``cu_seqlens[b]:cu_seqlens[b+1]``.
        feature_dropout: probability of dropping each active feature of each example
            (FLix's feature dropout; for training batches only). Drawn once, here.
        generator: CPU ``torch.Generator`` for the feature dropout draw.

    Validation happens here, on the host, once per batch (ids on a GPU are copied to the
    host once). Invalid ids raise ``ValueError`` naming the example. ``feature_ids`` may also
    be a list of one ``{group: value}`` dict per example (encoded with ``space``).

    What the routing builds per token layout or call signature (layouts, backend plans, the
    validated calls of :mod:`flix_kernels.ops`) is kept in LRU caches of ``cache_limit``
    entries each, so a long-lived routing fed ever new shapes holds a bounded amount.
    """

    cache_limit = 64  # entries per LRU cache (_layouts, _cache, calls); a few layers x shapes in flight

    def __init__(
        self,
        feature_ids,
        space: FeatureSpace,
        *,
        cu_seqlens=None,
        feature_dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        if not isinstance(space, FeatureSpace):
            raise TypeError(f"space must be a FeatureSpace, got {type(space).__name__}")
        if isinstance(feature_ids, Mapping):
            raise ValueError("feature_ids is a single {group: value} dict; pass a list of one dict per example "
                             "(for a batch of one, [that dict]) or (B, num_groups) ids from FeatureSpace.encode")
        if isinstance(feature_ids, (list, tuple)) and any(isinstance(e, Mapping) for e in feature_ids):
            feature_ids = space.encode(feature_ids)  # raises naming an example that is not a dict
        if isinstance(feature_ids, torch.Tensor):
            ids = feature_ids
        else:
            try:
                ids = torch.as_tensor(feature_ids)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"feature_ids must be (B, {space.num_groups}) integer ids (FeatureSpace.encode) or a "
                                 f"list of one {{group: value}} dict per example; could not read "
                                 f"{type(feature_ids).__name__}: {e}") from None
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"feature_ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.dim() == 1 and ids.numel() == 0:
            ids = ids.reshape(0, space.num_groups)
        if ids.dim() != 2 or ids.shape[1] != space.num_groups:
            raise ValueError(
                f"feature_ids must have shape (B, {space.num_groups}) (one column per group "
                f"{space.group_names}), got {tuple(ids.shape)}"
            )
        ids = ids.detach().to("cpu", torch.long).clone()
        self._validate_ids(ids, space)
        if not (0.0 <= float(feature_dropout) < 1.0):
            raise ValueError(f"feature_dropout must be in [0, 1), got {feature_dropout}")
        self.requested_feature_ids = ids
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a CPU torch.Generator or None, got {type(generator).__name__} {generator!r}")
        if feature_dropout > 0 and ids.numel():
            if generator is not None and generator.device.type != "cpu":
                raise ValueError(f"the feature_dropout generator must be a CPU torch.Generator (the draw happens on the "
                                 f"host, once per batch), got one on {generator.device}")
            drop = torch.rand(ids.shape, generator=generator) < feature_dropout
            ids = ids.masked_fill(drop & (ids >= 0), -1)
        self.space = space
        self.feature_ids = ids  # effective ids, after feature dropout
        self.feature_dropout = float(feature_dropout)
        self.num_examples = int(ids.shape[0])
        self.cu_seqlens = self._validate_cu_seqlens(cu_seqlens, self.num_examples)
        self._packed_tokens = None if self.cu_seqlens is None else int(self.cu_seqlens[-1])
        self._build_slots()
        # LRUs (see _lru_put): a routing fed ever new token shapes must not keep a plan per shape.
        self._layouts: OrderedDict[tuple, TokenLayout] = OrderedDict()
        self._cache: OrderedDict[Hashable, object] = OrderedDict()
        # Bounded by the devices, not by shapes: plain dicts.
        self._kernel_meta: dict[str, KernelMetadata] = {}  # by device string ("cuda:0"), see kernel_metadata
        self._slot_tables: dict[str, tuple] = {}  # by device string, see slot_tables
        # flix_kernels.ops: the validated call of each (layer shapes, dtypes, devices, options) seen (LRU)
        self.calls: OrderedDict[Hashable, Callable] = OrderedDict()
        self._uniform = _UNSET  # see uniform_features

    def _lru_put(self, cache: OrderedDict, key: Hashable, value):
        """Store ``value`` as the newest entry of ``cache``, dropping the least recently used one
        past :attr:`cache_limit` (a hit is refreshed by its reader with ``move_to_end``)."""
        cache[key] = value
        if len(cache) > self.cache_limit:
            cache.popitem(last=False)
        return value

    # -- validation -------------------------------------------------------------------------
    @staticmethod
    def _validate_ids(ids: torch.Tensor, space: FeatureSpace) -> None:
        if ids.numel() == 0:
            return
        bad = (ids < -1) | (ids >= space.num_features)
        if bool(bad.any()):
            b, g = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"example {b}: feature id {int(ids[b, g])} in column {g} is invalid "
                f"(valid ids are -1 for 'absent' and 0..{space.num_features - 1})"
            )
        # The space's cached table (read only here): not rebuilt per routing, it has a row per feature.
        group_of = space._tensor("feature_group")
        col = torch.arange(space.num_groups).expand_as(ids)
        wrong = (ids >= 0) & (group_of[ids.clamp(min=0)] != col)
        if bool(wrong.any()):
            b, g = (int(v) for v in wrong.nonzero()[0])
            k = int(ids[b, g])
            fg, fv = space.feature_names[k]
            row = ids[b].tolist()
            repeated = row.count(k) > 1
            raise ValueError(
                f"example {b}: column {g} is group {space.group_names[g]!r} but holds feature {k} "
                f"({fg}={fv!r}) of group {fg!r}"
                + (f"; feature {k} is repeated in this example" if repeated else "")
                + "; each column must hold a feature of its own group or -1 (use FeatureSpace.encode)"
            )

    @staticmethod
    def _validate_cu_seqlens(cu, num_examples: int):
        if cu is None:
            return None
        cu = cu if isinstance(cu, torch.Tensor) else torch.as_tensor(cu)
        if cu.dtype.is_floating_point or cu.dtype == torch.bool or cu.dim() != 1:
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {cu.dtype} {tuple(cu.shape)}")
        cu = cu.detach().to("cpu", torch.long)
        if cu.numel() != num_examples + 1:
            raise ValueError(f"cu_seqlens must have B + 1 = {num_examples + 1} entries, got {cu.numel()}")
        if int(cu[0]) != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
        steps = cu[1:] - cu[:-1]
        if bool((steps < 0).any()):
            b = int((steps < 0).nonzero()[0])
            raise ValueError(f"cu_seqlens must be non-decreasing; example {b} has negative length {int(steps[b])}")
        return cu

    # -- per-example rank slots ---------------------------------------------------------------
    def _build_slots(self) -> None:
        space, ids = self.space, self.feature_ids
        B, G = ids.shape
        ranks = space._tensor("ranks")  # cached by the space, only indexed here (the results are copies)
        offs = space._tensor("rank_offsets")
        present = ids >= 0
        safe = ids.clamp(min=0)
        r = torch.where(present, ranks[safe], 0)  # (B, G) rank each column contributes
        self.active_rank = r.sum(1)  # (B,)
        R = int(self.active_rank.max()) if B else 0
        self.max_active_rank = R
        cum = r.cumsum(1)  # slot j of example b lies in the first column whose cum > j
        j = torch.arange(R).expand(B, R).contiguous()
        colj = torch.searchsorted(cum, j, right=True).clamp(max=max(G - 1, 0))
        valid = j < self.active_rank[:, None]
        feat = torch.gather(ids, 1, colj) if G else torch.zeros(B, R, dtype=torch.long)
        start = torch.gather(cum - r, 1, colj) if G else torch.zeros(B, R, dtype=torch.long)
        feat = torch.where(valid, feat, 0)
        self.slot_valid = valid  # (B, R) bool
        self.slot_feature = feat  # (B, R) global feature id (0 where invalid)
        self.slot_rank_index = torch.where(valid, offs[feat] + (j - start), 0)  # (B, R) row of lora_A

    def slot_tables(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rank_index, feature, valid)`` on ``device``, each ``(B, max(R_max, 2))``: the slot tables
        padded with invalid slots, which the torch backend reads under torch.compile. A compiled
        graph specialises sizes 0 and 1, so two columns at least let one graph (with the slot
        count a dynamic dimension) serve every batch. Built on first request, then cached;
        :meth:`to` and :func:`flix_kernels.set_routing` build them before a compiled model runs."""
        key = self._device_key(torch.device(device))
        tables = self._slot_tables.get(key)
        if tables is None:
            pad = max(2 - self.max_active_rank, 0)
            tables = self._slot_tables[key] = tuple(
                _graph_input(torch.nn.functional.pad(t, (0, pad)).to(device), dynamic=(1,))
                for t in (self.slot_rank_index, self.slot_feature, self.slot_valid))
        return tables

    def prebuilt_slot_tables(self, device: torch.device):
        """:meth:`slot_tables` if built on ``device``, else None (what a compiled region may ask)."""
        return self._slot_tables.get(self._device_key(device))

    # -- device metadata for the fused kernels ----------------------------------------------------
    def to(self, device: torch.device | str) -> "Routing":
        """Build this routing's kernel metadata on ``device`` now, and the torch backend's
        :meth:`slot_tables` once torch.compile's machinery is loaded (returns self).

        Layers do it on first use; call it (or :func:`flix_kernels.set_routing`, which does)
        before a ``torch.compile(fullgraph=True)`` model or a CUDA-graph capture runs, so the
        compiled or captured region only reads prebuilt tensors. Call it once per device when
        a model spans several."""
        self.kernel_metadata(torch.device(device))
        if "torch._dynamo" in sys.modules:  # nothing compiles before it is loaded
            self.slot_tables(device)
        return self

    @staticmethod
    def _device_key(device: torch.device) -> str:
        # "cuda" and "cuda:0" are the same device for a tensor that lives there.
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return str(device)

    def kernel_metadata(self, device: torch.device) -> KernelMetadata:
        """:class:`KernelMetadata` on ``device`` (built on first request, then cached)."""
        key = self._device_key(device)
        meta = self._kernel_meta.get(key)
        if meta is not None:
            return meta
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"the routing's kernel metadata for {key} is not built; call routing.to({key!r}) "
                "or flix_kernels.set_routing(model, routing) before running the compiled model"
            )
        meta = self._kernel_meta[key] = self._build_kernel_metadata(torch.device(key))
        return meta

    def layer_metadata(self, device: torch.device, token_shape: Sequence[int]) -> KernelMetadata:
        """:meth:`kernel_metadata` for a layer input with token dimensions ``token_shape``
        (:meth:`KernelMetadata.for_layout`; cached)."""
        kind, _, seq_len = self.classify(token_shape)
        key = ("kernel_layout", self._device_key(device), kind, seq_len)
        meta = self._cache.get(key)
        if meta is None:
            return self._lru_put(self._cache, key, self.kernel_metadata(device).for_layout(kind, seq_len))
        try:
            self._cache.move_to_end(key)
        except KeyError:  # dropped meanwhile by another thread using this routing: meta is still right
            pass
        return meta

    def _build_kernel_metadata(self, device: torch.device) -> KernelMetadata:
        space, ids = self.space, self.feature_ids
        F = space.num_features
        ranks = space._tensor("ranks")  # cached by the space: only indexed or copied (.to int32) here
        present = ids >= 0
        r = torch.where(present, ranks[ids.clamp(min=0)], 0)
        slot_start = r.cumsum(1) - r  # (B, G) where each column's slots start
        ex, col = present.nonzero(as_tuple=True)
        feat = ids[ex, col]
        order = torch.argsort(feat * max(self.num_examples, 1) + ex)  # by feature, then example
        ex, feat, slot = ex[order], feat[order], slot_start[ex, col][order]
        start = torch.zeros(F + 1, dtype=torch.long)
        start[1:] = torch.bincount(feat, minlength=F).cumsum(0)
        if self.cu_seqlens is not None and self.num_examples:
            max_length = 1 << (int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max()) - 1).bit_length()
        else:
            max_length = 0
        i32 = dict(device=device, dtype=torch.int32)
        meta = KernelMetadata(
            device=device,
            slot_rank=self.slot_rank_index.to(**i32),
            slot_feature=torch.where(self.slot_valid, self.slot_feature, -1).to(**i32),
            pair_example=ex.to(**i32),
            pair_slot=slot.to(**i32),
            pair_feature=feat.to(**i32),
            feature_pair_start=start.to(**i32),
            feature_rank=ranks.to(**i32),
            rank_offsets=space._tensor("rank_offsets").to(**i32),  # int64 -> int32: a copy, never the cache
            cu_seqlens=None if self.cu_seqlens is None else self.cu_seqlens.to(**i32),
            max_length=max_length,
            max_pair_rank=int(ranks[feat].max()) if feat.numel() else 0,
            max_feature_rank=max(space.group_ranks.values()),
            present_features=(start[1:] > start[:-1]).nonzero().flatten().to(**i32),
        )
        # Sizes that follow the batch's feature sets (slots, pairs, present features) may be 0 or 1.
        by_features = {"slot_rank": 1, "slot_feature": 1, "pair_example": 0, "pair_slot": 0, "pair_feature": 0,
                       "present_features": 0}
        dynamic = {}
        for name in (*by_features, "cu_seqlens"):
            t = getattr(meta, name)
            if t is not None:
                dims = [d for d in range(t.dim()) if d != by_features.get(name)]
                dynamic[name] = _graph_input(t, dynamic=dims, unbacked=[by_features[name]] if name in by_features else [])
        return replace(meta, **dynamic)

    # -- derived routings -----------------------------------------------------------------------
    def repeat_interleave(self, repeats: int) -> "Routing":
        """The routing of a batch in which every example is repeated ``repeats`` times in a row
        (``[e0, e0, e1, e1, ...]``), as ``generate`` expands a batch for beam search or
        several return sequences. Keeps this routing's feature dropout draw (the copies of an
        example use the same features). Not defined for packed routings."""
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        if self.cu_seqlens is not None:
            raise ValueError("a packed routing (cu_seqlens) cannot be repeated per example; "
                             "build the routing of the padded batch instead")
        if repeats == 1:
            return self
        return Routing(self.feature_ids.repeat_interleave(repeats, dim=0), self.space)

    # -- queries ------------------------------------------------------------------------------
    def features_of(self, example: int) -> list[int]:
        """Sorted active global feature ids of one example (after feature dropout)."""
        return sorted(k for k in self.feature_ids[example].tolist() if k >= 0)

    @property
    def uniform_features(self) -> tuple[int, ...] | None:
        """The feature set shared by every example, or None when examples differ (or B == 0)."""
        # A plain attribute, not an LRU entry: layers read it on every call (FLixLinear's merge check).
        uniform = self._uniform
        if uniform is _UNSET:
            ids = self.feature_ids
            same = self.num_examples > 0 and bool((ids == ids[:1]).all())
            uniform = self._uniform = tuple(self.features_of(0)) if same else None
        return uniform

    def classify(self, token_shape: Sequence[int]) -> tuple[str, int, int]:
        """``(kind, num_tokens, seq_len)`` of a layer input's token dimensions, host ints only.

        ``(B, L)`` means L tokens per example ("batched", seq_len L), ``(B,)`` one token per
        example, and ``(T,)`` or ``(1, T)`` packed tokens split by ``cu_seqlens`` ("packed",
        seq_len 0). A packed routing takes batched inputs of one token per example only
        (``(B,)``, ``(B, 1)``: decode after a packed prefill), or ``(1, T)`` for B == 1, where
        both readings agree. Raises ``ValueError`` for a shape the routing cannot map. Pure
        Python, so a compiled graph checks it with no tensor work."""
        shape = tuple(int(s) for s in token_shape)
        B = self.num_examples
        T_packed = self._packed_tokens
        if len(shape) == 2 and shape[0] == B:
            L = shape[1]
            if T_packed is not None and L > 1 and B and not (B == 1 and L == T_packed):
                # L tokens per example would silently override the example lengths cu_seqlens gives.
                raise ValueError(
                    f"layer input with token dimensions {shape} is batched (B={B}, L={L}) but the routing is packed "
                    f"(cu_seqlens, T={T_packed} tokens), whose example lengths it would ignore: expected packed "
                    f"(T={T_packed}, in) / (1, T={T_packed}, in), or one token per example (B={B}, in) / "
                    f"(B={B}, 1, in) to decode after a packed prefill; for (B, L, in) inputs build the Routing "
                    "without cu_seqlens"
                )
            return "batched", B * L, L
        if T_packed is not None and (len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)) and shape[-1] == T_packed:
            return "packed", T_packed, 0
        if len(shape) == 1 and shape[0] == B:  # one token per example, e.g. decode after packed prefill
            return "batched", B, 1
        expect = f"(B={B}, L, in) or (B={B}, in)"
        if T_packed is not None:
            expect += f", or packed (T={T_packed}, in) / (1, T={T_packed}, in) as cu_seqlens says"
        else:
            expect += ", or packed (T, in) / (1, T, in) with cu_seqlens given to the Routing"
        raise ValueError(
            f"layer input with token dimensions {shape} does not match the routing of {B} "
            f"examples: expected {expect}"
        )

    def layout(self, token_shape: Sequence[int]) -> TokenLayout:
        """Map the token dimensions of a layer input (``x.shape[:-1]``) to examples (see
        :meth:`classify`), with per-example lengths and offsets as host tensors."""
        key = tuple(int(s) for s in token_shape)
        lay = self._layouts.get(key)
        if lay is not None:
            try:
                self._layouts.move_to_end(key)  # LRU: recently used layouts stay
            except KeyError:  # dropped meanwhile by another thread using this routing
                pass
            return lay
        kind, T, L = self.classify(key)
        if kind == "batched":
            lay = self._batched(self.num_examples, L)
        else:
            cu = self.cu_seqlens
            lay = TokenLayout("packed", T, cu[1:] - cu[:-1], cu.clone())
        return self._lru_put(self._layouts, key, lay)

    @staticmethod
    def _batched(B: int, L: int) -> TokenLayout:
        lengths = torch.full((B,), L, dtype=torch.long)
        offsets = torch.arange(B + 1, dtype=torch.long) * L
        return TokenLayout("batched", B * L, lengths, offsets)

    def cached(self, key: Hashable, build: Callable[[], object]):
        """Memoise per-routing metadata (device tensors, plans) under ``key``.

        Backends use this so that a batch's metadata is built and copied to the device once,
        whatever the number of layers. An LRU of :attr:`cache_limit` entries: an entry not
        used for that many others is dropped (and built again if asked for).
        """
        cache = self._cache
        try:
            value = cache[key]
        except KeyError:
            return self._lru_put(cache, key, build())
        try:
            cache.move_to_end(key)
        except KeyError:  # dropped meanwhile by another thread using this routing: value is still right
            pass
        return value

    def __repr__(self) -> str:
        packed = "" if self.cu_seqlens is None else f", packed T={int(self.cu_seqlens[-1])}"
        return (
            f"Routing(B={self.num_examples}, max_active_rank={self.max_active_rank}, "
            f"features_in_batch={int(torch.unique(self.feature_ids[self.feature_ids >= 0]).numel())}{packed})"
        )
