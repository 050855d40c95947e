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

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

from .features import FeatureSpace

__all__ = ["Routing", "TokenLayout"]


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
    host once). Invalid ids raise ``ValueError`` naming the example.
    """

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
        ids = feature_ids if isinstance(feature_ids, torch.Tensor) else torch.as_tensor(feature_ids)
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
        if feature_dropout > 0 and ids.numel():
            if generator is not None and generator.device.type != "cpu":
                raise ValueError("the feature_dropout generator must be a CPU torch.Generator")
            drop = torch.rand(ids.shape, generator=generator) < feature_dropout
            ids = ids.masked_fill(drop & (ids >= 0), -1)
        self.space = space
        self.feature_ids = ids  # effective ids, after feature dropout
        self.feature_dropout = float(feature_dropout)
        self.num_examples = int(ids.shape[0])
        self.cu_seqlens = self._validate_cu_seqlens(cu_seqlens, self.num_examples)
        self._build_slots()
        self._layouts: dict[tuple, TokenLayout] = {}
        self._cache: dict[Hashable, object] = {}

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
        group_of = torch.tensor(space.feature_group, dtype=torch.long)
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
        ranks = torch.tensor(space.ranks, dtype=torch.long)
        offs = torch.tensor(space.rank_offsets[:-1], dtype=torch.long)
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

    # -- queries ------------------------------------------------------------------------------
    def features_of(self, example: int) -> list[int]:
        """Sorted active global feature ids of one example (after feature dropout)."""
        return sorted(k for k in self.feature_ids[example].tolist() if k >= 0)

    @property
    def uniform_features(self) -> tuple[int, ...] | None:
        """The feature set shared by every example, or None when examples differ (or B == 0)."""
        if "uniform" not in self._cache:
            ids = self.feature_ids
            same = self.num_examples > 0 and bool((ids == ids[:1]).all())
            self._cache["uniform"] = tuple(self.features_of(0)) if same else None
        return self._cache["uniform"]

    def layout(self, token_shape: Sequence[int]) -> TokenLayout:
        """Map the token dimensions of a layer input (``x.shape[:-1]``) to examples.

        ``(B, L)`` means L tokens per example, ``(B,)`` one token per example, and ``(T,)`` or
        ``(1, T)`` packed tokens split by ``cu_seqlens``.
        """
        shape = tuple(int(s) for s in token_shape)
        key = shape
        lay = self._layouts.get(key)
        if lay is not None:
            return lay
        B = self.num_examples
        cu = self.cu_seqlens
        if len(shape) == 2 and shape[0] == B:
            lay = self._batched(B, shape[1])
        elif cu is not None and (len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)) and shape[-1] == int(cu[-1]):
            lengths = cu[1:] - cu[:-1]
            lay = TokenLayout("packed", int(cu[-1]), lengths, cu.clone())
        elif len(shape) == 1 and shape[0] == B:  # one token per example, e.g. decode after packed prefill
            lay = self._batched(B, 1)
        else:
            expect = f"(B={B}, L, in) or (B={B}, in)"
            if cu is not None:
                expect += f", or packed (T={int(cu[-1])}, in) / (1, T={int(cu[-1])}, in) as cu_seqlens says"
            else:
                expect += ", or packed (T, in) / (1, T, in) with cu_seqlens given to the Routing"
            raise ValueError(
                f"layer input with token dimensions {shape} does not match the routing of {B} "
                f"examples: expected {expect}"
            )
        self._layouts[key] = lay
        return lay

    @staticmethod
    def _batched(B: int, L: int) -> TokenLayout:
        lengths = torch.full((B,), L, dtype=torch.long)
        offsets = torch.arange(B + 1, dtype=torch.long) * L
        return TokenLayout("batched", B * L, lengths, offsets)

    def cached(self, key: Hashable, build: Callable[[], object]):
        """Memoise per-routing metadata (device tensors, plans) under ``key``.

        Backends use this so that a batch's metadata is built and copied to the device once,
        whatever the number of layers.
        """
        try:
            return self._cache[key]
        except KeyError:
            value = self._cache[key] = build()
            return value

    def __repr__(self) -> str:
        packed = "" if self.cu_seqlens is None else f", packed T={int(self.cu_seqlens[-1])}"
        return (
            f"Routing(B={self.num_examples}, max_active_rank={self.max_active_rank}, "
            f"features_in_batch={int(torch.unique(self.feature_ids[self.feature_ids >= 0]).numel())}{packed})"
        )
