"""The fused factorized-embedding op (:mod:`flix_kernels.ofa.kernel`) against a float64 oracle
``F.embedding(ids, P, padding_idx) @ Q``: outputs and both gradients, odd shapes, skewed
repeated ids (the deterministic segment-sum dP), padding_idx, int32/int64 ids, errors."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, KERNEL_DTYPES, LOW_PRECISION, assert_close, assert_close_to_oracle, requires_cuda
from flix_kernels.ofa.kernel import factorized_embedding, tied_logits

TRITON = "triton"


def _oracle(ids, P, Q, padding_idx, dtype, gout):
    """Output and (dP, dQ) of the torch reference in ``dtype`` on CPU."""
    Po = P.detach().cpu().to(dtype).requires_grad_(True)
    Qo = Q.detach().cpu().to(dtype).requires_grad_(True)
    out = F.embedding(ids.cpu().long(), Po, padding_idx) @ Qo
    dP, dQ = torch.autograd.grad(out, (Po, Qo), gout.to(dtype), allow_unused=True)
    return out.detach(), dP, dQ


def _check(ids, V, K, D, dtype, gen, padding_idx=None, backend=TRITON):
    P = torch.randn(V, K, generator=gen, dtype=torch.float64)
    Q = torch.randn(K, D, generator=gen, dtype=torch.float64) / max(K, 1) ** 0.5
    Pm = P.to(DEVICE, dtype).requires_grad_(True)
    Qm = Q.to(DEVICE, dtype).requires_grad_(True)
    out = factorized_embedding(ids.to(DEVICE), Pm, Qm, padding_idx=padding_idx, backend=backend)
    assert out.shape == ids.shape + (D,) and out.dtype == dtype and out.device == Pm.device
    gout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    dP, dQ = torch.autograd.grad(out, (Pm, Qm), gout.to(DEVICE, dtype))
    assert dP.dtype == dtype and dQ.dtype == dtype
    want = _oracle(ids, P, Q, padding_idx, torch.float64, gout)
    got = (out, dP, dQ)
    if dtype in LOW_PRECISION:
        same = _oracle(ids, P, Q, padding_idx, dtype, gout)
        for name, g, w, s in zip(("out", "dP", "dQ"), got, want, same):
            assert_close_to_oracle(g.detach().cpu(), w, s, name)
    else:
        for name, g, w in zip(("out", "dP", "dQ"), got, want):
            assert_close(g.detach().cpu(), w, dtype, scale=4)
    return got


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape,V,K,D", [
    ((37,), 23, 7, 45),        # k and D not multiples of any tile, T with a tail
    ((3, 5), 9, 1, 1),         # k = 1, D = 1, 2-D ids
    ((2, 17), 50, 40, 33),     # k > one BLOCK_K chunk in the interpreter (loop over k)
    ((0,), 5, 4, 6),           # empty ids
    ((2, 0, 3), 5, 4, 6),      # empty ids of rank 3
])
def test_matches_oracle(seed, dtype, shape, V, K, D):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, shape, generator=gen)
    _check(ids, V, K, D, dtype, gen)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64, torch.int16, torch.uint8])
@pytest.mark.parametrize("backend", [TRITON, "torch"])
def test_ids_dtypes(seed, ids_dtype, backend):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 13, (4, 6), generator=gen).to(ids_dtype)
    _check(ids, 13, 5, 9, torch.float32, gen, backend=backend)


@pytest.mark.parametrize("padding_idx", [0, 3, -1])
def test_padding_idx_and_skewed_ids(seed, padding_idx):
    """Most tokens share one id (a long segment in the dP sum), the padding row appears too and
    gets zero gradient, unreferenced rows get zero gradient."""
    gen = torch.Generator().manual_seed(seed)
    V, T = 12, 70
    ids = torch.full((T,), 5)
    other = torch.rand(T, generator=gen) < 0.3
    ids[other] = torch.randint(0, V - 2, (int(other.sum()),), generator=gen)  # rows V-2, V-1 unused
    ids[::7] = padding_idx % V
    if padding_idx == -1:
        ids[::7] = 0  # -1 means row V-1; keep V-2 unused
        ids[3] = V - 1
    _, dP, _ = _check(ids.view(7, 10), V, 6, 20, torch.float32, gen, padding_idx=padding_idx)
    pad = padding_idx % V
    assert torch.all(dP[pad] == 0)
    assert torch.all(dP[V - 2] == 0)


def test_dP_bit_identical_across_runs(seed):
    gen = torch.Generator().manual_seed(seed)
    V, K, D, T = 7, 9, 24, 90
    ids = torch.where(torch.rand(T, generator=gen) < 0.8, 2, torch.randint(0, V, (T,), generator=gen)).to(DEVICE)
    P = torch.randn(V, K, generator=gen).to(DEVICE).requires_grad_(True)
    Q = torch.randn(K, D, generator=gen).to(DEVICE).requires_grad_(True)
    gout = torch.randn(T, D, generator=gen).to(DEVICE)
    runs = [torch.autograd.grad(factorized_embedding(ids, P, Q, backend=TRITON), (P, Q), gout) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_auto_and_torch_backend(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 8, (3, 4), generator=gen)
    _check(ids, 8, 3, 5, torch.float32, gen, backend="auto")
    # float64 works with the torch backend (and "auto" on CPU picks it)
    _check(ids, 8, 3, 5, torch.float64, gen, padding_idx=1, backend="torch")


def test_only_one_gradient_needed(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 6, (10,), generator=gen).to(DEVICE)
    P = torch.randn(6, 4, generator=gen).to(DEVICE)
    Q = torch.randn(4, 8, generator=gen).to(DEVICE).requires_grad_(True)
    out = factorized_embedding(ids, P, Q, backend=TRITON)
    (dQ,) = torch.autograd.grad(out.sum(), (Q,))
    assert_close(dQ.cpu(), (F.embedding(ids.cpu(), P.double().cpu()).sum(0)[:, None]).expand(4, 8), torch.float32)


def test_errors():
    P, Q = torch.randn(5, 3, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    t = lambda v: torch.tensor(v, device=DEVICE)  # noqa: E731
    with pytest.raises(IndexError, match=r"ids\[1, 2\] = 5 .*5 rows"):
        factorized_embedding(t([[0, 1, 2], [3, 4, 5]]), P, Q, backend=TRITON)
    with pytest.raises(IndexError, match=r"ids\[0\] = -1"):
        factorized_embedding(t([-1, 0]), P, Q, backend="torch")
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(4, 4\)"):
        factorized_embedding(t([0]), P, torch.randn(4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="2-D"):
        factorized_embedding(t([0]), P[0], Q)
    with pytest.raises(TypeError, match="integer"):
        factorized_embedding(t([0.0]), P, Q)
    with pytest.raises(TypeError, match="same dtype"):
        factorized_embedding(t([0]), P, Q.half())
    with pytest.raises(TypeError, match="not supported"):
        factorized_embedding(t([0]), P.int(), Q.int())
    with pytest.raises(TypeError, match="backend='torch'"):
        factorized_embedding(t([0]), P.double(), Q.double(), backend=TRITON)
    with pytest.raises(ValueError, match="padding_idx 5"):
        factorized_embedding(t([0]), P, Q, padding_idx=5)
    with pytest.raises(ValueError, match="unknown backend"):
        factorized_embedding(t([0]), P, Q, backend="cuda")


def test_tied_logits(seed):
    gen = torch.Generator().manual_seed(seed)
    P = torch.randn(11, 4, generator=gen, dtype=torch.float64)
    Q = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    h = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(11, generator=gen, dtype=torch.float64)
    assert_close(tied_logits(h.float(), P.float(), Q.float(), b.float()), h @ (P @ Q).t() + b, torch.float32)
    assert tied_logits(h, P, Q).shape == (2, 3, 11)
    with pytest.raises(ValueError, match="last dimension"):
        tied_logits(h[..., :5], P, Q)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager_without_recompiling(seed, compiler):
    """The Triton path is a custom op under torch.compile: one graph, reused for new ids of the
    same shape, equal to eager in output and both gradients."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(seed)
    V, K, D = 19, 6, 24
    P = torch.randn(V, K, generator=gen).to(DEVICE).requires_grad_(True)
    Q = torch.randn(K, D, generator=gen).to(DEVICE).requires_grad_(True)

    def f(ids, P, Q):
        return torch.tanh(factorized_embedding(ids, P, Q, padding_idx=2, backend=TRITON))

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    for step in range(2):
        ids = torch.randint(0, V, (3, 7), generator=gen).to(DEVICE)
        gout = torch.randn(3, 7, D, generator=gen).to(DEVICE)
        ctx = torch._dynamo.config.patch(error_on_recompile=True) if step else contextlib.nullcontext()
        with ctx:
            got = compiled(ids, P, Q)
        got_grads = torch.autograd.grad(got, (P, Q), gout)
        want = f(ids, P, Q)
        want_grads = torch.autograd.grad(want, (P, Q), gout)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("skipped_by", ["compile", "check_ids=False"])
