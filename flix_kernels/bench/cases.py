"""The shapes ``flix-kernels bench`` measures, and their random routings and inputs.

A :class:`Case` is one FLix layer problem: ``tokens`` tokens in examples of ``seq_len`` tokens,
an ``d_in -> d_out`` layer, ``features`` features split evenly into ``active`` groups (so every
token has ``active`` active features, one per group), each of rank ``rank``, and the
distribution of each example's features over its group: uniform, zipf (p ~ 1 / i^1.1) or
dominant (90% of examples share one feature).

Sets: ``headline`` (B=8 x L=1024, 4096 -> 4096, 64 features in two groups, rank 16),
``decode`` (1, 8 and 64 one-token examples at the same layer), ``sweep`` (one axis at a time
around the headline: in/out, rank, features, active features, tokens, distribution). On a CPU
the same sets are scaled down (1024-wide layers, fewer tokens) so they run in minutes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from ..features import FeatureSpace
from ..routing import Routing

DISTRIBUTIONS = ("uniform", "zipf", "dominant")
SHAPE_SETS = ("headline", "decode", "sweep")
SCALING = 0.5  # the layers' per-feature scale s_k


@dataclass(frozen=True)
class Case:
    label: str
    tokens: int
    seq_len: int
    d_in: int
    d_out: int
    rank: int = 16
    features: int = 64
    active: int = 2
    dist: str = "uniform"

    def __post_init__(self):
        if self.tokens % self.seq_len or self.features % self.active or self.dist not in DISTRIBUTIONS:
            raise ValueError(f"inconsistent benchmark case {self}")

    @property
    def examples(self) -> int:
        return self.tokens // self.seq_len

    @property
    def token_shape(self) -> tuple[int, ...]:
        """The layer input's token dims: (B, L), or (T,) for one-token examples (decode)."""
        return (self.examples, self.seq_len) if self.seq_len > 1 else (self.tokens,)

    @property
    def active_rank(self) -> int:
        return self.active * self.rank

    def space(self) -> FeatureSpace:
        per = self.features // self.active
        groups = {f"g{g}": [f"f{g * per + i}" for i in range(per)] for g in range(self.active)}
        return FeatureSpace(groups, self.rank)

    def as_dict(self) -> dict:
        return {**asdict(self), "examples": self.examples}

    def flops(self) -> dict:
        """Matmul FLOPs of the layer: the base GEMM and the low-rank update per pass (W frozen:
        the backward computes dx for the base, and dx, dA, dB, dh for the update)."""
        T, i, o, ra = self.tokens, self.d_in, self.d_out, self.active_rank
        base, lora = 2 * T * i * o, 2 * T * ra * (i + o)
        return {"forward": base + lora, "backward": base + 2 * lora, "forward+backward": 2 * base + 3 * lora}

    def bytes(self, elem: int) -> dict:
        """Fewest bytes through device memory: x, W, y forward; dy, W, x (for dA), dx backward."""
        T, i, o = self.tokens, self.d_in, self.d_out
        fwd = elem * (T * i + i * o + T * o)
        bwd = elem * (T * o + i * o + 2 * T * i)
        return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}


def shape_sets(device_type: str, quick: bool) -> dict[str, list[Case]]:
    """The cases of each set on this kind of device (smaller on a CPU; fewer with ``quick``)."""
    gpu = device_type == "cuda"
    d, tokens, seq = (4096, 8192, 1024) if gpu else (1024, 1024, 256)
    head = Case("headline", tokens, seq, d, d)
    decode = [replace(head, label=f"decode T={t}", tokens=t, seq_len=1) for t in (1, 8, 64)]
    sweep_tokens = (1, 8, 64, 2048, 16384) if gpu else (1, 64, 256, 2048)
    dims = (2048, 8192) if gpu else (512, 2048)
    sweep = [replace(head, label=f"tokens={t}", tokens=t, seq_len=1 if t <= 64 else min(t, 256 if gpu else 64))
             for t in sweep_tokens]
    if not quick:
        sweep += [replace(head, label=f"in=out={n}", d_in=n, d_out=n) for n in dims]
        sweep += [replace(head, label=f"rank={r}", rank=r) for r in (8, 64)]
        sweep += [replace(head, label=f"features={f}", features=f) for f in (8, 1024)]
        sweep += [replace(head, label=f"active={a}", active=a) for a in (1, 4)]
        sweep += [replace(head, label=f"dist={s}", dist=s) for s in ("zipf", "dominant")]
    return {"headline": [head], "decode": decode, "sweep": sweep}


def feature_ids(case: Case, gen: torch.Generator) -> torch.Tensor:
    """(examples, active) global feature ids drawn from the case's distribution."""
    per = case.features // case.active
    if case.dist == "uniform":
        probs = torch.full((per,), 1.0 / per)
    elif case.dist == "zipf":
        probs = 1.0 / torch.arange(1, per + 1, dtype=torch.float64) ** 1.1
    else:  # dominant: one feature takes 90%, the rest share 10%
        probs = torch.full((per,), 0.1 / max(per - 1, 1), dtype=torch.float64)
        probs[0] = 0.9 if per > 1 else 1.0
    cols = []
    for g in range(case.active):
        perm = torch.randperm(per, generator=gen)  # which feature of the group is frequent changes per group
        draw = torch.multinomial(probs.float(), case.examples, replacement=True, generator=gen)
        cols.append(perm[draw] + g * per)
    return torch.stack(cols, 1)


@dataclass
class Inputs:
    """One rotation set: the layer input, the frozen base weight, the FLix adapters, the single
    LoRA adapter of the active rank (for the PEFT comparison), and an output gradient."""
    x: torch.Tensor
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    single_A: torch.Tensor
    single_B: torch.Tensor
    grad_out: torch.Tensor


def make_inputs(case: Case, space: FeatureSpace, dtype, device, gen: torch.Generator, sets: int) -> list[Inputs]:
    """``sets`` independent random input sets (never zeros: unwritten outputs must show)."""
    i, o, R, ra = case.d_in, case.d_out, space.total_rank, case.active_rank
    shape = case.token_shape

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=gen, device=device) * scale).to(dtype)

    out = []
    for _ in range(sets):
        out.append(Inputs(x=rnd(*shape, i).requires_grad_(True), weight=rnd(o, i, scale=i**-0.5),
                          lora_A=rnd(R, i, scale=i**-0.5).requires_grad_(True),
                          lora_B=rnd(o, R, scale=case.rank**-0.5).requires_grad_(True),
                          single_A=rnd(ra, i, scale=i**-0.5), single_B=rnd(o, ra, scale=ra**-0.5),
                          grad_out=rnd(*shape, o)))
    return out


def make_routing(case: Case, space: FeatureSpace, gen: torch.Generator, device) -> Routing:
    return Routing(feature_ids(case, gen), space).to(device)
