"""Shared test helpers: random feature spaces, routings and adapters, tolerances by dtype,
and the suite's seed policy.

Every kernel and layer test compares against :mod:`flix_kernels.reference` (the per-feature
loop) run in float64.

Seeds: every test is deterministic. Before each test, ``random``, ``numpy.random`` and
``torch`` (CPU and CUDA) are seeded from a stable value derived from the test's node id and
a base seed (0, or ``$FLIX_TEST_SEED``); the ``seed`` fixture returns the same value, and
hypothesis tests get it as their ``@seed`` (no example database). A failing test's report
has a "reproduce" section with its seed and the command that reruns it with the same draws.
``FLIX_LONG_TESTS=1`` selects the long hypothesis profile and the long case counts.
"""

from __future__ import annotations

import collections
import os
import random
import shlex
import zlib

import hypothesis
import pytest
import torch
from hypothesis import HealthCheck

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


def assert_close_relative(actual: torch.Tensor, oracle64: torch.Tensor, what: str = "", rtol: float = 0.05):
    """``actual`` within ``rtol`` of the float64 oracle's largest magnitude (for cases where the
    oracle in low precision is no yardstick)."""
    if actual.numel() == 0:
        return
    err = (actual.double() - oracle64.double()).abs().max().item()
    bound = rtol * oracle64.abs().max().item()
    assert err <= bound, f"{what}: error {err:.3g} > {rtol} x the oracle's largest value ({bound:.3g})"


def within_contract(x, A, Bm, scaling, weight, bias, grad_out, results64, dtype, dropout_p) -> bool:
    """Whether the numerical contract (README, *Numerical contract*) promises finite results for
    these inputs: x fits the adapters' dtype; the rank-space products ``x A_k^T`` and ``dy B_k``
    fit float32 (the kernels' accumulator; the input's dtype for float64) before their scale,
    and ``s_k x A_k^T``, ``s_k dy B_k`` fit the adapters' dtype after it; the base products
    ``x W^T + b`` and ``dy W`` and every result (output, gradients) fit their dtypes. Checked with
    a margin of 8x, and over every feature's rows (a superset of the routed ones), so it only
    errs on the side of "not promised"."""
    lora_dtype = A.dtype
    acc = torch.float64 if torch.float64 in (dtype, lora_dtype) else torch.float32
    fits = {d: torch.finfo(d).max / 8 for d in (dtype, lora_dtype, acc)}
    x64, A64, B64 = (t.detach().cpu().double() for t in (x, A, Bm))
    dy = grad_out.detach().cpu().double()
    flat_x, flat_dy = x64.reshape(-1, x64.shape[-1]), dy.reshape(-1, dy.shape[-1])
    s = scaling.detach().cpu().double().abs().max().item() if torch.is_tensor(scaling) else abs(float(scaling))
    s = max(s, 0.0) / (1.0 - dropout_p)
    h = (flat_x @ A64.t()).abs().amax().item() if flat_x.numel() and A64.numel() else 0.0
    g = (flat_dy @ B64).abs().amax().item() if flat_dy.numel() and B64.numel() else 0.0
    checks = [(x64.abs().amax().item() if x64.numel() else 0.0, lora_dtype), (h / (1.0 - dropout_p), acc),
              (g, acc), (s * h, lora_dtype), (s * g, lora_dtype)]
    if weight is not None:
        W64 = weight.detach().cpu().double()
        base = flat_x @ W64.t() + (0 if bias is None else bias.detach().cpu().double())
        checks += [(base.abs().amax().item() if base.numel() else 0.0, dtype),
                   ((flat_dy @ W64).abs().amax().item() if flat_dy.numel() else 0.0, dtype)]
    narrow = dtype if fits[dtype] <= fits[lora_dtype] else lora_dtype  # results: out, dx in dtype; dA, dB in the adapters'
    checks += [(r.detach().abs().amax().item() if r.numel() else 0.0, narrow) for r in results64 if r is not None]
    return all(value <= fits[d] for value, d in checks)


# -- seed policy -----------------------------------------------------------------------------
SEED_ENV = "FLIX_TEST_SEED"
LONG_ENV = "FLIX_LONG_TESTS"
LONG_TESTS = os.environ.get(LONG_ENV, "").strip() not in ("", "0")


