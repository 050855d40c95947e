"""What only the Triton backend has: its dropout-mask kernel, autotuning, the fused base GEMM
choice, the interpreter on CPU, and its errors. The correctness suite it shares with the CUDA
backend is test_kernel_backends.py."""

import pytest
import torch

import flix_kernels as fk
from _kernels import FUSED_TMA_PATHS, _base, _case, _space, forced_paths, keep_mask
from conftest import DEVICE, KERNEL_DTYPES, check_against_oracle
from flix_kernels.backends import BackendUnavailableError, kernel_ops, triton_backend

pytestmark = pytest.mark.skipif(triton_backend.unavailable_reason(DEVICE) is not None,
                                reason=f"triton backend unavailable: {triton_backend.unavailable_reason(DEVICE)}")
launch = triton_backend.launch


def test_dropout_mask_statistics_and_seeding():
    seeds = [kernel_ops.draw_seed(DEVICE, torch.Generator(DEVICE).manual_seed(s)) for s in (1, 2)]
    p = 0.25
    m1, m1_again, m2 = (launch.keep_mask(s, 96, 130, p) for s in (seeds[0], seeds[0], seeds[1]))
    assert torch.equal(m1, m1_again) and not torch.equal(m1, m2)
    n = m1.numel()
    keep = m1.float().mean().item()
    assert abs(keep - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    # Neighbouring rows must not share a pattern (the counter is (k, t), not k alone).
    assert not torch.equal(m1[0], m1[1])


def test_errors(monkeypatch):
    space = _space()
    routing = fk.Routing([[0, 5]], space)
    A = torch.randn(space.total_rank, 4, dtype=torch.float64, device=DEVICE)
    Bm = torch.randn(3, space.total_rank, dtype=torch.float64, device=DEVICE)
    x = torch.randn(1, 2, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64 is not supported by the Triton kernels"):
        fk.flix_delta(x, A, Bm, routing, scaling=1.0, backend="triton")
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendUnavailableError, match="need a CUDA device"):
            fk.flix_delta(x.float(), A.float(), Bm.float(), routing, scaling=1.0, backend="triton")
        assert "triton" not in fk.available_backends("cpu")


def test_autotune_picks_a_config_per_shape_class_and_stays_exact(seed, monkeypatch):
    from flix_kernels.triton import tuning

    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    monkeypatch.setattr(tuning, "_TUNED", {})
    gen = torch.Generator().manual_seed(seed)
    routing, ids, x, A, Bm = _case(gen, _space(), 2, (2, 9), 20, 18, torch.float32)
    W, b = _base(gen, 20, 18, torch.float32)
    with forced_paths("triton", {}):
        check_against_oracle(x, A, Bm, routing, ids, routing.space, 0.5, backend="triton", weight=W, bias=b)
    kinds = {key[0] for key in tuning._TUNED}
    assert kinds == {"shrink", "expand", "weight_grad", "choice"}  # choice: fused base GEMM or cuBLAS + expand
    tuned_once = dict(tuning._TUNED)
    with forced_paths("triton", {}):  # same shape class: no new tuning
        fk.flix_linear(x, W, b, A, Bm, routing, scaling=0.5, backend="triton")
    assert tuning._TUNED == tuned_once


def test_autotuning_leaves_out_a_base_path_that_cannot_launch(seed, monkeypatch):
    """A fused base GEMM that fails to launch (as a tile over the device's shared memory does)
    is left out of the choice with a warning, and the layer runs cuBLAS + expand exactly."""
    import triton

    from flix_kernels.triton import tuning

    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    monkeypatch.setattr(tuning, "_TUNED", {})
    expand = launch.expand

    def expand_without_mode_2(*args, mode, **kwargs):
        if mode == 2:
            raise triton.runtime.errors.OutOfResources(294936, 232448, "shared memory")
        return expand(*args, mode=mode, **kwargs)

    monkeypatch.setattr(launch, "expand", expand_without_mode_2)
    gen = torch.Generator().manual_seed(seed)
    routing, ids, x, A, Bm = _case(gen, _space(), 2, (2, 9), 20, 18, torch.float32)
    W, b = _base(gen, 20, 18, torch.float32)
    with forced_paths("triton", {}), pytest.warns(RuntimeWarning, match="option 'fused' failed and is not used"):
        check_against_oracle(x, A, Bm, routing, ids, routing.space, 0.5, backend="triton", weight=W, bias=b)
    assert {v for k, v in tuning._TUNED.items() if k[0] == "choice"} == {"cublas"}


def test_choose_raises_when_every_option_fails(monkeypatch):
    from flix_kernels.triton import tuning

    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    monkeypatch.setattr(tuning, "_TUNED", {})

    def fails(message):
        def run():
            raise RuntimeError(message)
        return run

    with pytest.raises(RuntimeError, match="first"):
        tuning.choose(("k",), {"a": fails("first"), "b": fails("second")}, torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match="option 'a' failed"):
        assert tuning.choose(("k",), {"a": fails("first"), "b": lambda: None}, torch.device("cpu")) == "b"


TMA_LAYOUTS = {"batched": dict(B=3, shape=(3, 7)), "single_token": dict(B=5, shape=(5,)),
               "packed": dict(B=4, shape=(13,), cu=[0, 4, 4, 11, 13])}


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["", "dropout"])
@pytest.mark.parametrize("layout", list(TMA_LAYOUTS))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_fused_base_gemm_through_tma_matches_oracle(seed, dtype, layout, dropout):
    """The forward ``x W^T + b + update`` and ``dx = dy W + drop'(g A_S)`` by the persistent TMA
    kernel: partial tiles on every edge (40 -> 56 with 16-wide tiles), token tiles straddling
    examples, more tiles than programs; both launches must take the TMA kernel."""
    from flix_kernels import _launch

    gen = torch.Generator().manual_seed(seed)
    spec = TMA_LAYOUTS[layout]
    cu = None if "cu" not in spec else torch.tensor(spec["cu"])
    routing, ids, x, A, Bm = _case(gen, _space(), spec["B"], spec["shape"], 40, 56, dtype, cu=cu)
    W, b = _base(gen, 40, 56, dtype, trainable=layout == "packed")
    T = x.numel() // 40
    kw = {}
    if dropout:
        mask = keep_mask("triton", seed, T, 40, dropout).view(x.shape)
        kw = dict(dropout_p=dropout, generator=torch.Generator(DEVICE).manual_seed(seed), dropout_mask=mask)
    with forced_paths("triton", FUSED_TMA_PATHS, fuse_base=True), _launch.recording(run=True) as rec:
        check_against_oracle(x, A, Bm, routing, ids, routing.space, 0.75, backend="triton", cu=cu, weight=W, bias=b,
                             **kw)
    assert rec.counts[("triton", "fused_linear_tma_kernel")] == 2, dict(rec.counts)
    assert rec.counts[("triton", "expand_kernel")] == 0, dict(rec.counts)


