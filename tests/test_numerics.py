"""The numerical contract every backend follows (README, *Numerical contract*): x is rounded to
the adapters' dtype; the rank-space activation ``h = s * x A_S^T`` and its gradient
``g = s * dy B_S`` are accumulated in float32 and scaled before they are rounded; every GEMM
accumulates in float32; each result is rounded once to its dtype.

The cases here sit where a backend that rounds ``x A^T`` (or ``dy B``) to a 16-bit dtype
before scaling overflows while the scaled result, and so the float64 oracle's, is small: the
outside probe's example (fp16 activations of 1e4 with rank 256 and scale 1/256), its gradient
twin, and bf16 near the top of its range. ``tests/test_properties.py`` draws magnitude as an
axis of its random cases and checks finiteness there too (conftest.within_contract).
"""

from __future__ import annotations

import pytest
import torch

import flix_kernels as fk
from conftest import BACKENDS, DEVICE, KERNEL_DTYPES, assert_close_relative, check_against_oracle, within_contract
from flix_kernels.backends import torch_backend

TORCH_PATHS = ("auto", "dense", "grouped")


def _probe_case(dtype, gen, x_scale, rank=256, in_f=64, out_f=64, examples=1, tokens=4):
    space = fk.FeatureSpace({"g": ["a", "b"]}, rank=rank)
    A = torch.randn(2 * rank, in_f, generator=gen, dtype=torch.float64)
    B = torch.randn(out_f, 2 * rank, generator=gen, dtype=torch.float64) * 0.01
    x = torch.randn(examples, tokens, in_f, generator=gen, dtype=torch.float64) * x_scale
    feats = [{"g": "a"}, {"g": "b"}, {}][:examples] if examples > 1 else [{"g": "a"}]
    routing = fk.Routing(space.encode(feats), space)
    return space, routing, x.to(dtype).to(DEVICE), A.to(dtype).to(DEVICE), B.to(dtype).to(DEVICE)


@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("op", ["delta", "linear"])
def test_torch_backend_scales_h_before_rounding_in_fp16(seed, path, op, monkeypatch):
    """The probe's example: x A^T ~ 1e5 overflows fp16, s x A^T ~ 300 does not."""
    monkeypatch.setattr(torch_backend, "FORCE_STRATEGY", None if path == "auto" else path)
    gen = torch.Generator().manual_seed(seed)
    examples = 1 if path != "grouped" else 3
    space, routing, x, A, B = _probe_case(torch.float16, gen, 1e4, examples=examples)
    assert (x.double() @ A.double().t()).abs().max() > torch.finfo(torch.float16).max  # the unscaled h overflows
    kw = {}
    if op == "linear":
        W = (torch.randn(B.shape[0], x.shape[-1], generator=gen, dtype=torch.float64) * 1e-3).half()
        kw = dict(weight=W, bias=None)
    got = check_against_oracle(x, A, B, routing, routing.feature_ids, space, 1 / 256, backend="torch", **kw)
    assert all(torch.isfinite(g).all() for g in got if g is not None)


def test_torch_backend_scales_g_before_rounding_in_fp16(seed):
    """The backward's twin: dy B beyond fp16's range, s dy B inside it. (bf16 has float32's
    range, so there only the order of rounding and scaling differs: see the next test.)"""
    gen = torch.Generator().manual_seed(seed)
    top = torch.finfo(torch.float16).max
    space, routing, x, A, B = _probe_case(torch.float16, gen, 1.0)
    B = (B.double() * top * 20).half()  # entries ~ top / 5: dy B (64 terms) beyond top
    A = (A.double() * 1e-3).half()
    dy = torch.randn(*x.shape[:-1], B.shape[0], generator=gen, dtype=torch.float64)
    assert (dy.reshape(-1, B.shape[0]) @ B.double()).abs().max() > top
    got = check_against_oracle(x, A, B, routing, routing.feature_ids, space, 1 / 256, backend="torch", grad_out=dy)
    assert within_contract(x, A, B, 1 / 256, None, None, dy, [], torch.float16, 0.0)
    assert all(torch.isfinite(g).all() for g in got if g is not None)


