"""Property-based differential tests: ``flix_delta`` / ``flix_linear`` of every backend
against the float64 per-feature oracle, over random cases.

A :class:`Case` (drawn by hypothesis, see :func:`cases`) fixes everything about one call:
the feature space (1 to 4 groups, ragged ranks 1 to 64, up to 2048 features), the routing
(random, identical sets, skewed, a few sets, no feature, an empty batch; feature dropout
on the Routing), the token layout ((B, L, in), (B, in), packed (T, in) / (1, T, in) with
empty examples, decode after a packed prefill), dtypes (adapters in fp32 under fp16/bf16
activations too), dropout (checked with the backend's own mask), float or per-feature
scales, non-contiguous x / lora_A / lora_B / weight, which inputs need gradients, and the
backend's forced code path. Tensor values come from ``Case.data_seed``. :func:`run_case`
builds the case and checks the output and every gradient with
:func:`conftest.check_against_oracle`.

Case counts are ``conftest.PROPERTY_CASES`` (``FLIX_LONG_TESTS=1``: 10,000 on the torch
backend, 2,000 per kernel backend). A failure prints the shrunk Case and a one-line command
that reruns just that case.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import currently_in_test_context, given, note, settings
from hypothesis import strategies as st

import flix_kernels as fk
from _kernels import GRAD_PATHS, _base, forced_paths, keep_mask
from conftest import (BACKENDS, DEVICE, FACTORS, PROPERTY_CASES, PROPERTY_RUNS,
                      PROPERTY_SECONDS, SEED_ENV, base_seed, stable_seed,
                      check_against_oracle, random_adapters, random_feature_ids, random_scaling)
from test_ops import _forced

# Up to 2048 features; 512 for the kernels in Triton's interpreter, where each feature costs
# about 20 ms (one weight-gradient program per feature of the space, present or not).
MAX_FEATURES = {"torch": 2048, "kernel": 2048 if torch.cuda.is_available() else 512}
MAX_RANK = 64
ROUTINGS = ("random", "identical", "skewed", "few_sets", "none")
LAYOUTS = ("batched", "single_token", "packed", "packed_leading_one", "decode_after_packed")
PACKED = ("packed", "packed_leading_one", "decode_after_packed")  # routings with cu_seqlens
# (x dtype, adapter dtype) per backend; bf16 kernels only on a GPU (the interpreter's bf16 tl.dot is wrong).
DTYPES = {
    "torch": [("float64", "float64"), ("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"),
              ("float16", "float32"), ("bfloat16", "float32")],
    "kernel": [("float32", "float32"), ("float16", "float16"), ("float16", "float32")]
    + ([("bfloat16", "bfloat16"), ("bfloat16", "float32")] if torch.cuda.is_available() else []),
}
LARGE_ODDS = {"torch": 4, "kernel": 4 if torch.cuda.is_available() else 20}
PATHS = {"torch": ("auto", "dense", "grouped"), "triton": ("small", "default", "owner", "split", "dy_pass"),
         "cuda": ("small", "default", "owner", "split")}


@dataclasses.dataclass(frozen=True)
class Case:
    """One differential test case (its repr is valid Python: paste it into :func:`run_case`)."""

    backend: str
    op: str  # "delta" or "linear"
    groups: tuple  # ((number of values, rank), ...) per group
    routing: str  # one of ROUTINGS
    num_examples: int
    p_absent: float  # probability that an example has no feature of a group ("random", "few_sets", ...)
    feature_dropout: float  # the Routing's feature dropout
    layout: str  # one of LAYOUTS
    lengths: tuple  # tokens per example (the routing's cu_seqlens for the packed layouts)
    in_features: int
    out_features: int
    dtype: str
    lora_dtype: str
    scaling: object  # a float, or "per_feature"
    dropout_p: float
    paths: str  # torch: the strategy; kernels: forced launch plans; "+fused": Triton's fused base GEMM (PATHS)
    # (log10 of x's, lora_A's and lora_B's scale, log10 of the scales' multiplier); () for unit scale
    magnitude: tuple = ()
    memory: tuple = ()  # ((tensor name, layout of conftest.stored_as), ...) for the non-contiguous inputs
    requires_grad: tuple = FACTORS  # of x, lora_A, lora_B, and "weight"/"bias" for op "linear"
    bias: bool = True
    data_seed: int = 0


@st.composite
def cases(draw, backend: str) -> Case:
    family = "torch" if backend == "torch" else "kernel"
    G = draw(st.integers(1, 4))
    # Hundreds of features (up to MAX_FEATURES) in one case of LARGE_ODDS.
    large = draw(st.integers(1, LARGE_ODDS[family])) == LARGE_ODDS[family]
    per_group = MAX_FEATURES[family] // G if large else 6
    groups = tuple((draw(st.integers(1, per_group)), draw(st.integers(1, MAX_RANK))) for _ in range(G))
    routing = draw(st.sampled_from(ROUTINGS))
    B = draw(st.integers(0, 8))
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "batched":
        lengths = (draw(st.integers(0, 6)),) * B
    elif layout == "single_token":
        lengths = (1,) * B
    else:
        lengths = tuple(draw(st.lists(st.integers(0, 8), min_size=B, max_size=B)))
    dim = st.integers(1, 8 if large else (32 if family == "torch" else 40))
    op = draw(st.sampled_from(["delta", "linear"]))
    dtype, lora_dtype = draw(st.sampled_from(DTYPES[family]))
    memory = tuple((name, layout_) for name in FACTORS + (("weight",) if op == "linear" else ())
                   if (layout_ := draw(st.sampled_from([None, None, "transposed", "strided", "offset"]))))
    grads = FACTORS if draw(st.sampled_from([True, True, False])) else tuple(
        draw(st.lists(st.sampled_from(FACTORS), unique=True, max_size=3)))
    if op == "linear":
        grads += tuple(name for name in ("weight", "bias") if draw(st.booleans()))
    magnitude = draw(magnitudes(dtype, lora_dtype)) if draw(st.integers(0, 2)) == 0 else ()
    paths = draw(st.sampled_from(PATHS[backend]))
    if backend == "triton" and op == "linear" and draw(st.booleans()):
        paths += "+fused"
    return Case(
        backend=backend, op=op, groups=groups, routing=routing, num_examples=B,
        p_absent=draw(st.sampled_from([0.0, 0.3, 0.7])), feature_dropout=draw(st.sampled_from([0.0, 0.0, 0.5])),
        layout=layout, lengths=lengths, in_features=draw(dim), out_features=draw(dim), dtype=dtype,
        lora_dtype=lora_dtype, scaling=draw(st.one_of(st.just("per_feature"), st.sampled_from([1.0, 0.5, -0.75, 0.0]))),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.3])), memory=memory, requires_grad=grads,
        bias=draw(st.booleans()), paths=paths, magnitude=magnitude, data_seed=draw(st.integers(0, 2**32 - 1)),
    )


@st.composite
def magnitudes(draw, dtype: str, lora_dtype: str) -> tuple:
    """Exponents (base 10) for x, lora_A, lora_B and the scales: activations and weights up to
    a good part of the narrower dtype's range, scales from 1e-4 to 1e3, and lora_B chosen so the
    update lands anywhere from small to most of the range (so most cases are ones the contract
    promises finite results for; conftest.within_contract decides which). The cases that matter:
    ``x A^T`` beyond the dtype's range while ``s x A^T`` is inside it."""
    top = min(torch.finfo(getattr(torch, d)).max for d in (dtype, lora_dtype))
    top = min(math.log10(top), 38.0)  # float64 runs at float32's range: the accumulator's in the kernels
    e_h = draw(st.floats(0.5 * top, top + 1.0))  # x A^T before its scale: up to 10x beyond the range
    e_x = draw(st.floats(max(0.0, e_h - 0.5 * top), 0.75 * top))
    e_a = min(max(e_h - e_x, -3.0), 0.5 * top)
    e_s = min(draw(st.floats(-4.0, 3.0)), top - 1.0 - (e_x + e_a))  # s x A^T inside the range
    target = draw(st.floats(-2.0, 0.6 * top))  # the update's size
    e_b = min(max(target - (e_x + e_a + e_s), -6.0), 6.0)
    return tuple(round(e, 2) for e in (e_x, e_a, e_b, e_s))