@pytest.mark.parametrize("in_f,out_f", [(37, 56), (40, 29)], ids=["x_rows", "y_rows"])
def test_fused_base_gemm_falls_back_to_pointers_where_tma_cannot_address(seed, in_f, out_f):
    """Rows whose pitch is not a multiple of 16 bytes cannot be TMA boxes: the pointer kernel
    runs instead, with the same result."""
    from flix_kernels import _launch

    gen = torch.Generator().manual_seed(seed)
    routing, ids, x, A, Bm = _case(gen, _space(), 3, (3, 5), in_f, out_f, torch.float32)
    W, b = _base(gen, in_f, out_f, torch.float32)
    with forced_paths("triton", FUSED_TMA_PATHS, fuse_base=True), _launch.recording(run=True) as rec:
        check_against_oracle(x, A, Bm, routing, ids, routing.space, 0.75, backend="triton", weight=W, bias=b)
    assert rec.counts[("triton", "fused_linear_tma_kernel")] == 0, dict(rec.counts)
    assert rec.counts[("triton", "expand_kernel")] == 2, dict(rec.counts)


@pytest.mark.skipif(not launch.interpreting(), reason="the bfloat16 refusal is the interpreter's (a GPU runs bf16)")
def test_interpreter_refuses_bfloat16(seed):
    """Triton's interpreter computes a bfloat16 tl.dot wrongly (triton-lang/triton issue 11584:
    errors of ~1e10, without a word): bf16 is refused, naming why and what to use instead, by the
    backend and by the launch door (for direct launcher users), not computed wrongly."""
    import triton
    import triton.language as tl

    from flix_kernels import _launch

    gen = torch.Generator().manual_seed(seed)
    routing, _, x, A, Bm = _case(gen, _space(), 2, (2, 3), 16, 8, torch.float32)
    W, b = _base(gen, 16, 8, torch.float32)
    where = r"Triton's interpreter \(TRITON_INTERPRET=1\).*issue 11584.*float16 or float32.*CUDA GPU"
    why = "bfloat16 cannot run in " + where
    door = "is a torch.bfloat16 tensor, which cannot run in " + where
    for xd, ad in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        with pytest.raises(TypeError, match=why + r".*; use backend='torch'"):
            fk.flix_delta(x.to(xd), A.to(ad), Bm.to(ad), routing, scaling=1.0, backend="triton")
    with pytest.raises(TypeError, match=why):  # "auto" would pick "torch" on a CPU
        fk.flix_linear(x.bfloat16(), W.bfloat16(), b.bfloat16(), A.bfloat16(), Bm.bfloat16(), routing, scaling=1.0,
                       backend="triton")
    # autocast to bf16 over float32 inputs: the kernels' bf16 operands reach the launch door
    with pytest.raises(TypeError, match="_kernel: argument 0 " + door):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fk.flix_linear(x, W, b, A, Bm, routing, scaling=1.0, backend="triton")
    fk.flix_delta(x.half(), A.half(), Bm.half(), routing, scaling=1.0, backend="triton")  # float16 still runs

    @triton.jit
    def copy_kernel(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, tl.load(X + offs))

    src, dst = torch.arange(8, dtype=torch.float32), torch.zeros(8, dtype=torch.float32)
    _launch.launch_triton(copy_kernel, (1,), src, dst, 8)
    assert torch.equal(dst, src)
    with pytest.raises(TypeError, match="copy_kernel: argument 1 " + door):
        _launch.launch_triton(copy_kernel, (1,), src, dst.bfloat16(), 8)
    with pytest.raises(TypeError, match=r"copy_kernel: 'Y' is a torch.bfloat16 tensor.*backend='torch'"):
        _launch.launch_triton(copy_kernel, (1,), src, Y=dst.bfloat16(), N=8)
    with _launch.recording(run=False) as rec:  # a recording that runs nothing has nothing to refuse
        _launch.launch_triton(copy_kernel, (1,), src.bfloat16(), dst.bfloat16(), 8)
    assert rec.total == 1


@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.6.0", "2.4.1", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.1", False), ("3.10.0", "2.5.0", False)])
def test_interpreter_refused_where_triton_cannot_run_under_numpy(monkeypatch, triton_version, numpy_version, refused):
    """Triton < 3.7's interpreter fails every kernel under NumPy >= 2.4: the backend says so
    (and the interpreter tests skip with that reason) instead of failing inside Triton."""
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    why = launch.interpreter_unavailable_reason()
    assert (why is not None) == refused
    if refused:
        assert "numpy<2.4" in why and triton_version in why