def base_seed() -> int:
    """The base of every test's seed: ``$FLIX_TEST_SEED`` (any int literal), else 0."""
    raw = os.environ.get(SEED_ENV, "").strip()
    if not raw:
        return 0
    try:
        return int(raw, 0)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV} must be an integer, got {raw!r}") from None


def stable_seed(nodeid: str, base: int | None = None) -> int:
    """The seed of the test ``nodeid``: the same on every run and machine for one base seed
    (a CRC, not ``hash()``, which Python salts per process)."""
    return zlib.crc32(f"{base_seed() if base is None else base}:{nodeid}".encode()) & 0x7FFFFFFF


# Hypothesis: no example database (a failure replayed from .hypothesis/ would make runs differ),
# no deadline (shared CPUs), the failing example's reproduce blob printed; the seed comes from
# the autouse fixture below. FLIX_LONG_TESTS picks the profile and the property tests' case counts.
_HYPOTHESIS = dict(deadline=None, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow])
hypothesis.settings.register_profile("flix-ci", max_examples=100, **_HYPOTHESIS)
hypothesis.settings.register_profile("flix-long", max_examples=1000, **_HYPOTHESIS)  # where a test sets none
HYPOTHESIS_PROFILE = "flix-long" if LONG_TESTS else "flix-ci"
hypothesis.settings.load_profile(HYPOTHESIS_PROFILE)
# Random cases per property test: FLIX_LONG_TESTS=1 runs >= 10,000 on the torch backend and
# >= 2,000 per kernel backend; CI runs a few hundred in all.
PROPERTY_CASES = {"torch": 10_000, "kernel": 2_000} if LONG_TESTS else {"torch": 300, "kernel": 40}
# Cases run and their wall time (seconds) per backend, counted by the property tests, summed up at the end.
PROPERTY_RUNS: collections.Counter = collections.Counter()
PROPERTY_SECONDS: collections.Counter = collections.Counter()
# Calls of check_against_oracle with inputs far from unit scale (magnitude=True), by whether the
# numerical contract promised finite results (which were then checked) or not.
MAGNITUDE_CASES: collections.Counter = collections.Counter()

_SEED_KEY = pytest.StashKey[int]()


def pytest_configure(config):
    base_seed()  # a malformed FLIX_TEST_SEED stops the run before any test


def pytest_report_header(config):
    source = f"from ${SEED_ENV}" if os.environ.get(SEED_ENV, "").strip() else f"default; set ${SEED_ENV} to change"
    return (f"flix_kernels tests: base seed {base_seed()} ({source}), hypothesis profile {HYPOTHESIS_PROFILE}, "
            f"property cases {PROPERTY_CASES}")


def pytest_terminal_summary(terminalreporter):
    if PROPERTY_RUNS:
        terminalreporter.write_sep("-", "property cases against the float64 oracle")
        for backend, n in sorted(PROPERTY_RUNS.items()):
            terminalreporter.write_line(f"{backend}: {n} cases in {PROPERTY_SECONDS[backend]:.0f} s")
        if MAGNITUDE_CASES:
            terminalreporter.write_line(
                f"far from unit scale: {MAGNITUDE_CASES['within']} within the numerical contract (every result "
                f"checked finite), {MAGNITUDE_CASES['beyond']} beyond it (values checked where the oracle is finite)")


def reproduce_command(nodeid: str) -> str:
    """The shell command that reruns ``nodeid`` with the same seeds and case counts."""
    env = [f"{SEED_ENV}={base_seed()}"] + ([f"{LONG_ENV}=1"] if LONG_TESTS else [])
    return " ".join(env + ["python", "-m", "pytest", shlex.quote(nodeid)])


@pytest.fixture(autouse=True)
def _seed_everything(request) -> int:
    """Seed every global RNG from the test's stable seed (see the module docstring)."""
    s = stable_seed(request.node.nodeid)
    request.node.stash[_SEED_KEY] = s
    random.seed(s)
    torch.manual_seed(s)  # also every CUDA device
    try:
        import numpy
    except ImportError:
        pass
    else:
        numpy.random.seed(s)
    fn = getattr(request, "function", None)
    if getattr(fn, "is_hypothesis_test", False):
        hypothesis.seed(s)(fn)  # hypothesis reads it when the test runs
    return s


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    s = item.stash.get(_SEED_KEY, None)
    if report.failed and s is not None:
        report.sections.append(("reproduce", (
            f"seed {s} (base seed {base_seed()} and this test's node id; ${SEED_ENV} changes the base)\n"
            f"rerun with the same draws: {reproduce_command(item.nodeid)}")))


