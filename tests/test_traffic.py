"""The paper traffic model of the Triton launches (flix_kernels/triton/traffic.py): it follows
the launchers (same launches, same weight-gradient path), its floors are the bytes each launch
must touch, and each launch's re-reads stay where the design puts them today, so a change that
re-reads x or dy more fails here, on a CPU, before any GPU time is spent."""

import pytest
import torch

import flix_kernels as fk
from _kernels import forced_paths
from conftest import DEVICE
from flix_kernels import _launch
from flix_kernels.backends import triton_backend

pytestmark = pytest.mark.skipif(triton_backend.launch is None, reason="triton is not importable")

MiB = 2**20
# The suite's headline layer: 8 x 1024 tokens, 4096 -> 4096, bf16, two features of rank 16 per
# example out of 64, 16 of them in the batch.
HEADLINE = dict(examples=8, seq_len=1024, in_features=4096, out_features=4096, active=2, rank=16, present=16,
                num_features=64)
# Tile traffic over the floor of each launch at the headline shape, as designed today (a
# change that re-reads more fails; one that reads less should lower its entry):
EXCESS = {
    "h = x A_S^T (shrink)": 1.44,  # A_S re-read per 64-token tile (L2 serves it on a GPU)
    "y += h B_S^T (expand)": 1.72,  # h re-read per 64-column tile, B_S per token tile
    "g and dB partials (one pass over dy)": 1.15,  # h re-read per column split, B_S per token tile
    "g (split sum)": 1.0,
    "dB (split reduce)": 1.0,
    "dx += g A_S (expand)": 1.72,
    "dA (split partials)": 1.87,  # g re-read per 64-column tile (x once)
    "dA (split reduce)": 1.0,
}


def _traffic():
    from flix_kernels.triton import traffic

    return traffic


def test_floors_are_the_bytes_each_launch_must_touch():
    tr = _traffic()
    b = tr.Batch(**HEADLINE)
    T, K, N, R, rows = 8192, 4096, 4096, 32, 16 * 16
    launches = {launch.name: launch for phase in tr.layer(b).values() for launch in phase}
    shrink = launches["h = x A_S^T (shrink)"]
    splits = (shrink.floor_bytes - T * K * 2 - rows * K * 2) / (T * R * 4)
    assert splits == int(splits) >= 1  # x once, the used rows of A once, the fp32 partials
    assert launches["y += h B_S^T (expand)"].floor_bytes == T * R * 4 + rows * N * 2 + 2 * T * N * 2
    grad = 64 * 16 * N * 2  # every row of dB written, zeros for absent features
    ws = launches["dB (split reduce)"].floor_bytes - grad  # the partials: written once, read once
    assert ws == 8 * 4 * R * N * 4  # 4 token tiles of 256 per example, each with its 32 slot rows
    splits = 8  # 8 examples x 4 token tiles x 8 column splits = 256 programs for 132 SMs
    one = launches["g and dB partials (one pass over dy)"]
    assert one.floor_bytes == T * N * 2 + T * R * 4 + rows * N * 2 + ws + splits * T * R * 4  # dy once
    assert one.flops == 2 * 2.0 * T * N * R  # dy B_S and dy^T h
    assert launches["g (split sum)"].floor_bytes == (splits + 1) * T * R * 4
    assert launches["dA (split partials)"].flops == 2.0 * T * R * K
    backward = sum(launch.floor_bytes for launch in tr.layer(b)["backward"])
    assert 250 * MiB < backward < 400 * MiB  # dy once, dx read and written, x once, adapters: ~80 us at 4.2 TB/s


def test_no_launch_reads_more_than_designed():
    tr = _traffic()
    excess = {launch.name: launch.excess for phase in tr.layer(tr.Batch(**HEADLINE)).values() for launch in phase}
    for name, bound in EXCESS.items():
        assert excess[name] <= bound, f"{name}: tile traffic {excess[name]:.2f}x its floor (designed: {bound}x)"
        assert excess[name] > bound - 0.05, f"{name}: {excess[name]:.2f}x, below {bound}x: lower its EXCESS entry"
    assert all(v >= 1.0 for v in excess.values())