@pytest.mark.parametrize("path", TORCH_PATHS)
def test_torch_backend_bf16_near_the_top_of_its_range(seed, path, monkeypatch):
    monkeypatch.setattr(torch_backend, "FORCE_STRATEGY", None if path == "auto" else path)
    gen = torch.Generator().manual_seed(seed)
    space, routing, x, A, B = _probe_case(torch.bfloat16, gen, 1e35, rank=64, examples=1 if path != "grouped" else 3)
    assert (x.double() @ A.double().t()).abs().max() > 1e35
    got = check_against_oracle(x, A, B, routing, routing.feature_ids, space, 1e-4, backend="torch")
    assert within_contract(x, A, B, 1e-4, None, None, torch.ones(*x.shape[:-1], B.shape[0]), [], torch.bfloat16, 0.0)
    assert all(torch.isfinite(g).all() for g in got if g is not None)


def test_the_probe_example_is_finite_and_equal_in_every_backend(seed):
    """The issue's example verbatim, on every backend that runs here (Triton in the interpreter
    on a CPU: fp16 only, see KERNEL_DTYPES), against the float64 oracle and each other."""
    sp = fk.FeatureSpace({"g": ["a"]}, rank=256)
    torch.manual_seed(0)
    A = torch.randn(256, 64).half().to(DEVICE)
    B = (torch.randn(64, 256) * .01).half().to(DEVICE)
    x = (torch.randn(1, 4, 64) * 1e4).half().to(DEVICE)
    r = fk.Routing(sp.encode([{"g": "a"}]), sp)
    ref = fk.reference.flix_delta_reference(x.double().cpu(), A.double().cpu(), B.double().cpu(), r.feature_ids,
                                            sp.rank_offsets, 1 / 256)
    names = ["torch"] + [p.values[0] for p in BACKENDS if not any(m.args[0] for m in p.marks)]
    results = {}
    for name in names:
        out = fk.flix_delta(x, A, B, r, scaling=1 / 256, backend=name)
        assert torch.isfinite(out).all(), f"backend {name}: inf/NaN where the oracle's largest value is {ref.abs().max():.3g}"
        assert_close_relative(out.cpu(), ref, f"backend {name}", rtol=0.01)
        results[name] = out.double().cpu()
    for name, out in results.items():
        torch.testing.assert_close(out, results["torch"], rtol=0.01, atol=0.01 * ref.abs().max().item(),
                                   msg=lambda m: f"{name} vs torch: {m}")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_backends_follow_the_contract(seed, backend, dtype):
    """The same large-activation case through the fused kernels (they hold h in fp32)."""
    gen = torch.Generator().manual_seed(seed)
    scale = {torch.float16: 1e4, torch.bfloat16: 1e37, torch.float32: 1e30}[dtype]
    space, routing, x, A, B = _probe_case(dtype, gen, scale, rank=32, in_f=24, out_f=20, examples=3, tokens=3)
    s = 1e-4 if dtype != torch.float16 else 1 / 256
    W = (torch.randn(20, 24, generator=gen, dtype=torch.float64) * (1.0 / scale)).to(dtype).to(DEVICE)
    got = check_against_oracle(x, A, B, routing, routing.feature_ids, space, s, backend=backend, weight=W, bias=None,
                               magnitude=True)
    assert all(torch.isfinite(g).all() for g in got if g is not None)


def test_compiled_torch_backend_follows_the_contract(seed):
    """The torch backend's traced path (under torch.compile) scales h before rounding too."""
    gen = torch.Generator().manual_seed(seed)
    space, routing, x, A, B = _probe_case(torch.float16, gen, 1e4, examples=3)
    routing.slot_tables(x.device)

    def f(x, A, B):
        return fk.flix_delta(x, A, B, routing, scaling=1 / 256, backend="torch")

    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x, A, B)
    ref = fk.reference.flix_delta_reference(x.double().cpu(), A.double().cpu(), B.double().cpu(), routing.feature_ids,
                                            space.rank_offsets, 1 / 256)
    assert torch.isfinite(out).all()
    assert_close_relative(out.cpu(), ref, "compiled torch backend", rtol=0.01)