def _feature_ids(case: Case, space: fk.FeatureSpace, gen: torch.Generator) -> torch.Tensor:
    B, p = case.num_examples, case.p_absent
    if case.routing == "none":
        return torch.full((B, space.num_groups), -1, dtype=torch.long)
    if case.routing == "random":
        return random_feature_ids(space, B, gen, p)
    if case.routing == "identical":
        return random_feature_ids(space, 1, gen, p).expand(B, -1).clone()
    if case.routing == "few_sets":
        sets = random_feature_ids(space, 3, gen, p)
        return sets[torch.randint(0, 3, (B,), generator=gen)]
    # "skewed": one feature of group 0 on every example but about one in four, the rest random
    ids = random_feature_ids(space, B, gen, p)
    ids[:, 0] = int(torch.randint(space.group_offsets[0], space.group_offsets[1], (), generator=gen))
    others = torch.rand(B, generator=gen) < 0.25
    if B >= 2:
        others[int(torch.randint(0, B, (), generator=gen))] = True
    ids[others, 0] = random_feature_ids(space, B, gen, 0.5)[others, 0]
    return ids


def _token_shape(case: Case) -> tuple:
    B, lengths = case.num_examples, case.lengths
    if case.layout == "batched":
        return (B, lengths[0] if B else 3)
    if case.layout in ("single_token", "decode_after_packed"):
        return (B,)
    T = sum(lengths)
    return (T,) if case.layout == "packed" else (1, T)


