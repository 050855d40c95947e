"""The CUDA backend's decode path (csrc/decode.cu, flix_kernels.cuda.launch.DecodePlan).

On any machine with the extension built: the split plan's invariants, when the path applies,
that an eager decode forward is exactly one call into the extension and no torch op (timed
with every launch skipped, :func:`flix_kernels.cuda.host_path_only`), that inputs the kernel
cannot take go to the general path, that raw calls with bad arguments raise before touching a
device, and the sm_90 machine code (tensor-core MMA, cp.async copies, no local memory). On a
GPU: the float64 oracle at every decode shape (T = 1 to 64, tiles straddling examples, packed
routings, 1024 features with ragged ranks, every dtype pair, with and without bias), isolation
from absent features' values, forced K splits, determinism, CUDA-graph replay, and the split
counters left at zero.
"""

import copy
import glob
import os
import re
import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flix_kernels as fk
from _kernels import _base, _case, _space, forced_paths
from conftest import DEVICE, check_against_oracle
from flix_kernels import _launch, backends
from flix_kernels import cuda as bridge
from flix_kernels.bench.overhead import launches

requires_extension = pytest.mark.skipif(bridge._C is None, reason=f"{bridge.extension_error()}")
CUDA_OK = backends.unavailable_reason("cuda", DEVICE) is None
requires_cuda_backend = pytest.mark.skipif(not CUDA_OK, reason=f"cuda backend: {backends.unavailable_reason('cuda', DEVICE)}")

if bridge._C is not None:
    from flix_kernels.cuda import launch
else:
    launch = None


def _cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Plans (host only)
# ---------------------------------------------------------------------------------------------
@requires_extension
@settings(max_examples=200)
@given(T=st.integers(1, 64), K=st.integers(8, 20000).map(lambda k: k - k % 8), N=st.integers(1, 30000),
       itemsize=st.sampled_from([2, 4]), sms=st.sampled_from([4, 108, 132]))
def test_decode_splits_cover_k_in_whole_stages_within_the_byte_budget(T, K, N, itemsize, sms):
    splits = launch.decode_splits(T, K, N, itemsize, sms)
    per_split = max(32, _cdiv(_cdiv(K, splits), 32) * 32)
    assert 1 <= splits <= _cdiv(K, 32)
    assert per_split * splits >= K and per_split * (splits - 1) < K, "every split has work and K is covered"
    # what the kernel recomputes from the count it is given (csrc/decode.cu launch)
    assert max(1, _cdiv(K, max(32, _cdiv(_cdiv(K, splits), 32) * 32))) == splits
    if splits > 1:
        assert splits * T * N * 4 <= N * K * itemsize / 8 + T * N * 4 * 32, "partials stay small next to W"
        assert _cdiv(N, 64) * (splits - 1) < 4 * sms + _cdiv(N, 64), "no more blocks than about four per SM"


@requires_extension
def test_the_decode_path_applies_only_where_the_kernel_can_run(monkeypatch):
    routing = fk.Routing(torch.tensor([[0, 5], [1, 6]]), _space())
    meta = routing.kernel_metadata(torch.device("cpu")).for_layout("batched", 1)
    cpu = torch.device("cpu")
    R = routing.space.total_rank

    def plan(T, K, act, adapters):
        return launch.decode_plan(meta, T, K, 48, R, act, adapters, cpu)

    assert plan(2, 64, torch.bfloat16, torch.bfloat16) is not None
    assert plan(2, 64, torch.bfloat16, torch.float32) is not None
    assert plan(65, 64, torch.bfloat16, torch.bfloat16) is None, "more than 64 tokens"
    assert plan(0, 64, torch.bfloat16, torch.bfloat16) is None
    assert plan(2, 0, torch.bfloat16, torch.bfloat16) is None
    assert plan(2, 60, torch.bfloat16, torch.bfloat16) is None, "K not whole 16-byte copies"
    assert plan(2, 60, torch.float32, torch.float32) is not None
    assert plan(2, 64, torch.float32, torch.float16) is None, "no such kernel pair"
    monkeypatch.setenv("FLIX_CUDA_DECODE", "0")
    assert plan(2, 64, torch.bfloat16, torch.bfloat16) is None


