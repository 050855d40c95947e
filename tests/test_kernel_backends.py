"""The kernel backends ("triton" and "cuda") against the float64 oracle: one suite, run for each.

Every case checks the output and all gradients (x, lora_A, lora_B, and W/b when trainable)
through :func:`conftest.check_against_oracle`. Shapes are small and odd so no dimension is a
multiple of a block size, and launch plans are forced (:func:`forced_paths`) to small tiles,
K splits and token chunks so every code path runs. Without a GPU, "triton" runs in Triton's
interpreter and "cuda" is skipped (it needs a GPU; ``tests/test_cuda_backend.py`` checks its
build, validation and errors on CPU).
"""

import contextlib

import pytest
import torch

import flix_kernels as fk
from _kernels import GRAD_PATHS, _base, _case, _space, forced_paths, keep_mask
from conftest import (DEVICE, KERNEL_DTYPES, assert_close, check_against_oracle, oracle, random_adapters,
                      random_feature_ids, random_scaling, random_space, requires_cuda)
from flix_kernels.reference import flix_linear_reference

LAYOUTS = {
    "batched": dict(B=3, shape=(3, 5)),
    "single_token": dict(B=4, shape=(4,)),
    "packed": dict(B=4, shape=(10,), cu=[0, 3, 3, 9, 10]),
    "packed_leading_one": dict(B=3, shape=(1, 7), cu=[0, 6, 6, 7]),
}


