"""Shared test helpers: random feature spaces, routings and adapters, tolerances by dtype.

Every kernel and layer test compares against :mod:`flix_kernels.reference` (the per-feature
loop) run in float64. Inputs are random and fresh each run (seeded from the test's own RNG
so a failure prints the seed that reproduces it).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

import flix_kernels as fk

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# (rtol, atol) for a result in this dtype against the float64 oracle, for O(1) inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0):
    """``actual`` against a float64 ``expected`` with the tolerance of ``dtype`` (default: actual's)."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


LOW_PRECISION = (torch.float16, torch.bfloat16)


def assert_close_to_oracle(actual: torch.Tensor, oracle64: torch.Tensor, oracle_same_dtype: torch.Tensor, what: str = ""):
    """Low-precision check in the style of flash-attention's tests: our error against the
    float64 oracle may be at most twice the error of the oracle itself run in the same low
    precision, plus one unit of rounding of the largest value (a single extra rounding,
    e.g. of the base output before the update is added). It scales with reduction length on
    its own, so no tolerance is tuned per shape."""
    err = (actual.double() - oracle64.double()).abs().max().item() if actual.numel() else 0.0
    base = (oracle_same_dtype.double() - oracle64.double()).abs().max().item() if actual.numel() else 0.0
    slack = torch.finfo(actual.dtype).eps * max(oracle64.abs().max().item() if actual.numel() else 0.0, 1.0)
    assert err <= 2 * base + slack, f"{what}: error {err:.3g} > 2 x same-precision oracle error {base:.3g} + {slack:.3g}"


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test run, printed on failure through the test id in the report."""
    s = random.SystemRandom().randrange(2**31)
    request.node.user_properties.append(("seed", s))
    print(f"seed={s}")
    return s


def random_space(gen: torch.Generator, num_groups: int | None = None, max_values: int = 5, max_rank: int = 8,
                 ) -> fk.FeatureSpace:
    """A space with 1..6 groups of 1..max_values values and per-group ranks 1..max_rank."""
    g = num_groups or int(torch.randint(1, 7, (), generator=gen))
    groups = {f"g{i}": [f"v{j}" for j in range(int(torch.randint(1, max_values + 1, (), generator=gen)))] for i in range(g)}
    ranks = {name: int(torch.randint(1, max_rank + 1, (), generator=gen)) for name in groups}
    return fk.FeatureSpace(groups, ranks)


def random_feature_ids(space: fk.FeatureSpace, batch: int, gen: torch.Generator, p_absent: float = 0.25) -> torch.Tensor:
    """(B, G) valid ids: each group's feature drawn uniformly, absent with probability p_absent."""
    cols = []
    for g in range(space.num_groups):
        lo, hi = space.group_offsets[g], space.group_offsets[g + 1]
        col = torch.randint(lo, hi, (batch,), generator=gen)
        col[torch.rand(batch, generator=gen) < p_absent] = -1
        cols.append(col)
    return torch.stack(cols, 1) if batch else torch.zeros(0, space.num_groups, dtype=torch.long)


def random_adapters(space: fk.FeatureSpace, in_f: int, out_f: int, gen: torch.Generator, dtype=torch.float32):
    """lora_A (R, in), lora_B (out, R) with O(1/sqrt(dim)) random entries (B is never zero)."""
    R = space.total_rank
    A = torch.randn(R, in_f, generator=gen, dtype=torch.float64) / in_f**0.5
    B = torch.randn(out_f, R, generator=gen, dtype=torch.float64) / max(R, 1) ** 0.5
    return A.to(dtype), B.to(dtype)


def random_scaling(space: fk.FeatureSpace, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    return (0.5 + torch.rand(space.num_features, generator=gen, dtype=torch.float64)).to(dtype)