def test_out_of_range_ids_when_host_check_is_skipped(seed, skipped_by):
    """Compiled or with check_ids=False, the ids are not read on the host: a bad id gets a NaN
    row and no gradient, the other tokens are exact, nothing is read or written out of bounds."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(seed)
    V, K, D = 9, 5, 12
    ids = torch.randint(0, V, (11,), generator=gen)
    ids[[2, 7]] = torch.tensor([V, -3])
    P = torch.randn(V, K, generator=gen, dtype=torch.float64)
    Q = torch.randn(K, D, generator=gen, dtype=torch.float64)
    Pm, Qm = P.float().to(DEVICE).requires_grad_(True), Q.float().to(DEVICE).requires_grad_(True)
    if skipped_by == "compile":
        fn = torch.compile(lambda i, a, b: factorized_embedding(i, a, b, backend=TRITON), fullgraph=True,
                           backend="aot_eager")
    else:
        fn = lambda i, a, b: factorized_embedding(i, a, b, backend=TRITON, check_ids=False)  # noqa: E731
    out = fn(ids.to(DEVICE), Pm, Qm)
    good = torch.ones(11, dtype=torch.bool)
    good[[2, 7]] = False
    assert torch.isnan(out[~good.to(DEVICE)]).all()
    gout = torch.randn(11, D, generator=gen, dtype=torch.float64)
    gout_m = torch.where(good[:, None], gout, 0.0)  # the bad tokens' gradient must not matter
    dP, dQ = torch.autograd.grad(out, (Pm, Qm), gout.float().to(DEVICE))
    want, wdP, wdQ = _oracle(ids[good], P, Q, None, torch.float64, gout_m[good])
    assert_close(out[good.to(DEVICE)].detach().cpu(), want, torch.float32)
    assert_close(dP.cpu(), wdP, torch.float32, scale=4)
    assert_close(dQ.cpu(), wdQ, torch.float32, scale=4)


@requires_cuda
def test_cuda_graph_capture_of_forward_and_backward(seed):
    gen = torch.Generator().manual_seed(seed)
    V, K, D = 1000, 64, 256
    P = torch.randn(V, K, generator=gen).cuda().to(torch.bfloat16).requires_grad_(True)
    Q = (torch.randn(K, D, generator=gen) / 8).cuda().to(torch.bfloat16).requires_grad_(True)
    static_ids = torch.randint(0, V, (4, 128), generator=gen).cuda()
    static_gout = torch.randn(4, 128, D, generator=gen).cuda().to(torch.bfloat16)

    def step():
        out = factorized_embedding(static_ids, P, Q, padding_idx=0, backend=TRITON)
        return (out, *torch.autograd.grad(out, (P, Q), static_gout))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up: compile the kernels
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    new_ids = torch.randint(0, V, (4, 128), generator=gen).cuda()
    new_ids[:, ::2] = 5  # a long run in the sorted ids
    static_ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(static, eager):
        assert torch.equal(a, b)  # same kernels, deterministic: bit-identical


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_large(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    V, K, D = 50_000, 100, 768
    ids = torch.randint(0, V, (8, 512), generator=gen)
    ids[:, ::3] = 7  # a long segment
    _check(ids.to(torch.int32), V, K, D, dtype, gen, padding_idx=0)


def test_benchmark_script_checks_before_timing(tmp_path):
    """benchmarks/bench_ofa.py runs end to end (smoke shapes) and its float64 check rejects a
    wrong variant instead of timing it."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ofa.py"
    spec = importlib.util.spec_from_file_location("bench_ofa", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    record = bench.main(["--smoke", "--out", str(tmp_path)])
    variants = {(r["problem"], r["variant"]) for r in record["rows"]}
    assert {("lookup", v) for v in bench.LOOKUP_VARIANTS} <= variants
    assert (tmp_path / "ofa.json").exists() and "| triton |" in (tmp_path / "ofa.md").read_text()
    ids = torch.tensor([1, 2, 2])
    P, Q = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    gout = torch.randn(3, 5, dtype=torch.float64)
    off_by_one = lambda P, Q: factorized_embedding((ids + 1) % 4, P, Q, backend="torch")  # noqa: E731
    right = lambda P, Q: factorized_embedding(ids, P, Q, backend="torch")  # noqa: E731
    with pytest.raises(AssertionError, match="wrong result"):
        bench.check(off_by_one, right, (P.float(), Q.float()), (P, Q), gout, torch.float32)


def test_launches_go_through_the_one_door(seed):
    """OFA's kernels launch through flix_kernels._launch like FLix's: the recorder counts each of
    them (forward: the gather matmul; backward: dQ's outer product, g, dP's segment sums)."""
    from flix_kernels import _launch

    gen = torch.Generator().manual_seed(seed)
    with _launch.recording(run=True) as rec:
        _check(torch.randint(0, 11, (3, 5), generator=gen), 11, 6, 7, torch.float32, gen)
    assert rec.counts == {("triton", "gather_matmul_kernel"): 2, ("triton", "gathered_outer_kernel"): 1,
                          ("triton", "segment_sum_kernel"): 1}, dict(rec.counts)