@pytest.mark.parametrize("fuse_base", [False, True], ids=["cublas+expand", "fused_base"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_linear_matches_oracle(seed, backend, dtype, layout, fuse_base):
    if fuse_base and backend != "triton":
        pytest.skip("only the Triton backend has a fused base GEMM")
    gen = torch.Generator().manual_seed(seed)
    spec = LAYOUTS[layout]
    cu = None if "cu" not in spec else torch.tensor(spec["cu"])
    routing, ids, x, A, Bm = _case(gen, _space(), spec["B"], spec["shape"], 37, 29, dtype, cu=cu)
    W, b = _base(gen, 37, 29, dtype, trainable=layout == "packed")
    scaling = random_scaling(routing.space, gen).to(DEVICE)
    with forced_paths(backend, fuse_base=fuse_base):
        check_against_oracle(x, A, Bm, routing, ids, routing.space, scaling, backend=backend, cu=cu, weight=W, bias=b)


@pytest.mark.parametrize("case", range(6))
def test_delta_random_spaces_match_oracle(seed, backend, case):
    """Random feature spaces (1..6 groups, ragged ranks 1..20), absent features, float scale."""
    gen = torch.Generator().manual_seed(seed + case)
    space = random_space(gen, max_rank=20)
    B, L = int(torch.randint(1, 5, (), generator=gen)), int(torch.randint(1, 9, (), generator=gen))
    in_f, out_f = (int(v) for v in torch.randint(1, 50, (2,), generator=gen))
    routing, ids, x, A, Bm = _case(gen, space, B, (B, L), in_f, out_f, torch.float32, p_absent=0.3)
    with forced_paths(backend, None if case % 2 else {}):
        check_against_oracle(x, A, Bm, routing, ids, space, 0.75, backend=backend)


EDGE_IDS = {
    "no_feature_anywhere": [[-1, -1]] * 3,
    "identical_sets": [[1, 6]] * 3,
    "skewed": [[2, 5]] * 7 + [[0, 7]],
    "some_examples_empty": [[-1, -1], [4, -1], [-1, -1]],
    "one_group_only": [[-1, 6], [-1, 7], [-1, 5]],
}


@pytest.mark.parametrize("kind", list(EDGE_IDS))
def test_edge_routings(seed, backend, kind):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor(EDGE_IDS[kind])
    routing, ids, x, A, Bm = _case(gen, _space(), len(ids), (len(ids), 6), 21, 18, torch.float32, ids=ids)
    W, b = _base(gen, 21, 18, torch.float32)
    with forced_paths(backend):
        check_against_oracle(x, A, Bm, routing, ids, routing.space, 1.25, backend=backend, weight=W, bias=b)


def test_update_alone_with_no_feature_anywhere_is_zero(seed, backend):
    """No slot at all (every id -1): the update and dx are written as zeros, dA/dB are zero."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor(EDGE_IDS["no_feature_anywhere"])
    routing, ids, x, A, Bm = _case(gen, _space(), 3, (3, 4), 12, 10, torch.float32, ids=ids)
    out, dx, dA, dB = check_against_oracle(x, A, Bm, routing, ids, routing.space, 1.0, backend=backend)
    assert out.abs().sum() == 0 and dx.abs().sum() == 0 and dA.abs().sum() == 0 and dB.abs().sum() == 0


@pytest.mark.parametrize("shape", [(3, 0), (0, 4), (0,)], ids=["no_tokens", "no_examples", "no_examples_1d"])
def test_empty_inputs(seed, backend, shape):
    gen = torch.Generator().manual_seed(seed)
    B = shape[0]
    routing, ids, x, A, Bm = _case(gen, _space(), B, shape, 9, 11, torch.float32)
    W, b = _base(gen, 9, 11, torch.float32)
    out, dx, dA, dB = check_against_oracle(x, A, Bm, routing, ids, routing.space, 2.0, backend=backend,
                                           weight=W, bias=b)[:4]
    assert out.shape == (*shape, 11) and dA.abs().sum() == 0 and dB.abs().sum() == 0


def test_large_ranks_span_several_blocks(seed, backend):
    """Ranks 1, 70 and 256: slot lists of up to 327 (many 64-wide blocks), ranks above the
    64-row gradient tiles, and a 256-row workspace."""
    gen = torch.Generator().manual_seed(seed)
    space = fk.FeatureSpace({"a": ["p", "q"], "b": ["r", "s", "t"], "c": ["u", "v"]}, {"a": 1, "b": 70, "c": 256})
    ids = torch.tensor([[0, 2, 5], [1, 3, -1], [-1, 4, 6], [0, -1, -1]])
    routing, ids, x, A, Bm = _case(gen, space, 4, (4, 3), 19, 23, torch.float32, ids=ids)
    scaling = random_scaling(space, gen).to(DEVICE)
    for overrides in ({}, None):
        with forced_paths(backend, overrides):
            check_against_oracle(x, A, Bm, routing, ids, space, scaling, backend=backend)


def test_thousands_of_features(seed, backend):
    """4096 features (3 groups): absent features get exact zero gradient rows."""
    gen = torch.Generator().manual_seed(seed)
    space = fk.FeatureSpace({"language": [f"l{i}" for i in range(4000)], "task": [f"t{i}" for i in range(90)],
                             "domain": [f"d{i}" for i in range(6)]}, {"language": 2, "task": 4, "domain": 3})
    assert space.num_features == 4096
    routing, ids, x, A, Bm = _case(gen, space, 5, (5, 4), 8, 6, torch.float32, p_absent=0.2)
    check_against_oracle(x, A, Bm, routing, ids, space, 0.5, backend=backend)


def test_mixed_precision_fp16_activations_fp32_adapters(seed, backend):
    """PEFT-style upcast adapters: the low-rank path computes in the adapters' fp32."""
    gen = torch.Generator().manual_seed(seed)
    routing, ids, x, A, Bm = _case(gen, _space(), 3, (3, 4), 24, 20, torch.float16, lora_dtype=torch.float32)
    W, b = _base(gen, 24, 20, torch.float16)
    xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, Bm))
    xr, Ar, Br = (t.clone().requires_grad_() for t in (x, A, Bm))
    out = fk.flix_linear(xs, W, b, As, Bs, routing, scaling=0.5, backend=backend)
    ref = fk.flix_linear(xr, W, b, Ar, Br, routing, scaling=0.5, backend="torch")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-3)
    gy = torch.randn(out.shape, generator=gen).to(DEVICE, torch.float16)
    out.backward(gy)
    ref.backward(gy)
    assert As.grad.dtype == torch.float32 and xs.grad.dtype == torch.float16
    for got, want in ((xs.grad, xr.grad), (As.grad, Ar.grad), (Bs.grad, Br.grad)):
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-3, atol=5e-3)