def _decode_layer(tokens, per_example=1, dtype=torch.float32, bias=True, width=64):
    gen = torch.Generator().manual_seed(tokens)
    space = fk.FeatureSpace({"language": [f"l{i}" for i in range(12)], "task": ["a", "b", "c"]}, {"language": 8,
                                                                                                  "task": 4})
    base = torch.nn.Linear(width, width, bias=bias)
    layer = fk.FLixLinear.from_linear(base, space, alpha=8.0, init="gaussian", backend="cuda").to(dtype)
    examples = tokens // per_example
    ids = torch.stack([torch.randint(0, 12, (examples,), generator=gen), torch.randint(12, 15, (examples,),
                                                                                       generator=gen)], 1)
    shape = (examples, width) if per_example == 1 else (examples, per_example, width)
    x = torch.randn(*shape, generator=gen).to(dtype)
    return layer, x, fk.Routing(ids, space)


@requires_extension
@pytest.mark.parametrize("tokens,per_example", [(1, 1), (8, 1), (64, 1), (64, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_an_eager_decode_forward_is_one_call_into_the_extension(tokens, per_example, bias):
    layer, x, routing = _decode_layer(tokens, per_example, bias=bias)
    with bridge.host_path_only(), torch.no_grad():
        counts = launches(lambda: layer(x, routing=routing))
    assert counts["by_kernel"] == {"cuda:decode_linear": 1}, counts
    assert counts["torch_ops"] == 0, f"the decode forward ran torch ops besides its one call: {counts}"


@requires_extension
def test_a_decode_training_step_takes_the_decode_forward():
    layer, x, routing = _decode_layer(8)
    x.requires_grad_(True)

    def step():
        y = layer(x, routing=routing)
        torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], torch.ones_like(y))

    with bridge.host_path_only():
        counts = launches(step)
    assert counts["by_kernel"].get("cuda:decode_linear") == 1, counts
    assert "cuda:shrink" in counts["by_kernel"] and "cuda:weight_grad" in counts["by_kernel"], counts


@requires_extension
@pytest.mark.parametrize("what", ["misaligned x", "transposed weight", "strided x", "fused-off env"])
def test_inputs_the_decode_kernel_cannot_take_go_to_the_general_path(what, monkeypatch):
    layer, x, routing = _decode_layer(8)
    if what == "misaligned x":  # rows start 4 bytes past a 16-byte boundary
        x = torch.randn(8 * 64 + 1)[1:].view(8, 64)
    elif what == "transposed weight":
        w = layer.base_layer.weight
        layer.base_layer.weight = torch.nn.Parameter(w.detach().t().contiguous().t(), requires_grad=False)
    elif what == "strided x":
        x = torch.randn(8, 128)[:, ::2]
    else:
        monkeypatch.setenv("FLIX_CUDA_DECODE", "0")
    with bridge.host_path_only(), torch.no_grad():
        counts = launches(lambda: layer(x, routing=routing))
    assert "cuda:decode_linear" not in counts["by_kernel"], counts
    assert counts["by_kernel"].get("cuda:shrink") == 1 and counts["by_kernel"].get("cuda:expand") == 1, counts


@requires_extension
def test_host_path_only_is_scoped_and_cpu_launches_outside_it_fail_clearly():
    assert backends.unavailable_reason("cuda", "cpu") is not None
    with bridge.host_path_only():
        assert backends.unavailable_reason("cuda", "cpu") is None
    assert not bridge.host_path_timing()
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        launch._launch_context(x)
    with bridge.host_path_only():
        assert launch._launch_context(x) == (-1, 0)
        with _launch.recording(run=True):  # a nested recording that runs launches: CPU pointers never reach one
            with pytest.raises(ValueError, match="need CUDA tensors"):
                launch._launch_context(x)
    layer, x, routing = _decode_layer(1)
    with bridge.host_path_only(), torch.no_grad():
        layer(x, routing=routing)
    assert launch._COUNTERS[(-1, 0)].device.type == "cpu", "the host path's buffer is under no device's key"
    assert all(buf.device.type == "cuda" for (index, _), buf in launch._COUNTERS.items() if index >= 0)


@requires_extension
def test_raw_decode_calls_reject_bad_arguments_before_touching_the_device():
    routing = fk.Routing(torch.tensor([[0, 5]]), _space())
    meta = routing.kernel_metadata(torch.device("cpu")).for_layout("batched", 1)
    args = launch._routing(meta.slot_rank, meta.slot_feature, None, 1)
    C = launch._C

    def call(plan, x=16, sx=64, w=16, sw=64):
        C.decode_linear(plan, x=x, sx=sx, w=w, sw=sw, bias=0, a=16, sar=64, sak=1, m=16, smr=1, smn=8, y=16, h=16,
                        shrink_workspace=0, workspace=0, counters=0, scales=(0, 0, 1.0), dropout=(0, 0.0), stream=0)

    too_many = C.DecodePlan(args, 65, 64, 48, 8, 2, 2, 1, 1, 0)
    with pytest.raises(ValueError, match="at most 64 tokens"):
        call(too_many)
    plan = C.DecodePlan(args, 1, 64, 48, 8, 2, 2, 1, 1, 0)
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        call(plan, x=18)
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        call(plan, sx=63)
    mixed = C.DecodePlan(args, 1, 64, 48, 8, 0, 1, 1, 1, 0)  # fp32 activations, fp16 adapters
    with pytest.raises(ValueError, match="unsupported dtype pair"):
        call(mixed)
    with pytest.raises(ValueError, match="splits < 1"):
        C.DecodePlan(args, 1, 64, 48, 8, 2, 2, 1, 0, 0)
    split = C.DecodePlan(args, 1, 64, 48, 8, 2, 2, 1, 3, 0)  # a K split without a workspace
    with pytest.raises(ValueError, match="needs a workspace and zeroed counters"):
        call(split)


@requires_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on machines without a GPU")
def test_a_batch_without_features_needs_no_h_and_reaches_the_device():
    """No example uses a feature: h is empty (a null pointer) and only the base GEMM runs."""
    routing = fk.Routing(torch.tensor([[-1, -1], [-1, -1]]), _space())
    meta = routing.kernel_metadata(torch.device("cpu")).for_layout("batched", 1)
    assert meta.slot_rank.shape == (2, 0)
    plan = launch._C.DecodePlan(launch._routing(meta.slot_rank, meta.slot_feature, None, 1), 2, 64, 48, 34, 2, 2, 1,
                                1, 0)
    with pytest.raises(RuntimeError, match=r"flix_kernels\._C\.decode_linear: CUDA error"):
        launch._C.decode_linear(plan, x=16, sx=64, w=16, sw=64, bias=0, a=16, sar=64, sak=1, m=16, smr=1, smn=34, y=16,
                                h=0, shrink_workspace=0, workspace=0, counters=0, scales=(0, 0, 1.0),
                                dropout=(0, 0.0), stream=0)


@requires_extension
def test_a_plan_called_with_tensors_of_other_shapes_raises():
    layer, x, routing = _decode_layer(8)
    meta = routing.layer_metadata(x.device, (8,))
    plan = launch.decode_plan(meta, 8, 64, 64, layer.lora_A.shape[0], torch.float32, torch.float32, x.device)
    W = layer.base_layer.weight
    with bridge.host_path_only():
        assert plan(x, W, None, layer.lora_A, layer.lora_B, None, 1.0, None, 0.0) is not None
        with pytest.raises(ValueError, match="the plan is for x"):
            plan(x[:4], W, None, layer.lora_A, layer.lora_B, None, 1.0, None, 0.0)
        with pytest.raises(ValueError, match="bias"):
            plan(x, W, torch.zeros(63), layer.lora_A, layer.lora_B, None, 1.0, None, 0.0)


# ---------------------------------------------------------------------------------------------
# Machine code (sm_90 SASS of the built extension, read with the cuobjdump Triton carries)
# ---------------------------------------------------------------------------------------------
def _cuobjdump():
    try:
        import triton
    except ImportError:
        return None
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return tool if os.access(tool, os.X_OK) else None


@requires_extension
@pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump (it comes with Triton's NVIDIA backend)")
def test_decode_kernels_use_tensor_cores_and_async_copies_without_local_memory():
    lib = glob.glob(os.path.join(os.path.dirname(bridge.__file__), "..", "_C*.so"))
    assert lib, "the extension library is not next to the package"
    if "90" not in bridge.build_info()["archs"]:
        pytest.skip(f"built for {bridge.build_info()['archs']}, not sm_90")
    sass = subprocess.run([_cuobjdump(), "-sass", "-arch", "sm_90", lib[0]], capture_output=True, text=True,
                          check=True).stdout
    usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", "-arch", "sm_90", lib[0]], capture_output=True,
                           text=True, check=True).stdout
    bodies = {}
    for chunk in sass.split("Function : ")[1:]:
        name = chunk.split("\n", 1)[0].strip()
        if "decode_linear_kernel" in name:
            bodies[name] = chunk
    # 2 row tiles x 5 dtype pairs
    assert len(bodies) == 10, sorted(bodies)
    for name, body in bodies.items():
        assert "LDGSTS" in body, f"{name}: no cp.async (LDGSTS) copies"
        is_fp32 = re.search(r"decode_linear_kernelIff", name) is not None
        if not is_fp32:
            assert "HMMA" in body, f"{name}: no tensor-core MMA"
            assert not re.search(r"\b(LDL|STL)\b", body), f"{name}: uses local memory (spills)"
    for line in usage.splitlines():
        if "decode_linear_kernel" in line:
            nxt = usage.splitlines()[usage.splitlines().index(line) + 1]
            regs = int(re.search(r"REG:(\d+)", nxt).group(1))
            assert regs <= 128, f"{regs} registers: fewer than four 128-thread blocks per SM fit ({line.strip()[:80]})"


# ---------------------------------------------------------------------------------------------
# GPU: the oracle, isolation, splits, determinism, CUDA graphs
# ---------------------------------------------------------------------------------------------
DTYPE_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32),
               (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


def _took_decode(fn) -> bool:
    with _launch.recording(run=True) as rec:
        fn()
    return rec.counts.get(("cuda", "decode_linear"), 0) > 0


@requires_cuda_backend
@pytest.mark.parametrize("act,adapters", DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("B,shape", [(1, (1,)), (7, (7,)), (16, (16,)), (17, (17,)), (64, (64,)), (8, (8, 8)),
                                     (3, (3, 5))])
@pytest.mark.parametrize("bias", [True, False])
def test_decode_matches_the_oracle(seed, act, adapters, B, shape, bias):
    gen = torch.Generator().manual_seed(seed)
    routing, ids, x, A, Bm = _case(gen, _space(), B, shape, 136, 200, act, lora_dtype=adapters, p_absent=0.2)
    W, b = _base(gen, 136, 200, act)
    assert _took_decode(lambda: fk.flix_linear(x, W, b if bias else None, A, Bm, routing, scaling=0.75,
                                               backend="cuda"))
    check_against_oracle(x, A, Bm, routing, ids, routing.space, 0.75, backend="cuda", weight=W,
                         bias=b if bias else None)


@requires_cuda_backend
@pytest.mark.parametrize("tokens", [1, 8, 32, 64])
def test_decode_with_1024_features_ragged_ranks_and_per_feature_scales(seed, tokens):
    """One token per request, 1024 features in 4 groups of ranks 16, 8, 4 and 3 (runs of slots that
    are not whole 16-byte vectors), per-feature bf16 scales, K split over many blocks."""
    gen = torch.Generator().manual_seed(seed)
    space = fk.FeatureSpace({f"g{g}": [f"g{g}f{i}" for i in range(256)] for g in range(4)},
                            {"g0": 16, "g1": 8, "g2": 4, "g3": 3})
    routing, ids, x, A, Bm = _case(gen, space, tokens, (tokens,), 1024, 512, torch.bfloat16, p_absent=0.1)
    W, b = _base(gen, 1024, 512, torch.bfloat16)
    scales = (torch.rand(space.num_features, generator=gen) + 0.5).to(torch.bfloat16).to(DEVICE)
    assert _took_decode(lambda: fk.flix_linear(x, W, b, A, Bm, routing, scaling=scales, backend="cuda"))
    check_against_oracle(x, A, Bm, routing, ids, space, scales, backend="cuda", weight=W, bias=b)


@requires_cuda_backend
def test_decode_with_a_packed_routing_and_an_empty_example(seed):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 5, 5, 12, 20])
    routing, ids, x, A, Bm = _case(gen, _space(), 4, (20,), 96, 80, torch.float16, cu=cu)
    W, b = _base(gen, 96, 80, torch.float16)
    assert _took_decode(lambda: fk.flix_linear(x, W, b, A, Bm, routing, scaling=0.5, backend="cuda"))
    check_against_oracle(x, A, Bm, routing, ids, routing.space, 0.5, backend="cuda", cu=cu, weight=W, bias=b)


