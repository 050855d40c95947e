"""The CUDA backend beyond the shared oracle suite (test_kernel_backends.py).

On any machine: the extension is built from this checkout when nvcc is present and imports;
the build switches (FLIX_CUDA, FLIX_CUDA_ARCHS) behave; without a GPU every call raises a clear
error instead of crashing; the launchers' validation names what is wrong; the dropout bits
equal the Triton backend's. On a GPU: agreement of cuda, triton and the float64 oracle on
random shapes, decode shapes with the default launch plans, and determinism.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flix_kernels as fk
from _kernels import _base, _case, _space
from conftest import DEVICE, check_against_oracle, oracle, random_feature_ids
from flix_kernels import backends
from flix_kernels import cuda as bridge
from flix_kernels.cuda import launch as cuda_launch
from flix_kernels.backends import BackendUnavailableError, get_backend, torch_backend, triton_backend

ROOT = Path(__file__).resolve().parent.parent
HAS_GPU = torch.cuda.is_available()
CUDA_OK = backends.unavailable_reason("cuda", DEVICE) is None
requires_cuda_backend = pytest.mark.skipif(not CUDA_OK, reason=f"cuda backend: {backends.unavailable_reason('cuda', DEVICE)}")
requires_extension = pytest.mark.skipif(bridge._C is None, reason=f"{bridge.extension_error()}")


def _setup_module():
    spec = importlib.util.spec_from_file_location("flix_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs under __main__
    return module


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
def test_extension_is_built_and_imports_when_nvcc_is_present():
    setup = _setup_module()
    status = bridge.build_status()
    requested = status.get("requested", os.environ.get("FLIX_CUDA") or "auto")
    if requested == "0" or setup.find_nvcc() is None:
        pytest.skip("no nvcc here (or FLIX_CUDA=0): the package installs without the extension")
    if requested == "auto" and not setup.gpu_driver_present():
        assert status.get("cuda_extension") == "skipped" and "no NVIDIA GPU driver" in status.get("reason", "")
        pytest.skip("no GPU driver and FLIX_CUDA unset at install time: the extension is skipped by default")
    assert bridge._C is not None, bridge.extension_error()
    info = bridge.build_info()
    recorded = bridge.build_status().get("archs")  # what setup.py was asked for (default or FLIX_CUDA_ARCHS)
    assert info["archs"].split(",") == (recorded.split(";") if recorded else ["80-real", "89-real", "90"])
    assert info["cuda_runtime"] >= 11080 and info["cudart"] == "static"
    assert bridge.build_status().get("cuda_extension") in (None, "built")
    assert fk.info()["cuda_extension"]["loaded"]


def test_build_switches(tmp_path):
    setup = _setup_module()
    fake_nvcc = tmp_path / "nvcc"
    fake_nvcc.write_text("#!/bin/sh\n")
    fake_nvcc.chmod(0o755)
    none = dict(which=lambda _: None, standard=(), has_driver=lambda: True)
    # FLIX_CUDA=1 without nvcc: a clear failure, naming where it looked and what to do.
    with pytest.raises(SystemExit, match="FLIX_CUDA=1 asks for the CUDA extension, but no nvcc was found"):
        setup.cuda_build_plan({"FLIX_CUDA": "1"}, **none)
    # Unset without nvcc: the pure-Python package, with the reason recorded.
    assert setup.cuda_build_plan({}, **none) == (False, "not built: no nvcc was found at install time (install the "
                                                        "CUDA toolkit and reinstall)", None)
    assert setup.cuda_build_plan({"FLIX_CUDA": "0", "CUDACXX": str(fake_nvcc)}, **none)[0] is False
    assert setup.cuda_build_plan({"CUDACXX": str(fake_nvcc)}, **none) == (True, "", str(fake_nvcc))
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    home_nvcc = home / "bin" / "nvcc"
    home_nvcc.write_text("#!/bin/sh\n")
    home_nvcc.chmod(0o755)
    assert setup.cuda_build_plan({"CUDA_HOME": str(home), "FLIX_CUDA": "1"}, **none) == (True, "", str(home_nvcc))
    # No GPU driver: skipped by default (a CPU-only install takes seconds), built when FLIX_CUDA=1 asks.
    no_driver = dict(none, has_driver=lambda: False)
    build, reason, _ = setup.cuda_build_plan({"CUDACXX": str(fake_nvcc)}, **no_driver)
    assert not build and "no NVIDIA GPU driver" in reason and "FLIX_CUDA=1" in reason
    assert setup.cuda_build_plan({"CUDACXX": str(fake_nvcc), "FLIX_CUDA": "1"}, **no_driver) == (True, "", str(fake_nvcc))
    with pytest.raises(SystemExit, match="FLIX_CUDA must be 0, 1 or unset"):
        setup.cuda_build_plan({"FLIX_CUDA": "yes"}, **none)
    assert setup.cuda_archs({}) == "80-real;89-real;90"
    assert setup.cuda_archs({"FLIX_CUDA_ARCHS": "80, 90a"}) == "80;90a"


def test_missing_extension_reports_the_recorded_reason(tmp_path, monkeypatch):
    status = tmp_path / "_build.json"
    status.write_text('{"cuda_extension": "skipped", "reason": "not built: disabled at install time (FLIX_CUDA=0)"}')
    monkeypatch.setattr(bridge, "_C", None)
    monkeypatch.setattr(bridge, "_BUILD_FILE", status)
    assert bridge.extension_error() == "the CUDA extension flix_kernels._C was not built: disabled at install time (FLIX_CUDA=0)"
    assert bridge.unavailable_reason("cuda") == bridge.extension_error()
    status.unlink()  # installed some other way: the import error and how to see the build
    assert "not importable" in bridge.extension_error() and "FLIX_CUDA=1" in bridge.extension_error()


# ---------------------------------------------------------------------------------------------
# Without a GPU: clear errors, never a crash
# ---------------------------------------------------------------------------------------------
@requires_extension
@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour on machines without a GPU")
def test_raw_calls_without_a_gpu_raise_naming_the_kernel():
    C = bridge._C
    routing = (1, 1, 0, 2, 4, 3)  # non-null dummy pointers: the device check must come first
    dropout = (0, 0.0)
    calls = {
        "shrink": lambda: C.shrink(x=(1, 6, 8, 8, 1, 0), factor=(1, 16, 8, 8, 1, 0), h=1, workspace=0, counters=0,
                                   splits=1, routing=routing, scales=(0, 0, 1.0), dropout=dropout, tile=0, device=0, stream=0),
        "expand": lambda: C.expand(h=(1, 6, 4, 4, 1, 0), factor=(1, 16, 5, 5, 1, 0), y=(1, 6, 5, 5, 1, 0),
                                   accumulate=True, routing=routing, dropout=dropout, tile=0, device=0, stream=0),
        "weight_grad": lambda: C.weight_grad(l=(1, 6, 4, 4, 1, 0), r=(1, 6, 5, 5, 1, 0), g=(1, 16, 5, 5, 1, 0),
                                             routing=routing, pairs=(1, 1, 1, 1, 8, 5), workspace=0, chunks=0, chunk=0,
                                             dropout=dropout, tile=0, device=0, stream=0),
        "decode_linear": lambda: C.decode_linear(
            C.DecodePlan(routing, 6, 8, 5, 16, 0, 0, 1, 1, 0), x=16, sx=8, w=16, sw=8, bias=0, a=16, sar=8, sak=1,
            m=16, smr=1, smn=5, y=16, h=16, shrink_workspace=0, workspace=0, counters=0, scales=(0, 0, 1.0),
            dropout=dropout, stream=0),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"flix_kernels\._C\.{name}: CUDA error"):
            call()
    count, why = C.device_count()
    assert count == 0 and why


@requires_extension
def test_raw_calls_reject_bad_arguments_before_touching_the_device():
    C = bridge._C
    with pytest.raises(ValueError, match="dtype code"):
        C.shrink(x=(1, 6, 8, 8, 1, 7), factor=(1, 16, 8, 8, 1, 0), h=1, workspace=0, counters=0, splits=1, routing=(1, 1, 0, 2, 4, 3),
                 scales=(0, 0, 1.0), dropout=(0, 0.0), tile=0, device=0, stream=0)
    with pytest.raises(ValueError, match="splits must be >= 1"):
        C.shrink(x=(1, 6, 8, 8, 1, 0), factor=(1, 16, 8, 8, 1, 0), h=1, workspace=0, counters=0, splits=0,
                 routing=(1, 1, 0, 2, 4, 3), scales=(0, 0, 1.0), dropout=(0, 0.0), tile=0, device=0, stream=0)
    with pytest.raises(ValueError, match="as many columns as x"):
        C.shrink(x=(1, 6, 8, 8, 1, 0), factor=(1, 16, 9, 9, 1, 0), h=1, workspace=0, counters=0, splits=1,
                 routing=(1, 1, 0, 2, 4, 3), scales=(0, 0, 1.0), dropout=(0, 0.0), tile=0, device=0, stream=0)
    with pytest.raises(ValueError, match="unsupported dtype pair"):
        C.expand(h=(1, 6, 4, 4, 1, 0), factor=(1, 16, 5, 5, 1, 2), y=(1, 6, 5, 5, 1, 0), accumulate=True,
                 routing=(1, 1, 0, 2, 4, 3), dropout=(0, 0.0), tile=0, device=0, stream=0)
    with pytest.raises(ValueError, match="tile must be"):
        C.expand(h=(1, 6, 4, 4, 1, 0), factor=(1, 16, 5, 5, 1, 0), y=(1, 6, 5, 5, 1, 0), accumulate=True,
                 routing=(1, 1, 0, 2, 4, 3), dropout=(0, 0.0), tile=3, device=0, stream=0)
    with pytest.raises(ValueError, match="dropout p must be in"):
        C.weight_grad(l=(1, 6, 4, 4, 1, 0), r=(1, 6, 5, 5, 1, 0), g=(1, 16, 5, 5, 1, 0), routing=(1, 1, 0, 2, 4, 3),
                      pairs=(1, 1, 1, 1, 8, 5), workspace=0, chunks=0, chunk=0, dropout=(1, 1.5), tile=0, device=0,
                      stream=0)
    with pytest.raises(ValueError, match="split path needs chunk > 0 and a workspace"):
        C.weight_grad(l=(1, 6, 4, 4, 1, 0), r=(1, 6, 5, 5, 1, 0), g=(1, 16, 5, 5, 1, 0), routing=(1, 1, 0, 2, 4, 3),
                      pairs=(1, 1, 1, 1, 8, 5), workspace=0, chunks=2, chunk=0, dropout=(0, 0.0), tile=0, device=0,
                      stream=0)


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour on machines without a GPU")
def test_backend_is_unavailable_without_a_gpu_and_says_why():
    assert "cuda" not in fk.available_backends()
    reason = backends.unavailable_reason("cuda", "cpu")
    # Without the extension the reason is why it was not built; with it, that there is no device.
    assert ("CUDA device" in reason) if bridge._C is not None else ("not built" in reason or "not importable" in reason)
    space = _space()
    routing = fk.Routing([[0, 5]], space)
    x = torch.randn(1, 2, 4)
    A, Bm = torch.randn(space.total_rank, 4), torch.randn(3, space.total_rank)
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable: .*(CUDA|FLIX_CUDA)"):
        fk.flix_delta(x, A, Bm, routing, scaling=1.0, backend="cuda")
    assert fk.info()["backends"]["cuda"] == reason


# ---------------------------------------------------------------------------------------------
# The launchers' validation (runs on CPU tensors: the device check comes last)
# ---------------------------------------------------------------------------------------------
def _shrink_args(**change):
    args = dict(X=torch.randn(6, 8), M=torch.randn(16, 8), stride_mr=8, stride_mk=1,
                slot_rank=torch.zeros(2, 4, dtype=torch.int32), slot_feature=torch.zeros(2, 4, dtype=torch.int32),
                cu=None, scaling=None, scale=1.0, seed=None, p_drop=0.0, seq_len=3, compute_dtype=torch.float32)
    args.update(change)
    return args


def _expand_args(**change):
    args = dict(H=torch.randn(6, 4), M=torch.randn(16, 5), stride_mr=5, stride_mn=1, Y=torch.randn(6, 5),
                slot_rank=torch.zeros(2, 4, dtype=torch.int32), slot_feature=torch.zeros(2, 4, dtype=torch.int32),
                cu=None, seq_len=3, compute_dtype=torch.float32, mode=1)
    args.update(change)
    return args


SHRINK_ERRORS = {
    "x_not_2d": (dict(X=torch.randn(6, 8, 1)), ValueError, "X must be 2-D"),
    "x_float64": (dict(X=torch.randn(6, 8, dtype=torch.float64)), TypeError, "X has dtype torch.float64"),
    "factor_dtype": (dict(M=torch.randn(16, 8, dtype=torch.float16)), TypeError, "M has dtype torch.float16"),
    "unsupported_pair": (dict(M=torch.randn(16, 8, dtype=torch.bfloat16), compute_dtype=torch.bfloat16,
                              X=torch.randn(6, 8, dtype=torch.float16)), TypeError, "is not supported"),
    "slot_table_int64": (dict(slot_rank=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "slot_rank has dtype"),
    "slot_tables_differ": (dict(slot_feature=torch.zeros(2, 5, dtype=torch.int32)), ValueError, "differ"),
    "batched_mismatch": (dict(seq_len=4), ValueError, "does not cover T = 6 tokens"),
    "cu_length": (dict(cu=torch.tensor([0, 6], dtype=torch.int32)), ValueError, "B \\+ 1 = 3 entries"),
    "seed_two_values": (dict(seed=torch.zeros(2, dtype=torch.int64), p_drop=0.1), ValueError, "seed must hold one"),
    "dropout_p": (dict(seed=torch.zeros(1, dtype=torch.int64), p_drop=1.0), ValueError, "dropout p must be in"),
    "scaling_2d": (dict(scaling=torch.ones(2, 2)), ValueError, "scaling must be 1-D"),
    "cpu_tensors": ({}, ValueError, "need CUDA tensors, got tensors on cpu"),
}


@requires_extension
@pytest.mark.parametrize("case", list(SHRINK_ERRORS))
def test_shrink_validation_names_what_is_wrong(case):
    change, exc, match = SHRINK_ERRORS[case]
    if case == "cpu_tensors" and HAS_GPU:
        pytest.skip("CPU tensors are only the last error on a machine without a GPU")
    with pytest.raises(exc, match=match):
        cuda_launch.shrink(**_shrink_args(**change))


EXPAND_ERRORS = {
    "overlapping_output": (dict(Y=torch.randn(6, 1).expand(6, 5)), ValueError, "output Y has overlapping elements"),
    "h_float16": (dict(H=torch.randn(6, 4, dtype=torch.float16)), TypeError, "H has dtype torch.float16"),
    "h_shape": (dict(H=torch.randn(6, 3)), ValueError, r"H must be \(T=6, R_slots=4\)"),
    "h_strided": (dict(H=torch.randn(6, 8)[:, ::2]), ValueError, "unit column stride"),
    "fused_base": (dict(mode=2), NotImplementedError, "only in the Triton backend"),
}


@requires_extension
@pytest.mark.parametrize("case", list(EXPAND_ERRORS))
def test_expand_validation_names_what_is_wrong(case):
    change, exc, match = EXPAND_ERRORS[case]
    with pytest.raises(exc, match=match):
        cuda_launch.expand(**_expand_args(**change))


@requires_extension
def test_weight_grad_validation_names_what_is_wrong():
    space = _space()
    routing = fk.Routing([[0, 5], [1, -1]], space)
    meta = routing.kernel_metadata(torch.device("cpu"))
    L, R = torch.randn(6, routing.max_active_rank), torch.randn(6, 5)
    G = torch.empty(space.total_rank, 5)
    launch = cuda_launch
    with pytest.raises(ValueError, match=r"G must hold \(R_total=34\) x \(N=5\) elements"):
        launch.weight_grad(L, R, torch.empty(3, 5), 5, 1, meta, 3, 3, torch.float32)
    with pytest.raises(ValueError, match="L must be"):
        launch.weight_grad(L[:, :-1], R, G, 5, 1, meta, 3, 3, torch.float32)
    with pytest.raises(TypeError, match="G has dtype torch.float16"):
        launch.weight_grad(L, R, G.half(), 5, 1, meta, 3, 3, torch.float32)
    if not HAS_GPU:
        with pytest.raises(ValueError, match="need CUDA tensors"):
            launch.weight_grad(L, R, G, 5, 1, meta, 3, 3, torch.float32)


# ---------------------------------------------------------------------------------------------
# Launch plans (pure functions of shapes: checked here for every shape hypothesis draws)
# ---------------------------------------------------------------------------------------------
@requires_extension
@settings(max_examples=300, deadline=None)
@given(T=st.integers(0, 1 << 20), N=st.integers(1, 1 << 17), B=st.integers(1, 4096), Rs=st.integers(1, 700),
       present=st.integers(1, 5000), max_pair_rank=st.integers(1, 256), max_len=st.integers(1, 1 << 17),
       sms=st.sampled_from([1, 108, 132]))
def test_weight_gradient_plan_covers_every_token_within_limits(T, N, B, Rs, present, max_pair_rank, max_len, sms):
    launch = cuda_launch
    P = B  # at least one pair per example here; the plan only asks whether there are any
    tile, chunks, chunk = launch.grad_plan(T, N, B, Rs, P, present, max_pair_rank, max_len, sms)
    assert tile in (0, 1)
    if chunks == 0:  # owner path: no workspace
        assert chunk == 0
        return
    rows = 16 if tile == 0 else 64
    assert chunk >= 1 and chunks * chunk >= max_len and (chunks - 1) * chunk < max_len  # no empty chunk column
    assert chunks <= 65535 and (-(-N // 128)) * (-(-Rs // rows)) <= 65535
    assert B * chunks * Rs * N * 4 <= launch.WORKSPACE_BYTES
    assert tile == (0 if Rs <= 16 else 1)  # a split block covers all of its example's slots


@requires_extension
def test_weight_gradient_plan_prefers_the_owner_path_when_it_fills_the_gpu():
    launch = cuda_launch
    assert launch.grad_plan(8192, 4096, 8, 32, 16, 64, 16, 1024, 132)[1] == 0  # 64 features x 32 column tiles
    tile, chunks, chunk = launch.grad_plan(8192, 512, 8, 32, 16, 2, 16, 1024, 132)  # 2 features x 4 tiles: split
    assert chunks > 1 and tile == 1
    assert launch.grad_plan(0, 512, 8, 32, 0, 0, 16, 1, 132)[1] == 0  # nothing to split


@requires_extension
@settings(max_examples=200, deadline=None)
@given(T=st.integers(1, 1 << 20), K=st.integers(1, 1 << 16), R=st.integers(1, 700), sms=st.sampled_from([1, 132]))
def test_shrink_plan_splits_k_only_for_few_blocks(T, K, R, sms):
    tile, splits = cuda_launch.shrink_plan(T, K, R, sms)
    assert tile == (0 if T <= 64 else 1)
    rows, k_step = (16, 64) if tile == 0 else (64, 32)
    assert 1 <= splits <= max(1, -(-K // k_step))
    if (-(-T // rows)) * (-(-R // 64)) >= 2 * sms:
        assert splits == 1


# ---------------------------------------------------------------------------------------------
# Dropout bits, auto selection
# ---------------------------------------------------------------------------------------------
@requires_extension
@pytest.mark.skipif(triton_backend.unavailable_reason(DEVICE) is not None, reason="needs the Triton backend to compare")
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_mask_equals_the_triton_backends(p, seed):
    """Both backends drop the same elements for the same seed (the CUDA bits computed on the host
    by the extension's own Philox code, so this runs without a GPU)."""
    seed_t = torch.tensor([seed % (2**31 - 1)], dtype=torch.int64, device=DEVICE)
    want = triton_backend.launch.keep_mask(seed_t, 37, 130, p).cpu()
    got = cuda_launch.keep_mask(int(seed_t), 37, 130, p)
    assert torch.equal(got, want)
    assert abs(got.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / got.numel()) ** 0.5


def test_auto_selection_follows_the_table(monkeypatch):
    x = torch.randn(2, 4)
    assert get_backend("auto", torch.device("cpu"), x, x) is torch_backend
    if not HAS_GPU:
        return
    decode, prefill = torch.randn(8, 64, device="cuda"), torch.randn(2, 100, 64, device="cuda")
    assert backends.shape_class(decode) == "decode" and backends.shape_class(prefill) == "prefill"
    for cls, x_cls in (("decode", decode), ("prefill", prefill)):
        for first in ("cuda", "triton"):
            if backends.unavailable_reason(first, "cuda") is None:
                monkeypatch.setitem(backends.AUTO_TABLE, cls, (first, "torch"))
                assert get_backend("auto", x_cls.device, x_cls, x_cls).__name__.endswith(f"{first}_backend")
    assert get_backend("auto", decode.device, decode.double(), decode.double()) is torch_backend


# ---------------------------------------------------------------------------------------------
# GPU: cross-backend agreement, decode plans, determinism
# ---------------------------------------------------------------------------------------------
CROSS = {  # (B, token shape, in, out, dtype, packed cu)
    "decode_bf16": (8, (8,), 256, 192, torch.bfloat16, None),
    "decode_fp16_T64": (16, (16, 4), 130, 70, torch.float16, None),
    "prefill_bf16_odd": (3, (3, 157), 200, 136, torch.bfloat16, None),
    "packed_fp32": (4, (301,), 96, 80, torch.float32, [0, 100, 100, 250, 301]),
}


@requires_cuda_backend
@pytest.mark.skipif(triton_backend.unavailable_reason(DEVICE) is not None, reason="needs the Triton backend to compare")
@pytest.mark.parametrize("case", list(CROSS))
def test_cuda_agrees_with_triton_and_the_oracle(seed, case):
    """Default launch plans. Each backend passes the oracle check; cuda and triton then differ
    by no more than each differs from the float64 oracle (they round in different orders)."""
    B, shape, in_f, out_f, dtype, cu = CROSS[case]
    cu = None if cu is None else torch.tensor(cu)
    gen = torch.Generator().manual_seed(seed)
    routing, ids, x, A, Bm = _case(gen, _space(), B, shape, in_f, out_f, dtype, cu=cu, p_absent=0.2)
    W, b = _base(gen, in_f, out_f, dtype)
    gy = torch.randn(*shape, out_f, generator=gen, dtype=torch.float64)
    results = {name: check_against_oracle(x, A, Bm, routing, ids, routing.space, 0.75, backend=name, cu=cu, weight=W,
                                          bias=b, grad_out=gy)[:4] for name in ("cuda", "triton")}
    ref, leaves = oracle(x, A, Bm, ids, routing.space, 0.75, torch.float64, cu, W, b)
    (ref * gy).sum().backward()
    want = [ref] + [t.grad for t in leaves[:3]]
    for name, c, t, w in zip(("out", "dx", "dA", "dB"), results["cuda"], results["triton"], want):
        diff = (c.double() - t.double()).abs().max().item()
        bound = (c.double().cpu() - w).abs().max().item() + (t.double().cpu() - w).abs().max().item()
        assert diff <= bound + 1e-6, f"{name}: cuda vs triton {diff:.3g} > {bound:.3g}"


@requires_cuda_backend
@pytest.mark.parametrize("tokens", [1, 7, 64, 65])
def test_decode_plans_with_many_features(seed, tokens):
    """One token per example and 1000+ features: K split over blocks, tiles straddling examples,
    the owner weight-gradient path."""
    gen = torch.Generator().manual_seed(seed)
    space = fk.FeatureSpace({"language": [f"l{i}" for i in range(1000)], "task": [f"t{i}" for i in range(24)]},
                            {"language": 8, "task": 16})
    routing, ids, x, A, Bm = _case(gen, space, tokens, (tokens,), 1024, 512, torch.bfloat16, p_absent=0.1)
    W, b = _base(gen, 1024, 512, torch.bfloat16)
    check_against_oracle(x, A, Bm, routing, ids, space, 0.5, backend="cuda", weight=W, bias=b)


@requires_cuda_backend
def test_gradients_are_bit_identical_with_default_plans(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 5]] * 7 + [[2, 6]])
    routing, ids, x, A, Bm = _case(gen, _space(), 8, (8, 500), 300, 260, torch.bfloat16, ids=ids)
    grads = []
    for _ in range(2):
        As, Bs = A.clone().requires_grad_(), Bm.clone().requires_grad_()
        out = fk.flix_delta(x, As, Bs, routing, scaling=0.5, backend="cuda")
        out.backward(torch.ones_like(out))
        grads.append((As.grad, Bs.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@requires_cuda_backend
def test_layer_training_step_under_autocast_matches_torch_backend(seed):
    """bf16 autocast over fp32 adapters (the PEFT default): the (bf16, fp32) kernel pair."""
    gen = torch.Generator().manual_seed(seed)
    space = _space()
    routing = fk.Routing(random_feature_ids(space, 4, gen), space)
    x = torch.randn(4, 33, 48, generator=gen).cuda()
    outs = {}
    for name in ("torch", "cuda"):
        torch.manual_seed(seed)
        layer = fk.FLixLinear(48, 40, space, init="gaussian", backend=name).cuda()
        torch.nn.init.normal_(layer.lora_B)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x, routing=routing)
        out.float().square().sum().backward()
        outs[name] = (out.float(), layer.lora_A.grad, layer.lora_B.grad)
    for name, got, want in zip(("out", "dA", "dB"), outs["cuda"], outs["torch"]):
        # bf16 outputs round differently per backend: compare whole tensors, not single elements
        err = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert err < 1e-2, f"{name}: relative error {err:.3g} between cuda and torch under autocast"
    assert outs["cuda"][1].dtype == torch.float32


def test_skipped_build_in_place_removes_a_stale_library(tmp_path):
    """What an editable install with FLIX_CUDA=0 runs: no library to copy, and an old one goes."""
    import shutil
    import subprocess
    import sys
    import sysconfig

    root = Path(__file__).resolve().parent.parent
    tree = tmp_path / "src"
    shutil.copytree(root, tree, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.so", "__pycache__",
                                                              "benchmarks", "tests", "examples"))
    stale = tree / "flix_kernels" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    stale.write_bytes(b"old")
    env = {**os.environ, "FLIX_CUDA": "0"}
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not stale.exists()
    assert json.loads((tree / "flix_kernels" / "_build.json").read_text())["cuda_extension"] == "skipped"


@requires_extension
def test_launch_plans_use_the_extensions_own_constants():
    """Block shapes, dtype codes and the decode bound have one definition (csrc/flix.h); the
    Python plans read them from the extension, so the two sides cannot drift."""
    from flix_kernels import _launch

    C = bridge._C
    assert cuda_launch._SHRINK_TILE == dict(enumerate(C.TILES["shrink"]))
    assert cuda_launch._GRAD_TILE == {i: s[0] for i, s in enumerate(C.TILES["weight_grad"])}
    assert len({s[1:] for s in C.TILES["weight_grad"]}) == 1  # the plans take one column width and token step
    assert (cuda_launch._DECODE_COLS, cuda_launch._DECODE_K_STEP) == C.TILES["decode"][0][1:]
    assert {str(d).removeprefix("torch."): c for d, c in cuda_launch._DTYPE_CODE.items()} == C.DTYPE_CODES
    assert C.DECODE_TOKENS == _launch.DECODE_TOKENS
