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

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. It must be on
# before flix_kernels (and so triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import flix_kernels as fk  # noqa: E402
from flix_kernels.reference import flix_delta_reference, flix_linear_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# dtypes the Triton kernels are tested in here: the interpreter computes tl.dot on bfloat16
# wrongly (it multiplies the raw bits; triton-lang/triton issue 11584), so bf16 is GPU-only.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])

# The fused kernel backends; the "backend" fixture runs a test once per backend, skipping the ones
# that cannot run here (without a GPU: "cuda"; "triton" runs in the interpreter).
BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(
    fk.backends.unavailable_reason(name, DEVICE) is not None,
    reason=f"backend {name} unavailable: {fk.backends.unavailable_reason(name, DEVICE)}")) for name in ("triton", "cuda")]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


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


def oracle(x, A, Bm, ids, space, scaling, dtype, cu=None, weight=None, bias=None, dropout_mask=None, dropout_p=0.0):
    """The per-feature loop oracle on CPU in ``dtype`` and its leaves ``(x, A, B[, W, b])``."""
    leaves = [t.detach().cpu().to(dtype).requires_grad_(True) for t in (x, A, Bm)]
    xo, Ao, Bo = leaves
    s = scaling.detach().cpu().to(dtype) if torch.is_tensor(scaling) else scaling
    drop = dict(dropout_mask=None if dropout_mask is None else dropout_mask.cpu(), dropout_p=dropout_p)
    if weight is None:
        ref = flix_delta_reference(xo, Ao, Bo, ids, space.rank_offsets, s, cu_seqlens=cu, **drop)
    else:
        wo = weight.detach().cpu().to(dtype).requires_grad_(weight.requires_grad)
        bo = None if bias is None else bias.detach().cpu().to(dtype).requires_grad_(bias.requires_grad)
        leaves += [wo] + ([bo] if bo is not None else [])
        ref = flix_linear_reference(xo, wo, bo, Ao, Bo, ids, space.rank_offsets, s, cu_seqlens=cu, **drop)
    ref = ref + 0 * (xo.sum() + Ao.sum() + Bo.sum())  # zero gradients where no feature is used
    return ref, leaves


def check_against_oracle(x, A, Bm, routing, ids, space, scaling, dtype=None, *, backend, cu=None, weight=None,
                         bias=None, dropout_p=0.0, generator=None, dropout_mask=None, grad_out=None):
    """Run ``flix_delta`` (or ``flix_linear`` when ``weight`` is given) with ``backend`` and
    check the output and every gradient (x, lora_A, lora_B, and weight/bias when they require
    grad) against the float64 oracle; low precision uses :func:`assert_close_to_oracle`.
    Returns the output and the gradients."""
    dtype = dtype or x.dtype
    xs, As, Bs = (t.detach().clone().requires_grad_(True) for t in (x, A, Bm))
    ws = bs = None
    if weight is not None:
        ws = weight.detach().clone().requires_grad_(weight.requires_grad)
        bs = None if bias is None else bias.detach().clone().requires_grad_(bias.requires_grad)
    kw = dict(scaling=scaling, backend=backend, dropout_p=dropout_p, generator=generator)
    if weight is None:
        out = fk.flix_delta(xs, As, Bs, routing, **kw)
    else:
        out = fk.flix_linear(xs, ws, bs, As, Bs, routing, **kw)
    ref, leaves64 = oracle(x, A, Bm, ids, space, scaling, torch.float64, cu, weight, bias, dropout_mask, dropout_p)
    assert out.shape == ref.shape and out.dtype == x.dtype and out.device == x.device
    gout = grad_out if grad_out is not None else torch.randn(ref.shape, dtype=torch.float64)
    (out * gout.to(out.device, out.dtype)).sum().backward()
    (ref * gout).sum().backward()
    mine = [xs, As, Bs] + ([ws] + ([bs] if bs is not None else []) if ws is not None else [])
    names = ["out", "dx", "dA", "dB", "dW", "db"]
    got = [out] + [t.grad for t in mine]
    want = [ref] + [t.grad for t in leaves64]
    for name, g, w in zip(names, got, want):
        assert (g is None) == (w is None), f"{name}: gradient presence differs from the oracle"
    if dtype in LOW_PRECISION:
        low, leaves_low = oracle(x, A, Bm, ids, space, scaling, dtype, cu, weight, bias, dropout_mask, dropout_p)
        (low * gout.to(dtype)).sum().backward()
        same = [low] + [t.grad for t in leaves_low]
        for name, g, w, s in zip(names, got, want, same):
            if g is not None:
                assert_close_to_oracle(g.cpu(), w, s, name)
    else:
        for name, g, w in zip(names, got, want):
            if g is not None:
                assert_close(g.cpu(), w, dtype, scale=4)
    return got