def test_strided_input_and_broadcast_output_gradient(seed, backend):
    """x with a column stride of 2 (a slice), and dy with zero strides (the gradient of out.sum())."""
    gen = torch.Generator().manual_seed(seed)
    routing, ids, x, A, Bm = _case(gen, _space(), 2, (2, 5), 26, 10, torch.float32)
    x = x[..., ::2]  # (2, 5, 13), strides (130, 26, 2): flattening keeps a column stride of 2
    assert x.reshape(10, 13).stride() == (26, 2)
    W, b = _base(gen, 13, 10, torch.float32)
    A = A[:, :13].contiguous()
    As, Bs = (t.detach().clone().requires_grad_() for t in (A, Bm))
    xs = x.detach().requires_grad_()  # no clone: a clone would be contiguous
    with forced_paths(backend):
        out = fk.flix_linear(xs, W, b, As, Bs, routing, scaling=0.5, backend=backend)
        out.sum().backward()  # dy = ones expanded: strides (0, 0)
    ref, leaves = oracle(x, A, Bm, ids, routing.space, 0.5, torch.float64, weight=W, bias=b)
    xo, Ao, Bo = leaves[:3]
    ref.sum().backward()
    for got, want in ((out, ref), (xs.grad, xo.grad), (As.grad, Ao.grad), (Bs.grad, Bo.grad)):
        assert_close(got.cpu(), want, torch.float32, scale=4)


@pytest.mark.parametrize("with_base,fuse_base", [(False, False), (True, False), (True, True)],
                         ids=["delta", "cublas+expand", "fused_base"])
def test_dropout_matches_oracle_with_the_regenerated_mask(seed, backend, with_base, fuse_base):
    if fuse_base and backend != "triton":
        pytest.skip("only the Triton backend has a fused base GEMM")
    gen = torch.Generator().manual_seed(seed)
    routing, ids, x, A, Bm = _case(gen, _space(), 3, (3, 6), 33, 17, torch.float32)
    W, b = _base(gen, 33, 17, torch.float32) if with_base else (None, None)
    p = 0.3
    mask = keep_mask(backend, seed, 18, 33, p).view(3, 6, 33)
    assert 0 < mask.sum() < mask.numel()
    with forced_paths(backend, fuse_base=fuse_base):
        check_against_oracle(x, A, Bm, routing, ids, routing.space, 0.9, backend=backend, weight=W, bias=b,
                             dropout_p=p, generator=torch.Generator(DEVICE).manual_seed(seed), dropout_mask=mask)