@pytest.fixture
def seed(request, _seed_everything) -> int:
    """This test's stable seed (the one the global RNGs were seeded with)."""
    request.node.user_properties.append(("seed", _seed_everything))
    return _seed_everything


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


FACTORS = ("x", "lora_A", "lora_B")


def oracle(x, A, Bm, ids, space, scaling, dtype, cu=None, weight=None, bias=None, dropout_mask=None, dropout_p=0.0,
           lora_dtype=None, requires_grad=FACTORS):
    """The per-feature loop oracle on CPU in ``dtype`` and its leaves ``(x, A, B[, W, b])``.

    ``lora_dtype`` (default ``dtype``) is the dtype of the adapters and so of the low-rank
    path, as in the ops; ``requires_grad`` names the factors that get gradients."""
    lora_dtype = lora_dtype or dtype
    leaves = [t.detach().cpu().to(d).requires_grad_(name in requires_grad)
              for name, t, d in zip(FACTORS, (x, A, Bm), (dtype, lora_dtype, lora_dtype))]
    xo, Ao, Bo = leaves
    s = scaling.detach().cpu().to(lora_dtype) if torch.is_tensor(scaling) else scaling
    drop = dict(dropout_mask=None if dropout_mask is None else dropout_mask.cpu(), dropout_p=dropout_p)
    if weight is None:
        ref = flix_delta_reference(xo, Ao, Bo, ids, space.rank_offsets, s, cu_seqlens=cu, **drop).to(dtype)
    else:
        wo = weight.detach().cpu().to(dtype).requires_grad_(weight.requires_grad)
        bo = None if bias is None else bias.detach().cpu().to(dtype).requires_grad_(bias.requires_grad)
        leaves += [wo] + ([bo] if bo is not None else [])
        ref = flix_linear_reference(xo, wo, bo, Ao, Bo, ids, space.rank_offsets, s, cu_seqlens=cu, **drop)
    ref = ref + 0 * (xo.sum() + Ao.sum() + Bo.sum())  # zero gradients where no feature is used
    return ref, leaves


# Memory layouts :func:`stored_as` makes; "strided" and "offset" copies have a finite sentinel
# around the values, so a kernel that reads past its strides gives a visibly wrong result.
MEMORY_LAYOUTS = ("contiguous", "transposed", "strided", "offset")
_SENTINEL = 1000.0


def stored_as(t: torch.Tensor, layout: str | None) -> torch.Tensor:
    """A detached copy of ``t`` with the same values stored in ``layout``: "contiguous";
    "transposed" (every dimension's order reversed in memory); "strided" (the last dimension
    at stride 2, i.e. a slice of a wider tensor); "offset" (contiguous, one element past the
    start of its storage, so not 16-byte aligned); None: ``t.clone()`` (keeps t's layout)."""
    t = t.detach()
    if layout is None:
        return t.clone()
    if layout == "contiguous":
        return t.clone(memory_format=torch.contiguous_format)
    if layout == "transposed":
        rev = list(range(t.dim()))[::-1]
        return t.permute(rev).contiguous().permute(rev)
    if layout == "strided":
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), _SENTINEL, dtype=t.dtype, device=t.device)
        return wide[..., ::2].copy_(t)
    if layout == "offset":
        flat = torch.full((t.numel() + 1,), _SENTINEL, dtype=t.dtype, device=t.device)
        return flat[1:].view(t.shape).copy_(t)
    raise ValueError(f"unknown memory layout {layout!r}; expected one of {MEMORY_LAYOUTS}")