@pytest.mark.parametrize("one_pass", [True, False], ids=["one_pass", "two_passes"])
@pytest.mark.parametrize("active", [1, 2, 4])
def test_the_backward_streams_dy_and_x_once_per_pass(active, one_pass):
    """Whatever the number of features per example, each row of dy and of x is read once by
    each pass that reads it: the weight-gradient split path reads an example's rows for all its
    slots at once, the owner path is taken only where no example has two features, and the
    one-pass path reads dy once for both g and dB (twice without it: g's shrink, then dB)."""
    tr = _traffic()
    b = tr.Batch(**{**HEADLINE, "active": active})
    with forced_paths("triton", {} if one_pass else {"dy_pass": dict(off=True)}):
        backward = tr.layer(b)["backward"]
    for launch in backward:
        if launch.name.startswith(("dB", "dA", "g and dB")) and "reduce" not in launch.name:
            assert launch.streamed_reads == b.tokens * 4096 * 2, launch
    dy_reads = sum(launch.streamed_reads for launch in backward if launch.name.startswith(("g ", "dB")))
    assert dy_reads == (1 if one_pass else 2) * b.tokens * 4096 * 2


@pytest.mark.parametrize("fused", [None, "pointers", "tma"], ids=["cublas+expand", "fused", "fused_tma"])
@pytest.mark.parametrize("seq_len,present", [(64, 4), (512, 8)])
def test_the_model_follows_the_launchers(seq_len, present, fused):
    """Same launches, kernel by kernel, as the Triton backend's forward+backward of that batch
    on this device (launches recorded and skipped, so the shapes can be real), with cuBLAS base
    GEMMs or fused ones (by pointers or through TMA)."""
    tr = _traffic()
    B, rank, K, N = 4, 16, 256, 192
    space = fk.FeatureSpace({"lang": [f"l{i}" for i in range(present // 2)],
                             "task": [f"t{i}" for i in range(present - present // 2)]}, rank)
    ids = torch.tensor([[i % (present // 2), present // 2 + i % (present - present // 2)] for i in range(B)])
    routing = fk.Routing(ids, space).to(DEVICE)
    x = torch.randn(B, seq_len, K, device=DEVICE, requires_grad=True)
    W = torch.randn(N, K, device=DEVICE)
    A = torch.randn(space.total_rank, K, device=DEVICE, requires_grad=True)
    Bm = torch.randn(N, space.total_rank, device=DEVICE, requires_grad=True)
    overrides = {"expand": dict(TMA=fused == "tma")} if fused else {}
    with forced_paths("triton", overrides, fuse_base=bool(fused)), _launch.recording(run=False) as rec:
        y = fk.flix_linear(x, W, None, A, Bm, routing, scaling=0.5, backend="triton")
        torch.autograd.grad(y, [x, A, Bm], torch.ones_like(y))
    got = {k: n for (_, k), n in rec.counts.items()}
    batch = tr.Batch(B, seq_len, K, N, active=2, rank=rank, present=len(set(ids.flatten().tolist())),
                     num_features=space.num_features, dtype=torch.float32, adapter_dtype=torch.float32)
    model = [launch.name for phase in tr.layer(batch, sms=_launch.num_sms(torch.device(DEVICE)),
                                               fused=bool(fused)).values() for launch in phase]
    fused_gemms = sum("(fused GEMM)" in n for n in model)
    assert fused_gemms == (2 if fused else 0)
    want = {"shrink_kernel": sum("(shrink)" in n for n in model),
            "expand_kernel": sum("(expand)" in n for n in model) + (fused_gemms if fused == "pointers" else 0),
            "fused_linear_tma_kernel": fused_gemms if fused == "tma" else 0,
            "rank_grad_kernel": sum("(owner)" in n for n in model),
            "example_outer_kernel": sum("(split partials)" in n for n in model),
            "rank_reduce_kernel": sum("(split reduce)" in n for n in model),
            "dy_pass_kernel": sum("(one pass over dy)" in n for n in model)}
    assert want["dy_pass_kernel"] == (1 if seq_len * B > 64 else 0)
    assert got == {k: v for k, v in want.items() if v}


def test_the_fused_base_gemm_removes_the_read_modify_write_of_y_and_dx():
    """On paper, the fused path moves the base GEMM's bytes plus the update's, less the
    read-modify-write of y (forward) and dx (backward) that an in-place expand costs."""
    tr = _traffic()
    b = tr.Batch(**HEADLINE)
    T, K, N, ex = b.tokens, b.in_features, b.out_features, 2
    unfused, fused = tr.layer(b), tr.layer(b, fused=True)
    for phase, (name, k_in, cols) in {"forward": ("y = x W^T + h B_S^T (fused GEMM)", K, N),
                                      "backward": ("dx = dy W + g A_S (fused GEMM)", N, K)}.items():
        gemm = next(launch for launch in fused[phase] if launch.name == name)
        base = T * k_in * ex + cols * k_in * ex + T * cols * ex  # cuBLAS: both operands once, the output once
        saved = sum(launch.floor_bytes for launch in unfused[phase]) + base \
            - sum(launch.floor_bytes for launch in fused[phase])
        assert saved == 2 * T * cols * ex, phase
        assert gemm.flops == 2.0 * T * k_in * cols + 2.0 * T * cols * b.slots


@pytest.mark.parametrize("fused", [None, "tma"], ids=["cublas+expand", "fused_tma"])
def test_the_per_launch_breakdown_checks_then_times_every_launch(fused):
    """bench's per-launch breakdown on a small batched case: the backend's own launches,
    replayed and timed one by one, matched to the model; a wrong result raises first."""
    from flix_kernels.bench import kernels, suite
    from flix_kernels.bench.cases import Case, make_inputs, make_routing
    from flix_kernels.bench.timing import Timer
    from flix_kernels.bench.variants import Context

    device = torch.device(DEVICE)
    case = Case("headline", 256, 64, 96, 80, rank=8, features=8, active=2)
    space = case.space()
    routing = make_routing(case, space, torch.Generator().manual_seed(0), device)
    s = make_inputs(case, space, torch.float32, device, torch.Generator(device).manual_seed(1), 1)[0]
    want = suite.oracle("flix", Context(case, routing, device, {}), s)
    peaks = {"matmul_tflops": 1.0, "copy_GBps": 10.0}
    with forced_paths("triton", {"expand": dict(TMA=True)} if fused else {}, fuse_base=bool(fused)):
        rows = kernels.rows(case, routing, s, want, 1e-4, torch.float32, device, peaks, Timer(device, 1.0))
    assert [r["pass"] for r in rows].count("forward") == 2 and len(rows) >= 5
    gemms = [r["kernel"] for r in rows if "(fused GEMM)" in r["launch"]]
    assert gemms == (["fused_linear_tma_kernel"] * 2 if fused else [])
    assert all(r["time_ms"] > 0 and r["floor_ms"] > 0 and r["x_floor"] > 0 for r in rows)
    assert "| backward |" in "\n".join(kernels.markdown_lines({"backend": "triton", "case": case.label, "rows": rows}))
    wrong = [want[0] * 1.01, *want[1:]]
    with pytest.raises(AssertionError, match="relative error"):
        kernels.rows(case, routing, s, wrong, 1e-4, torch.float32, device, peaks)



def test_one_pass_over_dy_moves_fewer_bytes_than_two():
    """g and dB from one read of dy against g's shrink then dB's split path, on paper at the
    headline: a quarter fewer floor bytes for those launches (dy once, against fp32 partials of
    g per column split and of dB per 256-token tile) and about half the tile traffic."""
    tr = _traffic()
    b = tr.Batch(**HEADLINE)

    def g_and_dB(backward):
        parts = [launch for launch in backward if launch.name.startswith(("g ", "dB"))]
        return sum(p.floor_bytes for p in parts), sum(p.tile_bytes for p in parts)

    one = g_and_dB(tr.layer(b)["backward"])
    with forced_paths("triton", {"dy_pass": dict(off=True)}):
        two = g_and_dB(tr.layer(b)["backward"])
    assert 0.70 < one[0] / two[0] < 0.80
    assert 0.50 < one[1] / two[1] < 0.60