def test_weight_gradients_are_bit_identical_run_to_run(seed, backend):
    """The segment-owned reduction uses no atomics: same inputs, same bits (token chunks on)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 5]] * 5 + [[2, 5]])  # one common feature split over many chunks
    routing, ids, x, A, Bm = _case(gen, _space(), 6, (6, 40), 26, 22, torch.float32, ids=ids)
    grads = []
    with forced_paths(backend):
        for _ in range(2):
            As, Bs = A.clone().requires_grad_(), Bm.clone().requires_grad_()
            out = fk.flix_delta(x, As, Bs, routing, scaling=0.5, backend=backend)
            out.backward(torch.ones_like(out))
            grads.append((As.grad, Bs.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_matches_torch_backend_in_a_layer_training_step(seed, backend):
    gen = torch.Generator().manual_seed(seed)
    space = _space()
    torch.manual_seed(seed)
    layers = {}
    for name in ("torch", backend):
        torch.manual_seed(seed)
        layer = fk.FLixLinear(20, 14, space, alpha=4.0, init="gaussian", backend=name).to(DEVICE)
        with torch.no_grad():
            layer.lora_B.normal_(generator=torch.Generator(DEVICE).manual_seed(seed))
        layers[name] = layer
    routing = fk.Routing(random_feature_ids(space, 3, gen), space)
    x = torch.randn(3, 7, 20, generator=gen).to(DEVICE)
    outs = {}
    for name, layer in layers.items():
        xs = x.clone().requires_grad_()
        out = layer(xs, routing=routing)
        out.square().sum().backward()
        outs[name] = (out, xs.grad, layer.lora_A.grad, layer.lora_B.grad)
    for got, want in zip(outs[backend], outs["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_opcheck_custom_ops(seed, backend):
    """torch.library.opcheck: schema, fake tensor, autograd registration and AOT dispatch."""
    gen = torch.Generator().manual_seed(seed)
    routing, ids, x, A, Bm = _case(gen, _space(), 2, (2, 3), 8, 6, torch.float32)
    W, b = _base(gen, 8, 6, torch.float32)
    meta_tensors, meta_ints = routing.layer_metadata(x.device, (2, 3)).meta_args()
    args = (x.view(6, 8).requires_grad_(), W, b, A.requires_grad_(), Bm.requires_grad_(), None, None, meta_tensors,
            meta_ints, 0.5, 0.0, False)
    torch.library.opcheck(getattr(torch.ops.flix_kernels, f"{backend}_lora_forward").default, args)


def _two_layer_model(space, backend):
    """Two FLix layers with random (non-zero) lora_B, so every update and gradient is non-zero."""
    model = torch.nn.Sequential(
        fk.FLixLinear(12, 16, space, init="gaussian", backend=backend), torch.nn.GELU(),
        fk.FLixLinear(16, 8, space, init="gaussian", backend=backend),
    ).to(DEVICE)
    with torch.no_grad():
        for m in model:
            if isinstance(m, fk.FLixLinear):
                m.lora_B.normal_()
    return model


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager_without_recompiling(seed, backend, compiler):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(seed)
    space = _space()
    torch.manual_seed(seed)
    model = _two_layer_model(space, backend)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    tol = dict(rtol=1e-4, atol=1e-4)  # inductor fuses and reorders the GELU and reductions
    for step in range(3):  # a new routing (same shapes) each step must reuse the graph
        routing = fk.Routing(random_feature_ids(space, 4, gen, p_absent=0.0), space)
        fk.set_routing(model, routing)
        x = torch.randn(4, 5, 12, generator=gen).to(DEVICE)
        ctx = torch._dynamo.config.patch(error_on_recompile=True) if step else contextlib.nullcontext()
        with ctx:
            got = compiled(x)
        want = model(x)
        torch.testing.assert_close(got, want, **tol)
        got.sum().backward()
        g_compiled = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        want.sum().backward()
        for a, b in zip(g_compiled, (p.grad for p in model.parameters() if p.requires_grad)):
            torch.testing.assert_close(a, b, **tol)
        model.zero_grad()


def test_compiled_model_asks_for_prebuilt_metadata(backend):
    torch._dynamo.reset()
    space = _space()
    model = _two_layer_model(space, backend)
    routing = fk.Routing([[0, 5]], space)
    compiled = torch.compile(lambda x: model[0](x, routing=routing), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="routing.to"):
        compiled(torch.randn(1, 3, 12).to(DEVICE))


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("dtype,tol,L", [(torch.bfloat16, 1e-2, 4096), (torch.float32, 1e-5, 1024)],
                         ids=["bf16-T32k", "fp32-T8k"])
def test_large_shapes_relative_error(seed, backend, dtype, tol, L, monkeypatch):
    """in/out 4096, 64 features in two groups, rank 16, T up to 32k: error vs the float64 oracle
    (fp32 without tf32), output and all gradients."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    gen = torch.Generator().manual_seed(seed)
    space = fk.FeatureSpace({"language": [f"l{i}" for i in range(56)], "task": [f"t{i}" for i in range(8)]}, 16)
    ids = torch.stack([torch.randint(0, 56, (8,), generator=gen), torch.randint(56, 64, (8,), generator=gen)], 1)
    routing = fk.Routing(ids, space)
    d = 4096
    x64 = torch.randn(8, L, d, generator=gen, dtype=torch.float64).cuda()
    W64 = torch.randn(d, d, generator=gen, dtype=torch.float64).cuda() / d**0.5
    A64 = torch.randn(space.total_rank, d, generator=gen, dtype=torch.float64).cuda() / d**0.5
    B64 = torch.randn(d, space.total_rank, generator=gen, dtype=torch.float64).cuda() / 4
    gy = torch.randn(8, L, d, generator=gen, dtype=torch.float64).cuda()
    leaves = [t.to(dtype).requires_grad_() for t in (x64, A64, B64)]
    out = fk.flix_linear(leaves[0], W64.to(dtype), None, leaves[1], leaves[2], routing, scaling=0.5, backend=backend)
    got = [out, *torch.autograd.grad(out, leaves, gy.to(dtype))]
    leaves64 = [t.clone().requires_grad_() for t in (x64, A64, B64)]
    ref = flix_linear_reference(leaves64[0], W64, None, leaves64[1], leaves64[2], ids, space.rank_offsets, 0.5)
    want = [ref, *torch.autograd.grad(ref, leaves64, gy)]
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        rel = ((g.double() - w).norm() / w.norm()).item()
        assert rel < tol, f"{name}: relative error {rel:.3g}"