def check_against_oracle(x, A, Bm, routing, ids, space, scaling, dtype=None, *, backend, cu=None, weight=None,
                         bias=None, dropout_p=0.0, generator=None, dropout_mask=None, grad_out=None,
                         requires_grad=FACTORS, memory=None, magnitude=False):
    """Run ``flix_delta`` (or ``flix_linear`` when ``weight`` is given) with ``backend`` and
    check the output and every gradient (of the factors named in ``requires_grad``, and of
    weight/bias when they require grad) against the float64 oracle; low precision uses
    :func:`assert_close_to_oracle` (against the oracle in x's dtype with the adapters' dtype
    for the low-rank path). ``memory`` maps "x", "lora_A", "lora_B", "weight" to a layout of
    :func:`stored_as` for the op's inputs. ``magnitude``: inputs far from unit scale, so fp32 and
    fp64 tolerances are relative to each result's largest value. Wherever
    :func:`within_contract` promises it, every result must be finite. Returns the output and the
    gradients."""
    dtype = dtype or x.dtype
    memory = memory or {}
    xs, As, Bs = (stored_as(t, memory.get(name)).requires_grad_(name in requires_grad)
                  for name, t in zip(FACTORS, (x, A, Bm)))
    ws = bs = None
    if weight is not None:
        ws = stored_as(weight, memory.get("weight")).requires_grad_(weight.requires_grad)
        bs = None if bias is None else bias.detach().clone().requires_grad_(bias.requires_grad)
    kw = dict(scaling=scaling, backend=backend, dropout_p=dropout_p, generator=generator)
    if weight is None:
        out = fk.flix_delta(xs, As, Bs, routing, **kw)
    else:
        out = fk.flix_linear(xs, ws, bs, As, Bs, routing, **kw)
    args = (x, A, Bm, ids, space, scaling)
    common = dict(cu=cu, weight=weight, bias=bias, dropout_mask=dropout_mask, dropout_p=dropout_p,
                  requires_grad=requires_grad)
    ref, leaves64 = oracle(*args, torch.float64, **common)
    assert out.shape == ref.shape and out.dtype == x.dtype and out.device == x.device
    assert out.requires_grad == ref.requires_grad, "out: requires_grad differs from the oracle's"
    gout = grad_out if grad_out is not None else torch.randn(ref.shape, dtype=torch.float64)
    if ref.requires_grad:
        (out * gout.to(out.device, out.dtype)).sum().backward()
        (ref * gout).sum().backward()
    mine = [xs, As, Bs] + ([ws] + ([bs] if bs is not None else []) if ws is not None else [])
    names = ["out", "dx", "dA", "dB", "dW", "db"]
    got = [out] + [t.grad for t in mine]
    want = [ref] + [t.grad for t in leaves64]
    for name, g, w in zip(names, got, want):
        assert (g is None) == (w is None), f"{name}: gradient presence differs from the oracle"
    promised = within_contract(x, A, Bm, scaling, weight, bias, gout, want, dtype, dropout_p)
    if magnitude:
        MAGNITUDE_CASES["within" if promised else "beyond"] += 1
    if promised:
        for name, g, w in zip(names, got, want):
            if g is not None and not bool(torch.isfinite(g).all()):
                bad = int((~torch.isfinite(g)).sum())
                raise AssertionError(
                    f"{name}: {bad} inf/NaN values where the float64 oracle's are finite (largest "
                    f"{w.abs().max().item():.3g}) and every intermediate the contract rounds fits {dtype} / {A.dtype}")
    if not promised and magnitude:
        # Beyond the contract a backend may overflow where the oracle does not; what it does
        # return finite must still be right.
        rtol = {torch.float64: 1e-8, torch.float32: 1e-3}.get(dtype, 0.05)
        for name, g, w in zip(names, got, want):
            if g is not None:
                ok = torch.isfinite(g.cpu()) & torch.isfinite(w)
                assert_close_relative(g.cpu()[ok], w[ok], name, rtol=rtol)
    elif dtype in LOW_PRECISION:
        low, leaves_low = oracle(*args, dtype, lora_dtype=A.dtype, **common)
        if low.requires_grad:
            (low * gout.to(dtype)).sum().backward()
        same = [low] + [t.grad for t in leaves_low]
        for name, g, w, s in zip(names, got, want, same):
            if g is not None:
                if torch.isfinite(s).all():
                    assert_close_to_oracle(g.cpu(), w, s, name)
                else:  # the same-precision oracle overflowed (it rounds before it scales): compare with the max
                    assert_close_relative(g.cpu(), w, name)
    else:
        for name, g, w in zip(names, got, want):
            if g is not None:
                big = w.abs().max().item() if magnitude and w.numel() else 1.0
                assert_close(g.cpu(), w, dtype, scale=4 * max(1.0, big))
    return got
