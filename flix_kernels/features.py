"""The feature space: named groups of discrete features, each feature owning a rank slice.

Global feature ids are assigned group by group, in the order the groups were given, and
within a group in the order of its values. Feature ``k`` owns rows
``rank_offsets[k]:rank_offsets[k + 1]`` of ``lora_A`` (total_rank, in) and the same columns
of ``lora_B`` (out, total_rank).
"""

from __future__ import annotations

import weakref
from collections import Counter
from itertools import repeat
from typing import Iterable, Mapping, Sequence

import torch

__all__ = ["FeatureSpace"]


def _preview(values: Sequence, limit: int = 20) -> str:
    """``values`` for an error message: whole when short, else its first ``limit`` and the count
    (a group may hold millions of values)."""
    if len(values) <= limit:
        return repr(list(values))
    return f"{list(values[:limit])!r} ... ({len(values)} in all)"


class FeatureSpace:
    """Named feature groups (``{"language": [...], "task": [...]}``) and a rank per group.

    ``rank`` is one int for every group or a dict ``group -> int`` covering every group.
    """

    def __init__(self, groups: Mapping[str, Sequence[str]], rank: int | Mapping[str, int]):
        if not isinstance(groups, Mapping) or len(groups) == 0:
            raise ValueError("FeatureSpace needs at least one group, e.g. {'language': ['en', 'fr']}")
        self._groups: dict[str, list[str]] = {}
        self._index: dict[str, dict[str, int]] = {}  # group -> value -> global feature id
        first_id = 0
        for name, values in groups.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"group names must be non-empty strings, got {name!r}")
            if isinstance(values, str) or not isinstance(values, Iterable):
                raise ValueError(f"group {name!r} must be a list of feature names, got {values!r}")
            values = list(values)
            if not values:
                raise ValueError(f"group {name!r} has no features")
            # Linear-time checks (C-level map/set): a group may hold millions of values (users, documents).
            if set(map(type, values)) != {str}:
                for v in values:
                    if not isinstance(v, str):
                        raise ValueError(f"feature names must be strings; group {name!r} has {v!r}")
            # The id index doubles as the duplicate check: one hash table, built in C.
            index = dict(zip(values, range(first_id, first_id + len(values))))
            if len(index) != len(values):
                dup = sorted(v for v, n in Counter(values).items() if n > 1)
                raise ValueError(f"group {name!r} lists features more than once: {_preview(dup)}")
            self._groups[name] = values
            self._index[name] = index
            first_id += len(values)

        if isinstance(rank, Mapping):
            unknown = sorted(set(rank) - set(self._groups))
            missing = [g for g in self._groups if g not in rank]
            if unknown:
                raise ValueError(f"rank given for unknown group(s) {unknown}; known groups: {list(self._groups)}")
            if missing:
                raise ValueError(f"rank missing for group(s) {missing}")
            group_rank = {g: rank[g] for g in self._groups}
        else:
            group_rank = {g: rank for g in self._groups}
        for g, r in group_rank.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"rank of group {g!r} must be a positive int, got {r!r}")
        self._group_rank = group_rank

        self.feature_group: list[int] = []  # group position of each global feature id
        self.feature_names: list[tuple[str, str]] = []  # (group, value) of each global feature id
        self.group_offsets: list[int] = [0]  # feature ids of group g: group_offsets[g]:group_offsets[g+1]
        self.ranks: list[int] = []
        self.rank_offsets: list[int] = [0]
        for gi, (g, values) in enumerate(self._groups.items()):
            # Whole groups at a time (extend/zip/repeat/range run in C), not one Python step per feature.
            n, r = len(values), group_rank[g]
            self.feature_names.extend(zip(repeat(g), values))
            self.feature_group.extend(repeat(gi, n))
            self.ranks.extend(repeat(r, n))
            self.group_offsets.append(len(self.ranks))
            self.rank_offsets.extend(range(self.rank_offsets[-1] + r, self.rank_offsets[-1] + r * n + 1, r))
        self._memo: dict = {}  # derived values, built on first use (see _tensor, _key, __eq__)

    # -- sizes ------------------------------------------------------------------------------
    @property
    def groups(self) -> dict[str, list[str]]:
        return {g: list(v) for g, v in self._groups.items()}

    @property
    def group_names(self) -> list[str]:
        return list(self._groups)

    @property
    def group_ranks(self) -> dict[str, int]:
        return dict(self._group_rank)

    @property
    def num_groups(self) -> int:
        return len(self._groups)

    @property
    def num_features(self) -> int:
        return len(self.ranks)

    @property
    def total_rank(self) -> int:
        return self.rank_offsets[-1]

    # -- names <-> ids ----------------------------------------------------------------------
    def index(self, group: str, value: str) -> int:
        """Global feature id of ``value`` in ``group``."""
        if group not in self._groups:
            raise ValueError(f"unknown feature group {group!r}; known groups: {list(self._groups)}")
        k = self._index[group].get(value)
        if k is None:
            raise ValueError(
                f"unknown feature {value!r} in group {group!r}; known values: {_preview(self._groups[group])}"
            )
        return k

    def feature_ids(self, features: Mapping[str, str]) -> list[int]:
        """Sorted global ids of one feature set given as ``{group: value}``."""
        return sorted(self.index(g, v) for g, v in features.items())

    def rank_rows(self, feature_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank rows of lora_A owned by ``feature_ids`` (in the given order) and each row's owner."""
        ids = torch.as_tensor(feature_ids, dtype=torch.long).flatten()
        ranks = self._tensor("ranks")[ids]  # indexing copies: the cached tensors are never handed out
        starts = self._tensor("rank_offsets")[ids]
        owners = torch.repeat_interleave(ids, ranks)
        first_row_of_owner = torch.repeat_interleave(torch.cumsum(ranks, 0) - ranks, ranks)
        rows = torch.repeat_interleave(starts, ranks) + torch.arange(owners.numel()) - first_row_of_owner
        return rows, owners

    def encode(self, examples: Sequence[Mapping[str, str]]) -> torch.Tensor:
        """``(B, num_groups)`` int64 ids, column g holding the feature of group g or -1."""
        out = torch.full((len(examples), self.num_groups), -1, dtype=torch.long)
        col = {g: i for i, g in enumerate(self._groups)}
        for b, ex in enumerate(examples):
            if not isinstance(ex, Mapping):
                raise ValueError(f"example {b}: expected a dict group -> value, got {type(ex).__name__}")
            for g, v in ex.items():
                if v is None:
                    continue
                try:
                    out[b, col[g]] = self.index(g, v)
                except (KeyError, ValueError) as e:
                    msg = str(e) if isinstance(e, ValueError) else (
                        f"unknown feature group {g!r}; known groups: {list(self._groups)}")
                    raise ValueError(f"example {b}: {msg}") from None
        return out

    def decode(self, ids) -> list[dict[str, str]]:
        """Inverse of :meth:`encode`: ``(B, G)`` ids (or one row) to a list of ``{group: value}``."""
        t = torch.as_tensor(ids)
        if t.dim() == 1:
            t = t[None]
        out = []
        for b, row in enumerate(t.tolist()):
            ex: dict[str, str] = {}
            for k in row:
                if k == -1:
                    continue
                if not (0 <= k < self.num_features):
                    raise ValueError(f"example {b}: feature id {k} out of range [0, {self.num_features})")
                g, v = self.feature_names[k]
                ex[g] = v
            out.append(ex)
        return out

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"groups": self.groups, "rank": self.group_ranks}

    @classmethod
    def from_dict(cls, d: Mapping) -> "FeatureSpace":
        if not isinstance(d, Mapping) or "groups" not in d or "rank" not in d:
            raise ValueError("FeatureSpace.from_dict expects a dict with keys 'groups' and 'rank'")
        return cls(d["groups"], d["rank"])

    # -- derived values, built once ------------------------------------------------------------
    # A space never changes after __init__ (its groups and ranks are private; the public lists
    # are its own copies), so what derives from them is built on first use and kept.
    def _tensor(self, name: str) -> torch.Tensor:
        """``ranks`` / ``rank_offsets`` / ``feature_group`` as a CPU int64 tensor, built once.

        For this package's read-only use (indexing, dtype or device copies): callers must not
        write to it nor hand it out. A write in place is caught (its version counter) and the
        tensor rebuilt, so a stray write cannot corrupt later routings."""
        hit = self._memo.get(name)
        if hit is not None and hit[0]._version == hit[1]:
            return hit[0]
        # Expanded per group in C, not torch.tensor of a million-long Python list.
        sizes = torch.tensor([len(v) for v in self._groups.values()], dtype=torch.long)
        if name == "ranks":
            t = torch.repeat_interleave(torch.tensor(list(self._group_rank.values()), dtype=torch.long), sizes)
        elif name == "rank_offsets":  # (F + 1,)
            ranks = self._tensor("ranks")
            t = torch.cat([ranks.new_zeros(1), ranks.cumsum(0)])
        elif name == "feature_group":
            t = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        else:
            raise KeyError(name)
        self._memo[name] = (t, t._version)
        return t

    def _key(self) -> tuple:
        # Order matters: it decides the global ids, so two spaces are equal only if it agrees.
        key = self._memo.get("key")
        if key is None:
            key = self._memo["key"] = tuple((g, tuple(v), self._group_rank[g]) for g, v in self._groups.items())
        return key

    def __eq__(self, other) -> bool:
        # Layers compare their space with the routing's on every call: identity, then the cached
        # hashes, decide most comparisons at once; a full comparison (O(features)) is
        # remembered for the last equal space seen (weakly, so it can be freed).
        if self is other:
            return True
        if not isinstance(other, FeatureSpace) or hash(self) != hash(other):
            return False
        same = self._memo.get("equal_to")
        if same is not None and same() is other:
            return True
        if self._key() != other._key():
            return False
        self._memo["equal_to"] = weakref.ref(other)
        other._memo["equal_to"] = weakref.ref(self)
        return True

    def __hash__(self) -> int:
        h = self._memo.get("hash")
        if h is None:
            h = self._memo["hash"] = hash(self._key())
        return h

    def __getstate__(self) -> dict:
        # The memo is rebuilt on demand; it holds a weak reference, which cannot be pickled.
        return {**self.__dict__, "_memo": {}}

    def describe_difference(self, other: "FeatureSpace") -> str:
        """One line naming the first difference between two spaces ('' when equal)."""
        a, b = self._key(), other._key()
        if [g for g, _, _ in a] != [g for g, _, _ in b]:
            return f"groups differ: {[g for g, _, _ in a]} vs {[g for g, _, _ in b]}"
        for (g, va, ra), (_, vb, rb) in zip(a, b):
            if va != vb:
                if len(va) <= 20 and len(vb) <= 20:
                    return f"values of group {g!r} differ: {list(va)} vs {list(vb)}"
                i = next((i for i, (x, y) in enumerate(zip(va, vb)) if x != y), min(len(va), len(vb)))
                at = lambda v: repr(v[i]) if i < len(v) else "nothing"  # noqa: E731
                return (f"values of group {g!r} differ: {len(va)} vs {len(vb)} values, first at position {i} "
                        f"({at(va)} vs {at(vb)})")
            if ra != rb:
                return f"rank of group {g!r} differs: {ra} vs {rb}"
        return ""

    def __repr__(self) -> str:
        parts = ", ".join(f"{g}: {len(v)} x r{self._group_rank[g]}" for g, v in self._groups.items())
        return f"FeatureSpace({parts}; {self.num_features} features, total_rank={self.total_rank})"