@requires_cuda_backend
@pytest.mark.parametrize("splits", [1, 2, 5, 40])
def test_forced_splits_agree_and_leave_the_counters_at_zero(seed, splits):
    gen = torch.Generator().manual_seed(seed)
    routing, ids, x, A, Bm = _case(gen, _space(), 5, (5,), 1280, 300, torch.bfloat16)
    W, b = _base(gen, 1280, 300, torch.bfloat16)
    with forced_paths("cuda", {"decode_splits": splits, "splits": 3}):
        assert _took_decode(lambda: fk.flix_linear(x, W, b, A, Bm, routing, scaling=0.5, backend="cuda"))
        check_against_oracle(x, A, Bm, routing, ids, routing.space, 0.5, backend="cuda", weight=W, bias=b)
    torch.cuda.synchronize()
    for buf in launch._COUNTERS.values():
        assert int(buf.abs().sum()) == 0, "a split counter was left non-zero"


@requires_cuda_backend
def test_a_batch_without_any_feature_is_the_base_layer(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((6, 2), -1)
    routing, ids, x, A, Bm = _case(gen, _space(), 6, (6,), 128, 72, torch.bfloat16, ids=ids)
    W, b = _base(gen, 128, 72, torch.bfloat16)
    assert _took_decode(lambda: fk.flix_linear(x, W, b, A, Bm, routing, scaling=0.5, backend="cuda"))
    check_against_oracle(x, A, Bm, routing, ids, routing.space, 0.5, backend="cuda", weight=W, bias=b)


@requires_cuda_backend
def test_absent_features_values_never_reach_the_output(seed):
    """inf in every row of lora_A / column of lora_B of the features no example uses."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[0, 5], [1, -1], [-1, 6], [0, 6]] * 4)
    routing, ids, x, A, Bm = _case(gen, _space(), 16, (16,), 128, 96, torch.bfloat16, ids=ids)
    W, b = _base(gen, 128, 96, torch.bfloat16)
    ref = fk.flix_linear(x, W, b, A, Bm, routing, scaling=0.5, backend="torch")
    used = {int(f) for f in ids.flatten() if f >= 0}
    offsets = routing.space.rank_offsets
    for f in range(routing.space.num_features):
        if f not in used:
            A[offsets[f]:offsets[f + 1]] = float("inf")
            Bm[:, offsets[f]:offsets[f + 1]] = float("nan")
    with torch.no_grad():
        out = fk.flix_linear(x, W, b, A, Bm, routing, scaling=0.5, backend="cuda")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@requires_cuda_backend
def test_decode_is_deterministic_and_replays_in_a_cuda_graph(seed):
    gen = torch.Generator().manual_seed(seed)
    routing, ids, x, A, Bm = _case(gen, _space(), 32, (32,), 1024, 1024, torch.bfloat16)
    layer = fk.FLixLinear(1024, 1024, _space(), init="gaussian", backend="cuda").to(DEVICE, torch.bfloat16)
    torch.nn.init.normal_(layer.lora_B)
    with torch.no_grad():
        first, again = layer(x, routing=routing), layer(x, routing=routing)
        assert torch.equal(first, again), "two runs differ"
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(static_x, routing=routing)  # warm up on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(static_x, routing=routing)
        new_x = torch.randn(x.shape, generator=gen).to(DEVICE, torch.bfloat16)
        static_x.copy_(new_x)
        graph.replay()
        graph.replay()  # the counters must be zero again for the second replay
        torch.cuda.synchronize()
        assert torch.equal(out, layer(new_x, routing=routing))
    assert _took_decode(lambda: layer(new_x, routing=routing))


@requires_cuda_backend
def test_the_decode_forward_trains_like_the_torch_backend(seed):
    gen = torch.Generator().manual_seed(seed)
    space = _space()
    routing, ids, x, A, Bm = _case(gen, space, 8, (8,), 256, 128, torch.bfloat16)
    layers = {}
    for name in ("torch", "cuda"):
        torch.manual_seed(seed)
        layers[name] = fk.FLixLinear(256, 128, space, init="gaussian", backend=name).to(DEVICE, torch.bfloat16)
        torch.nn.init.normal_(layers[name].lora_B)
    layers["cuda"].load_state_dict(copy.deepcopy(layers["torch"].state_dict()))
    grads = {}
    for name, layer in layers.items():
        xs = x.clone().requires_grad_(True)
        out = layer(xs, routing=routing)
        out.float().square().sum().backward()
        grads[name] = (out.float(), xs.grad.float(), layer.lora_A.grad.float(), layer.lora_B.grad.float())
    for what, got, want in zip(("out", "dx", "dA", "dB"), grads["cuda"], grads["torch"]):
        err = ((got - want).norm() / want.norm()).item()
        assert err < 2e-2, f"{what}: relative error {err:.3g} against the torch backend"
