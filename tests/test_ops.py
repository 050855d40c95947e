"""flix_delta / flix_linear (backend "torch") against the float64 per-feature loop oracle."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flix_kernels as fk
from conftest import assert_close, check_against_oracle, random_adapters, random_feature_ids, random_scaling, random_space
from flix_kernels.backends import torch_backend
from flix_kernels.reference import flix_delta_reference, flix_linear_reference

ODD_DIMS = [1, 7, 97, 1000]


def _inputs(gen, space, B, token_shape, in_f, out_f, dtype, p_absent=0.25, cu=None):
    ids = random_feature_ids(space, B, gen, p_absent)
    A, Bm = random_adapters(space, in_f, out_f, gen, dtype)
    x = torch.randn(*token_shape, in_f, generator=gen, dtype=torch.float64).to(dtype)
    return fk.Routing(ids, space, cu_seqlens=cu), ids, x, A, Bm


def _check_forward_and_grads(*args, **kwargs):
    check_against_oracle(*args, backend="torch", **kwargs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(0, 6),
    L=st.integers(0, 5),
    in_f=st.sampled_from(ODD_DIMS[:3] + [16]),
    out_f=st.sampled_from(ODD_DIMS[:3] + [16]),
    p_absent=st.sampled_from([0.0, 0.3, 1.0]),
    single_token=st.booleans(),
    tensor_scale=st.booleans(),
    strategy=st.sampled_from(["auto", "dense", "grouped"]),
)
def test_batched_matches_oracle(seed, B, L, in_f, out_f, p_absent, single_token, tensor_scale, strategy):
    gen = torch.Generator().manual_seed(seed)
    space = random_space(gen, max_rank=16)
    shape = (B,) if single_token else (B, L)
    with _forced(strategy):
        routing, ids, x, A, Bm = _inputs(gen, space, B, shape, in_f, out_f, torch.float64, p_absent)
        scaling = random_scaling(space, gen, torch.float64) if tensor_scale else 0.7
        _check_forward_and_grads(x, A, Bm, routing, ids, space, scaling, torch.float64)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    lengths=st.lists(st.integers(0, 9), min_size=0, max_size=6),
    leading_one=st.booleans(),
    strategy=st.sampled_from(["auto", "dense", "grouped"]),
)
def test_packed_matches_oracle(seed, lengths, leading_one, strategy):
    gen = torch.Generator().manual_seed(seed)
    space = random_space(gen)
    cu = torch.tensor([0] + lengths).cumsum(0)
    T = int(cu[-1])
    shape = (1, T) if leading_one else (T,)
    with _forced(strategy):
        routing, ids, x, A, Bm = _inputs(gen, space, len(lengths), shape, 13, 11, torch.float64, cu=cu)
        _check_forward_and_grads(x, A, Bm, routing, ids, space, random_scaling(space, gen, torch.float64),
                                 torch.float64, cu=cu)


class _forced:
    """Force the torch backend's strategy for one block ("auto": the backend decides; "dense" applies
    only where it is exact, one feature set for the whole batch)."""

    def __init__(self, strategy):
        self.strategy = None if strategy == "auto" else strategy

    def __enter__(self):
        torch_backend.FORCE_STRATEGY = self.strategy

    def __exit__(self, *exc):
        torch_backend.FORCE_STRATEGY = None


def test_dense_for_one_feature_set_and_grouped_for_many():
    space = fk.FeatureSpace({"language": [f"l{i}" for i in range(64)]}, 16)
    same = fk.Routing([[3]] * 8, space)
    many = fk.Routing([[i] for i in range(0, 64, 2)], space)
    cpu = torch.device("cpu")
    assert torch_backend.plan(same, same.layout((8, 128)), cpu).strategy == "dense"
    assert torch_backend.plan(many, many.layout((32, 128)), cpu).strategy == "grouped"
    with _forced("grouped"):
        fresh = fk.Routing([[3]] * 8, space)
        assert torch_backend.plan(fresh, fresh.layout((8, 4)), cpu).strategy == "grouped"


@pytest.mark.parametrize("in_f,out_f", [(1, 1), (7, 97), (1000, 7), (97, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_odd_shapes_and_dtypes_with_bias(seed, in_f, out_f, dtype):
    gen = torch.Generator().manual_seed(seed)
    space = fk.FeatureSpace({"language": ["a", "b", "c"], "task": ["x", "y"], "domain": ["d"]},
                            {"language": 64, "task": 1, "domain": 5})
    routing, ids, x, A, Bm = _inputs(gen, space, 3, (3, 4), in_f, out_f, dtype)
    W = (torch.randn(out_f, in_f, generator=gen, dtype=torch.float64) / in_f**0.5).to(dtype)
    b = torch.randn(out_f, generator=gen, dtype=torch.float64).to(dtype)
    _check_forward_and_grads(x, A, Bm, routing, ids, space, random_scaling(space, gen), dtype, weight=W, bias=b)


def test_weight_and_bias_gradients_when_trainable(seed):
    gen = torch.Generator().manual_seed(seed)
    space = random_space(gen, num_groups=2)
    routing, ids, x, A, Bm = _inputs(gen, space, 4, (4, 3), 9, 5, torch.float64)
    W = torch.randn(5, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = fk.flix_linear(x, W, b, A, Bm, routing, scaling=2.0)
    W2, b2 = W.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    ref = flix_linear_reference(x, W2, b2, A, Bm, ids, space.rank_offsets, 2.0)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    assert_close(W.grad, W2.grad)
    assert_close(b.grad, b2.grad)


@pytest.mark.parametrize("case", ["all_same", "all_different", "none", "skewed"])
def test_routing_extremes(seed, case):
    gen = torch.Generator().manual_seed(seed)
    space = fk.FeatureSpace({"language": [f"l{i}" for i in range(40)], "task": ["t0", "t1", "t2"]}, {"language": 8, "task": 4})
    B = 40
    if case == "all_same":
        ids = torch.tensor([[5, 41]] * B)
    elif case == "all_different":
        ids = torch.stack([torch.arange(B), 40 + torch.arange(B) % 3], 1)
    elif case == "none":
        ids = torch.full((B, 2), -1)
    else:  # one feature set on almost every example, a few others
        ids = torch.tensor([[3, 40]] * B)
        ids[7], ids[30] = torch.tensor([9, -1]), torch.tensor([-1, 42])
    routing = fk.Routing(ids, space)
    A, Bm = random_adapters(space, 24, 20, gen, torch.float64)
    x = torch.randn(B, 3, 24, generator=gen, dtype=torch.float64)
    _check_forward_and_grads(x, A, Bm, routing, ids, space, 0.5, torch.float64)


def test_no_feature_anywhere_still_gives_zero_gradients():
    space = fk.FeatureSpace({"language": ["a", "b"]}, 4)
    routing = fk.Routing([[-1], [-1]], space)
    A = torch.randn(4 * 2, 6, requires_grad=True)
    Bm = torch.randn(5, 8, requires_grad=True)
    x = torch.randn(2, 3, 6, requires_grad=True)
    d = fk.flix_delta(x, A, Bm, routing, scaling=1.0)
    assert torch.equal(d, torch.zeros(2, 3, 5))
    d.sum().backward()
    assert torch.equal(A.grad, torch.zeros_like(A)) and torch.equal(Bm.grad, torch.zeros_like(Bm))


def test_dropout_with_fixed_generator_matches_oracle_with_same_mask(seed):
    gen = torch.Generator().manual_seed(seed)
    space = random_space(gen, num_groups=3)
    routing, ids, x, A, Bm = _inputs(gen, space, 5, (5, 6), 17, 9, torch.float64)
    p = 0.35
    out = fk.flix_delta(x, A, Bm, routing, scaling=1.5, dropout_p=p, generator=torch.Generator().manual_seed(seed))
    mask = torch_backend.dropout_mask((30, 17), p, torch.Generator().manual_seed(seed), "cpu")
    ref = flix_delta_reference(x, A, Bm, ids, space.rank_offsets, 1.5, dropout_mask=mask, dropout_p=p)
    assert_close(out, ref)
    assert 0.25 < 1 - mask.float().mean().item() < 0.45
    again = fk.flix_delta(x, A, Bm, routing, scaling=1.5, dropout_p=p, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out, again)
    no_drop = fk.flix_delta(x, A, Bm, routing, scaling=1.5)
    assert not torch.allclose(out, no_drop)


def test_adapters_in_float32_with_half_input_compute_in_float32(seed):
    gen = torch.Generator().manual_seed(seed)
    space = random_space(gen, num_groups=2)
    routing, ids, x, A, Bm = _inputs(gen, space, 3, (3, 5), 33, 21, torch.float32)
    out = fk.flix_delta(x.to(torch.bfloat16), A, Bm, routing, scaling=1.0)
    assert out.dtype == torch.bfloat16
    ref = flix_delta_reference(x.to(torch.bfloat16).double(), A.double(), Bm.double(), ids, space.rank_offsets, 1.0)
    assert_close(out, ref, torch.bfloat16)


def test_metadata_is_reused_across_layers_and_calls():
    space = fk.FeatureSpace({"language": ["a", "b", "c"]}, 2)
    routing = fk.Routing([[0], [2]], space)
    A, Bm = torch.randn(6, 4), torch.randn(3, 6)
    x = torch.randn(2, 5, 4)
    fk.flix_delta(x, A, Bm, routing, scaling=1.0)
    n = len(routing._cache)
    for _ in range(3):
        fk.flix_delta(x, A, Bm, routing, scaling=1.0)
    assert len(routing._cache) == n


def _bad_call(kind):
    space = fk.FeatureSpace({"language": ["a", "b"]}, 2)
    routing = fk.Routing([[0], [1]], space)
    x, A, Bm, W = torch.randn(2, 3, 4), torch.randn(4, 4), torch.randn(5, 4), torch.randn(5, 4)
    kw = dict(scaling=1.0)
    if kind == "x_features":
        return lambda: fk.flix_delta(torch.randn(2, 3, 5), A, Bm, routing, **kw)
    if kind == "rank":
        return lambda: fk.flix_delta(x, torch.randn(3, 4), torch.randn(5, 3), routing, **kw)
    if kind == "lora_B":
        return lambda: fk.flix_delta(x, A, torch.randn(5, 3), routing, **kw)
    if kind == "dtype_mix":
        return lambda: fk.flix_delta(x, A, Bm.double(), routing, **kw)
    if kind == "int_x":
        return lambda: fk.flix_delta(x.long(), A, Bm, routing, **kw)
    if kind == "weight_shape":
        return lambda: fk.flix_linear(x, torch.randn(5, 3), None, A, Bm, routing, **kw)
    if kind == "weight_dtype":
        return lambda: fk.flix_linear(x, W.double(), None, A, Bm, routing, **kw)
    if kind == "bias_shape":
        return lambda: fk.flix_linear(x, W, torch.randn(4), A, Bm, routing, **kw)
    if kind == "scaling_shape":
        return lambda: fk.flix_delta(x, A, Bm, routing, scaling=torch.ones(3))
    if kind == "scaling_type":
        return lambda: fk.flix_delta(x, A, Bm, routing, scaling="1")
    if kind == "dropout":
        return lambda: fk.flix_delta(x, A, Bm, routing, scaling=1.0, dropout_p=1.0)
    if kind == "tokens":
        return lambda: fk.flix_delta(torch.randn(3, 3, 4), A, Bm, routing, **kw)
    if kind == "routing":
        return lambda: fk.flix_delta(x, A, Bm, [[0], [1]], **kw)
    if kind == "generator_type":
        return lambda: fk.flix_delta(x, A, Bm, routing, scaling=1.0, dropout_p=0.1, generator="cuda")
    if kind == "backend":
        return lambda: fk.flix_delta(x, A, Bm, routing, scaling=1.0, backend="cuda")
    if kind == "backend_name":
        return lambda: fk.flix_delta(x, A, Bm, routing, scaling=1.0, backend="fast")
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, exc, match",
    [
        ("x_features", ValueError, r"x has 5 input features"),
        ("rank", ValueError, r"lora_A has 3 rows .* total_rank 4"),
        ("lora_B", ValueError, r"lora_B must be \(out, total_rank=4\)"),
        ("dtype_mix", TypeError, r"lora_A and lora_B dtypes differ"),
        ("int_x", TypeError, r"x must be a floating-point"),
        ("weight_shape", ValueError, r"weight must be \(out=5, in=4\)"),
        ("weight_dtype", TypeError, r"weight dtype torch.float64 does not match x"),
        ("bias_shape", ValueError, r"bias must be None or a tensor of shape \(5,\)"),
        ("scaling_shape", ValueError, r"one scale per feature, shape \(2,\)"),
        ("scaling_type", TypeError, r"scaling must be a float"),
        ("dropout", ValueError, r"dropout_p must be in \[0, 1\)"),
        ("tokens", ValueError, r"token dimensions \(3, 3\) does not match the routing of 2 examples"),
        ("routing", TypeError, r"routing must be a flix_kernels.Routing"),
        ("generator_type", TypeError, r"generator must be a torch.Generator or None, got str 'cuda'"),
        ("backend", fk.BackendUnavailableError, r"backend 'cuda' is unavailable"),
        ("backend_name", fk.BackendUnavailableError, r"unknown backend 'fast'"),
    ],
)
def test_bad_inputs_raise_clear_errors(kind, exc, match):
    with pytest.raises(exc, match=match):
        _bad_call(kind)()


def test_available_backends_on_cpu():
    assert "torch" in fk.available_backends()
    assert fk.available_backends("cpu")[0] == "torch"


def test_one_routing_serves_prefill_then_decode(seed):
    gen = torch.Generator().manual_seed(seed)
    space = random_space(gen, num_groups=2)
    ids = random_feature_ids(space, 4, gen)
    routing = fk.Routing(ids, space)
    A, Bm = random_adapters(space, 10, 6, gen, torch.float64)
    for shape in [(4, 7), (4, 1), (4, 1), (4,), (4, 3)]:
        x = torch.randn(*shape, 10, generator=gen, dtype=torch.float64)
        got = fk.flix_delta(x, A, Bm, routing, scaling=0.5)
        assert_close(got, flix_delta_reference(x, A, Bm, ids, space.rank_offsets, 0.5))


def test_non_contiguous_input(seed):
    gen = torch.Generator().manual_seed(seed)
    space = random_space(gen, num_groups=2)
    ids = random_feature_ids(space, 3, gen)
    A, Bm = random_adapters(space, 9, 5, gen, torch.float64)
    x = torch.randn(9, 4, 3, generator=gen, dtype=torch.float64).permute(2, 1, 0)  # (3, 4, 9), strided
    assert not x.is_contiguous()
    for strategy in ("dense", "grouped"):
        with _forced(strategy):
            got = fk.flix_delta(x, A, Bm, fk.Routing(ids, space), scaling=1.0)
        assert_close(got, flix_delta_reference(x.contiguous(), A, Bm, ids, space.rank_offsets, 1.0))


def test_packed_routing_also_serves_one_token_per_example(seed):
    """Prefill packed, then decode with (B, in): the same routing, as generation does."""
    gen = torch.Generator().manual_seed(seed)
    space = random_space(gen, num_groups=2)
    ids = random_feature_ids(space, 4, gen)
    routing = fk.Routing(ids, space, cu_seqlens=[0, 3, 3, 5, 9])
    A, Bm = random_adapters(space, 6, 5, gen, torch.float64)
    for shape, cu in [((9,), [0, 3, 3, 5, 9]), ((4,), None), ((4, 1), None)]:
        x = torch.randn(*shape, 6, generator=gen, dtype=torch.float64)
        got = fk.flix_delta(x, A, Bm, routing, scaling=0.5)
        assert_close(got, flix_delta_reference(x, A, Bm, ids, space.rank_offsets, 0.5, cu_seqlens=cu))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a generator on another device)")
def test_a_dropout_generator_on_another_device_is_named():
    space = fk.FeatureSpace({"language": ["a", "b"]}, 2)
    x = torch.randn(2, 3, 4, device="cuda")
    A, Bm = torch.randn(4, 4, device="cuda"), torch.randn(5, 4, device="cuda")
    with pytest.raises(ValueError, match=r"generator is on cpu but x is on cuda"):
        fk.flix_delta(x, A, Bm, fk.Routing([[0], [1]], space), scaling=1.0, dropout_p=0.1, generator=torch.Generator())


@pytest.mark.parametrize("shape", [(5, 3), (5,), (15,)], ids=["batched", "one_token", "packed"])
@pytest.mark.parametrize("strategy", ["grouped", "dense"])
@pytest.mark.parametrize("trainable_base", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
def test_one_node_training_path_matches_oracle(seed, monkeypatch, shape, strategy, trainable_base, contiguous):
    """The one-node training path (base GEMM and update in one Function) is taken for a plain
    training call of either strategy, and its output and all five gradients match the oracle."""
    if strategy == "grouped" and shape == (15,):
        pytest.skip("packed grouped inputs are copied into chunks: the general path")
    gen = torch.Generator().manual_seed(seed)
    space = fk.FeatureSpace({"lang": ["l0", "l1", "l2", "l3"], "task": ["t0", "t1", "t2"]}, {"lang": 3, "task": 2})
    # every example active; several feature sets, or one
    ids = torch.tensor([[0, 4], [1, 4], [3, 6], [0, 5], [2, 6]] if strategy == "grouped" else [[3, 5]] * 5)
    routing = fk.Routing(ids, space, cu_seqlens=torch.tensor([0, 2, 5, 6, 10, 15]) if shape == (15,) else None)
    A, Bm = random_adapters(space, 11, 7, gen, torch.float64)
    x = torch.randn(*shape, 22, generator=gen, dtype=torch.float64)[..., ::2] if not contiguous else \
        torch.randn(*shape, 11, generator=gen, dtype=torch.float64)
    W = torch.randn(7, 11, generator=gen, dtype=torch.float64)
    b = torch.randn(7, generator=gen, dtype=torch.float64)
    scaling = random_scaling(space, gen, torch.float64)
    taken = []
    original = torch_backend._GroupedLinear.forward
    monkeypatch.setattr(torch_backend._GroupedLinear, "forward",
                        staticmethod(lambda *a: taken.append(1) or original(*a)))
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, Bm)]
    base = [t.clone().requires_grad_(trainable_base) for t in (W, b)]
    y = fk.flix_linear(leaves[0], base[0], base[1], leaves[1], leaves[2], routing, scaling=scaling, backend="torch")
    assert taken, f"the {strategy} training call did not take the one-node path"
    assert torch_backend.plan(routing, routing.layout(shape), x.device).strategy == strategy
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, Bm, W, b)]
    cu = routing.cu_seqlens if shape == (15,) else None
    ref = flix_linear_reference(ref_leaves[0], ref_leaves[3], ref_leaves[4], ref_leaves[1], ref_leaves[2], ids,
                                space.rank_offsets, scaling, cu_seqlens=cu)
    assert_close(y, ref)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    wrt = leaves + (base if trainable_base else [])
    got = torch.autograd.grad(y, wrt, g)
    want = torch.autograd.grad(ref, ref_leaves[:len(wrt)], g)
    for a, w in zip(got, want):
        assert_close(a, w)


def test_per_routing_caches_stay_bounded_lrus_that_keep_hot_entries(monkeypatch):
    """One long-lived routing fed 1,000 token lengths: its layouts, plans and validated calls stay
    within cache_limit, a shape used every step is planned and validated once, results stay right."""
    gen = torch.Generator().manual_seed(0)
    space = fk.FeatureSpace({"language": ["a", "b", "c"], "task": ["x", "y"]}, {"language": 2, "task": 3})
    ids = torch.tensor([[0, 3], [2, -1]])
    routing = fk.Routing(ids, space)
    A, Bm = random_adapters(space, 4, 3, gen, torch.float64)
    plans, prepared = [], []
    build_plan, prepare = torch_backend._build_plan, torch_backend.prepare
    monkeypatch.setattr(torch_backend, "_build_plan", lambda r, lay, d: plans.append(lay.key) or build_plan(r, lay, d))
    monkeypatch.setattr(torch_backend, "prepare", lambda r, x, *a: prepared.append(tuple(x.shape)) or prepare(r, x, *a))
    hot = torch.randn(2, 4, generator=gen, dtype=torch.float64)  # one token per example, every step
    hot_out = fk.flix_delta(hot, A, Bm, routing, scaling=0.5, backend="torch")
    assert_close(hot_out, flix_delta_reference(hot, A, Bm, ids, space.rank_offsets, 0.5))
    limit = routing.cache_limit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a thread pool on a busy machine only makes them 50x slower
    try:
        for L in range(2, 1002):
            x = torch.randn(2, L, 4, generator=gen, dtype=torch.float64)
            out = fk.flix_delta(x, A, Bm, routing, scaling=0.5, backend="torch")
            if L % 97 == 0 or L < 5:
                assert_close(out, flix_delta_reference(x, A, Bm, ids, space.rank_offsets, 0.5))
            assert torch.equal(fk.flix_delta(hot, A, Bm, routing, scaling=0.5, backend="torch"), hot_out)
            sizes = len(routing._layouts), len(routing._cache), len(routing.calls)
            assert max(sizes) <= limit, (L, sizes)
    finally:
        torch.set_num_threads(threads)
    assert min(sizes) >= limit - 1  # full, not emptied
    assert plans.count(("batched", 2, 2)) == 1 and prepared.count((2, 4)) == 1  # the hot entries survived
    x = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)  # evicted long ago: built again, still right
    assert_close(fk.flix_delta(x, A, Bm, routing, scaling=0.5, backend="torch"),
                 flix_delta_reference(x, A, Bm, ids, space.rank_offsets, 0.5))
    assert plans.count(("batched", 2, 6)) == 2


def test_packed_routing_with_a_batched_input_is_refused():
    gen = torch.Generator().manual_seed(0)
    space = fk.FeatureSpace({"language": ["a", "b", "c"]}, 2)
    ids = torch.tensor([[0], [2], [1]])
    routing = fk.Routing(ids, space, cu_seqlens=[0, 2, 2, 7])
    A, Bm = random_adapters(space, 4, 3, gen, torch.float64)
    W = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    match = r"\(3, 5\) is batched \(B=3, L=5\) but the routing is packed \(cu_seqlens, T=7 tokens\)"
    with pytest.raises(ValueError, match=match):  # was: cu_seqlens silently ignored
        fk.flix_delta(x, A, Bm, routing, scaling=1.0, backend="torch")
    with pytest.raises(ValueError, match=match):
        fk.flix_linear(x, W, None, A, Bm, routing, scaling=1.0, backend="torch")
    for shape, cu in [((7, 4), routing.cu_seqlens), ((1, 7, 4), routing.cu_seqlens), ((3, 4), None), ((3, 1, 4), None)]:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        assert_close(fk.flix_delta(x, A, Bm, routing, scaling=1.0, backend="torch"),
                     flix_delta_reference(x, A, Bm, ids, space.rank_offsets, 1.0, cu_seqlens=cu))


def test_triton_plan_memo_is_bounded_and_drops_its_oldest_plans(monkeypatch):
    pytest.importorskip("triton")
    from flix_kernels.triton import shrink, tuning

    def plan(T):
        return shrink._shrink_plan(T, 64, 16, 2, False, False, False, torch.float32, torch.device("cpu"))

    saved = dict(tuning.PLANS)
    try:
        tuning.PLANS.clear()
        expected = {T: plan(T) for T in range(1, 41)}  # unbounded: what each shape's plan is
        tuning.PLANS.clear()
        monkeypatch.setattr(tuning, "MAX_PLANS", 8)
        made = 0
        for _ in range(3):
            for T in range(1, 41):
                assert plan(T) == expected[T] and plan(T) is tuning.PLANS[next(reversed(tuning.PLANS))]
                made += 1
                assert len(tuning.PLANS) == min(made, 8)  # once full: one out, one in (not emptied)
        assert [key[1] for key in tuning.PLANS] == list(range(33, 41))  # the newest shapes' plans
    finally:
        tuning.PLANS.clear()
        tuning.PLANS.update(saved)