def _paths(case: Case):
    if case.backend == "torch":
        return _forced(case.paths)
    name, _, fused = case.paths.partition("+")
    if name == "small":
        overrides = None  # _kernels.SMALL_PATHS: small tiles, K splits, token chunks
    elif name == "default":
        overrides = {}  # the backend's own launch plans
    else:
        overrides = GRAD_PATHS[case.backend][name]  # one weight-gradient path, forced
    return forced_paths(case.backend, overrides, fuse_base=bool(fused) if case.backend == "triton" else None)


def run_case(case: Case) -> None:
    """Build ``case`` and check it against the float64 oracle (output and gradients)."""
    start = time.perf_counter()
    try:
        _run_case(case)
    finally:
        PROPERTY_RUNS[case.backend] += 1
        PROPERTY_SECONDS[case.backend] += time.perf_counter() - start


def _run_case(case: Case) -> None:
    gen = torch.Generator().manual_seed(case.data_seed)
    space = fk.FeatureSpace({f"g{i}": [f"v{j}" for j in range(n)] for i, (n, _) in enumerate(case.groups)},
                            {f"g{i}": r for i, (_, r) in enumerate(case.groups)})
    cu = torch.tensor((0,) + case.lengths).cumsum(0) if case.layout in PACKED else None
    routing = fk.Routing(_feature_ids(case, space, gen), space, cu_seqlens=cu, feature_dropout=case.feature_dropout,
                         generator=torch.Generator().manual_seed(case.data_seed + 1))
    ids = routing.feature_ids  # after feature dropout: what the oracle must use
    token_shape = _token_shape(case)
    # The input's token layout decides how the oracle maps tokens to examples: (B,) after a
    # packed prefill is one token per example unless it is also the packed shape (T == B).
    oracle_cu = cu if case.layout in PACKED and (case.layout != "decode_after_packed" or sum(case.lengths) ==
                                                  case.num_examples) else None
    dtype, lora_dtype = getattr(torch, case.dtype), getattr(torch, case.lora_dtype)
    in_f, out_f = case.in_features, case.out_features
    e_x, e_a, e_b, e_s = case.magnitude or (0.0, 0.0, 0.0, 0.0)
    x = (torch.randn(*token_shape, in_f, generator=gen, dtype=torch.float64) * 10**e_x).to(dtype).to(DEVICE)
    A, Bm = random_adapters(space, in_f, out_f, gen, torch.float64)
    A, Bm = (A * 10**e_a).to(lora_dtype).to(DEVICE), (Bm * 10**e_b).to(lora_dtype).to(DEVICE)
    W = b = None
    if case.op == "linear":
        W, b = _base(gen, in_f, out_f, dtype)
        W.requires_grad_("weight" in case.requires_grad)
        b = b.requires_grad_("bias" in case.requires_grad) if case.bias else None
    if case.scaling == "per_feature":
        scale_dtype = torch.float64 if lora_dtype == torch.float64 else torch.float32
        scaling = (random_scaling(space, gen, torch.float64) * 10**e_s).to(scale_dtype).to(DEVICE)
    else:
        scaling = case.scaling * 10**e_s
    grad_out = torch.randn(*token_shape, out_f, generator=gen, dtype=torch.float64)
    generator = mask = None
    if case.dropout_p:
        mask_seed = case.data_seed + 2
        generator = torch.Generator(DEVICE).manual_seed(mask_seed)
        T = x.numel() // max(in_f, 1)
        mask = keep_mask(case.backend, mask_seed, T, in_f, case.dropout_p).view(x.shape)
    if currently_in_test_context():  # run_case also runs alone, to reproduce a case
        note(f"effective feature ids {ids.tolist()}, cu_seqlens {None if cu is None else cu.tolist()}, "
             f"x {tuple(x.shape)}")
        note(f'rerun this case alone: cd tests && python -c "import conftest; from test_properties import *; run_case({case!r})"')
    with _paths(case):
        check_against_oracle(x, A, Bm, routing, ids, space, scaling, backend=case.backend, cu=oracle_cu, weight=W,
                             bias=b, dropout_p=case.dropout_p, generator=generator, dropout_mask=mask,
                             grad_out=grad_out, requires_grad=tuple(n for n in case.requires_grad if n in FACTORS),
                             memory=dict(case.memory), magnitude=bool(case.magnitude))


