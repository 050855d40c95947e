"""Microbenchmarks for pytest-benchmark: ``pytest benchmarks`` (``--benchmark-only`` to skip
nothing else, ``--benchmark-json out.json`` to keep them).

Every variant of :mod:`flix_kernels.bench.variants` on one small case per device (the headline
shape on a GPU), forward and forward+backward. Each variant is checked against the float64
oracle before it is timed; a wrong result fails the test instead of producing a number.
"""

from __future__ import annotations

import pytest
import torch

from flix_kernels.backends import available_backends
from flix_kernels.bench.cases import Case, make_inputs, make_routing, shape_sets
from flix_kernels.bench.suite import _call, check
from flix_kernels.bench.variants import Context, variants

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASE = shape_sets(DEVICE.type, quick=True)["headline"][0] if DEVICE.type == "cuda" else \
    Case("micro", tokens=512, seq_len=128, d_in=256, d_out=256)
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
VARIANTS, SKIPPED = variants(DEVICE, DTYPE, CASE, compile_torch=False, backends=available_backends(DEVICE))


@pytest.fixture(scope="module")
def problem():
    space = CASE.space()
    routing = make_routing(CASE, space, torch.Generator().manual_seed(0), DEVICE)
    inputs = make_inputs(CASE, space, DTYPE, DEVICE, torch.Generator(DEVICE).manual_seed(1), 2)
    return Context(CASE, routing, DEVICE, {}), inputs


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_variant(benchmark, problem, variant, mode):
    ctx, inputs = problem
    prepared = [variant.prepare(ctx, s) for s in inputs]
    check(variant, ctx, inputs[0], *prepared[0])
    call = _call(mode, prepared, inputs)
    if DEVICE.type == "cuda":
        def timed():
            call()
            torch.cuda.synchronize()
    else:
        timed = call
    benchmark.extra_info.update(case=CASE.as_dict(), dtype=str(DTYPE), device=str(DEVICE))
    benchmark(timed)