@requires_cuda
def test_cuda_graph_capture_of_forward_and_backward(seed, backend):
    gen = torch.Generator().manual_seed(seed)
    space = _space()
    model = _two_layer_model(space, backend).to(torch.bfloat16)
    routing = fk.Routing(random_feature_ids(space, 4, gen), space)
    fk.set_routing(model, routing)
    static_x = torch.randn(4, 9, 12, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up: compile kernels, build metadata
            model(static_x).float().sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    model.zero_grad(set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_x)
        static_out.float().sum().backward()
    new_x = torch.randn_like(static_x)
    static_x.copy_(new_x)
    model.zero_grad(set_to_none=False)
    graph.replay()
    torch.cuda.synchronize()
    captured = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=False)
    eager = model(new_x)
    eager.float().sum().backward()
    torch.testing.assert_close(static_out, eager)
    for a, p in zip(captured, (p for p in model.parameters() if p.requires_grad)):
        torch.testing.assert_close(a, p.grad)


@requires_cuda
def test_bf16_matches_oracle_on_gpu(seed, backend):
    gen = torch.Generator().manual_seed(seed)
    routing, ids, x, A, Bm = _case(gen, _space(), 5, (5, 77), 200, 136, torch.bfloat16)
    W, b = _base(gen, 200, 136, torch.bfloat16)
    check_against_oracle(x, A, Bm, routing, ids, routing.space, 0.5, backend=backend, weight=W, bias=b)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_with_dropout_replays_the_same_mask(seed, backend, reentrant):
    """The recomputed forward draws the same dropout seed (checkpoint restores the RNG state)."""
    gen = torch.Generator().manual_seed(seed)
    space = _space()
    torch.manual_seed(seed)
    model = _two_layer_model(space, backend)
    for m in model:
        if isinstance(m, fk.FLixLinear):
            m.dropout = 0.25
    routing = fk.Routing(random_feature_ids(space, 3, gen), space)
    x = torch.randn(3, 6, 12, generator=gen).to(DEVICE).requires_grad_()
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(seed + 1)
        with fk.use_routing(model, routing):
            if checkpointed:
                out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=reentrant)
            else:
                out = model(x)
        out.square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
        x.grad = None
        model.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("path", ["owner", "split", "dy_pass", "dy_pass_splits"])
def test_both_weight_gradient_paths(seed, backend, path):
    if path not in GRAD_PATHS[backend]:
        pytest.skip(f"backend {backend} has no {path} path")
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 40, 41, 41, 75])
    routing, ids, x, A, Bm = _case(gen, _space(), 4, (75,), 18, 21, torch.float32, cu=cu, p_absent=0.1)
    with forced_paths(backend, GRAD_PATHS[backend][path]):
        check_against_oracle(x, A, Bm, routing, ids, routing.space, 0.5, backend=backend, cu=cu)


def test_packed_routing_routes_one_token_per_example_for_decode(seed, backend):
    """After a packed prefill, the same routing routes a (B, in) decode input (no cu_seqlens)."""
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 3, 3, 9, 10])
    routing, ids, x, A, Bm = _case(gen, _space(), 4, (4,), 12, 10, torch.float32, cu=cu)
    W, b = _base(gen, 12, 10, torch.float32)
    check_against_oracle(x, A, Bm, routing, ids, routing.space, 0.5, backend=backend, weight=W, bias=b)


@pytest.mark.parametrize("trainable", ["lora_B_only", "x_only", "nothing"])
def test_partial_gradients(seed, backend, trainable):
    gen = torch.Generator().manual_seed(seed)
    routing, ids, x, A, Bm = _case(gen, _space(), 2, (2, 4), 10, 9, torch.float32)
    x.requires_grad_(trainable == "x_only")
    Bm.requires_grad_(trainable == "lora_B_only")
    out = fk.flix_delta(x, A, Bm, routing, scaling=0.5, backend=backend)
    ref = fk.flix_delta(x, A, Bm, routing, scaling=0.5, backend="torch")
    torch.testing.assert_close(out, ref)
    if trainable == "nothing":
        assert not out.requires_grad
        return
    leaf = x if trainable == "x_only" else Bm
    (got,) = torch.autograd.grad(out.sum(), leaf)
    (want,) = torch.autograd.grad(ref.sum(), leaf)
    torch.testing.assert_close(got, want)


def test_trainable_scaling_is_refused(backend):
    space = _space()
    routing = fk.Routing([[0, 5]], space)
    A, Bm = (t.to(DEVICE) for t in random_adapters(space, 4, 3, torch.Generator().manual_seed(0)))
    scaling = torch.ones(space.num_features, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="scaling tensor requires grad"):
        fk.flix_delta(torch.randn(1, 2, 4, device=DEVICE), A, Bm, routing, scaling=scaling, backend=backend)
