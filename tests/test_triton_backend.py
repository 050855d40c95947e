"""What only the Triton backend has: its dropout-mask kernel, autotuning, the fused base GEMM
choice, the interpreter on CPU, and its errors. The correctness suite it shares with the CUDA
backend is test_kernel_backends.py."""

import pytest
import torch

import flix_kernels as fk
from _kernels import _base, _case, _space, forced_paths
from conftest import DEVICE, check_against_oracle
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
    assert kinds == {"shrink", "expand", "rank_outer", "choice"}  # choice: fused base GEMM or cuBLAS + expand
    tuned_once = dict(tuning._TUNED)
    with forced_paths("triton", {}):  # same shape class: no new tuning
        fk.flix_linear(x, W, b, A, Bm, routing, scaling=0.5, backend="triton")
    assert tuning._TUNED == tuned_once