@settings(max_examples=PROPERTY_CASES["torch"])
@given(case=cases("torch"))
def test_torch_backend_matches_oracle(case):
    run_case(case)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=PROPERTY_CASES["kernel"])
@given(data=st.data())
def test_kernel_backend_matches_oracle(backend, data):
    run_case(data.draw(cases(backend), label="case"))


# ---------------------------------------------------------------------------------------------
# The seed policy (tests/conftest.py), proven on a throwaway suite run in subprocesses
# ---------------------------------------------------------------------------------------------
_POLICY_SUITE = '''
import random

import numpy
import torch
from hypothesis import given, strategies as st


def test_draws(seed):
    print("DRAWS", seed, torch.rand(()).item(), random.random(), numpy.random.rand())


def test_other(seed):
    print("OTHER", seed, torch.rand(()).item())


@given(st.integers(0, 2**62))
def test_hypothesis(n):
    print("HYPOTHESIS", n)


def test_fails(seed):
    print("FAILS", seed, torch.rand(()).item())
    assert False
'''


def _run_policy_suite(root: Path, env_seed: str | None, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in (SEED_ENV, "FLIX_LONG_TESTS", "PYTEST_ADDOPTS")}
    if env_seed is not None:
        env[SEED_ENV] = env_seed
    cmd = [sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", "--rootdir", str(root), *args]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _lines(output: str, tag: str) -> list[str]:
    """The lines the suite printed after ``tag`` (with -s they follow pytest's progress marks)."""
    return re.findall(rf"\b{tag} ([^\n]*)", output)


def test_seeds_are_stable_per_test_overridable_and_printed_on_failure(tmp_path):
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_policy.py").write_text(_POLICY_SUITE)
    # Two runs with the default base seed and one with another base, in parallel.
    procs = [_run_policy_suite(tmp_path, env) for env in (None, None, "12345")]
    default, again, other = (p.communicate(timeout=600)[0] for p in procs)
    for out in (default, again, other):
        assert "1 failed, 3 passed" in out, out
    for tag in ("DRAWS", "OTHER", "HYPOTHESIS", "FAILS"):
        assert _lines(default, tag) and _lines(default, tag) == _lines(again, tag), tag
        assert _lines(default, tag) != _lines(other, tag), tag
    # The fixture's seed is the one the global RNGs got, and each test has its own.
    draws_seed, torch_draw = _lines(default, "DRAWS")[0].split()[:2]
    assert torch_draw == str(torch.rand((), generator=torch.Generator().manual_seed(int(draws_seed))).item())
    assert draws_seed != _lines(default, "OTHER")[0].split()[0]
    assert "base seed 0 (default" in default and "base seed 12345 (from $FLIX_TEST_SEED" in other
    # The failure report names the seed and a command that reruns the test with the same draws.
    section = other[other.index("- reproduce -"):]
    command = re.search(r"rerun with the same draws: (\S+)=(\S+) python -m pytest (\S+)", section)
    assert command and command.group(1) == SEED_ENV and command.group(3) == "test_policy.py::test_fails", section
    rerun = _run_policy_suite(tmp_path, command.group(2), command.group(3)).communicate(timeout=600)[0]
    assert _lines(rerun, "FAILS") == _lines(other, "FAILS") and "1 failed" in rerun


def test_a_malformed_seed_variable_is_a_usage_error(monkeypatch):
    monkeypatch.setenv(SEED_ENV, "twelve")
    with pytest.raises(pytest.UsageError, match=f"{SEED_ENV} must be an integer, got 'twelve'"):
        base_seed()
    monkeypatch.setenv(SEED_ENV, "0x10")
    assert base_seed() == 16 and stable_seed("a::b") == stable_seed("a::b", 16) != stable_seed("a::b", 0)
