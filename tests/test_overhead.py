"""The host path: the launch door sees every launch, the per-routing call cache keeps every
error and every change of the inputs visible, and the overhead mode checks before it times."""

import pytest
import torch

import flix_kernels as fk
from flix_kernels import cuda as bridge
from conftest import DEVICE, assert_close, random_adapters, random_feature_ids, random_space
from flix_kernels import _launch
from flix_kernels.backends import torch_backend
from flix_kernels.bench import overhead
from flix_kernels.reference import flix_linear_reference

triton_available = pytest.mark.skipif(fk.backends.unavailable_reason("triton", DEVICE) is not None,
                                      reason="the Triton backend cannot run here")


class _CountingKernel:
    """Stands in for a Triton kernel and counts the launches that reach it by any route."""

    def __init__(self, kernel, counts):
        self.kernel, self.counts = kernel, counts
        self.__name__ = kernel.__name__

    def __getitem__(self, grid):
        self.counts[self.__name__] = self.counts.get(self.__name__, 0) + 1
        return self.kernel[grid]


def _layer_problem(seed, token_shape=(5, 3), in_f=24, out_f=20, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    space = random_space(gen, num_groups=2)
    ids = random_feature_ids(space, token_shape[0], gen, 0.2)
    A, B = random_adapters(space, in_f, out_f, gen, dtype)
    x = torch.randn(*token_shape, in_f, generator=gen, dtype=dtype)
    W = torch.randn(out_f, in_f, generator=gen, dtype=dtype) / in_f**0.5
    return fk.Routing(ids, space), ids, space, x.to(DEVICE), W.to(DEVICE), A.to(DEVICE), B.to(DEVICE)


def _forward_backward(backend, routing, x, W, A, B):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B)]
    y = fk.flix_linear(leaves[0], W, None, leaves[1], leaves[2], routing, scaling=0.5, backend=backend)
    y.sum().backward()
    return y, [t.grad for t in leaves]


@triton_available
@pytest.mark.parametrize("token_shape", [(5, 3), (6,), (3, 40)])
def test_the_launch_door_sees_every_triton_launch(monkeypatch, seed, token_shape):
    from flix_kernels.triton import common, expand, shrink, weight_grad

    reached = {}
    for family in (common, expand, shrink, weight_grad):  # every module that defines or launches a kernel
        for name in [n for n in dir(family) if n.endswith("_kernel")]:
            monkeypatch.setattr(family, name, _CountingKernel(getattr(family, name), reached))
    routing, ids, space, x, W, A, B = _layer_problem(seed, token_shape)
    with _launch.recording(run=False) as skipped:
        _forward_backward("triton", routing, x, W, A, B)
    assert skipped.total >= 4 and not reached, f"launches outside the door: {reached}"
    with _launch.recording(run=True) as ran:
        y, grads = _forward_backward("triton", routing, x, W, A, B)
    assert ran.counts == skipped.counts
    assert sum(reached.values()) == ran.total
    want = flix_linear_reference(x.double(), W.double(), None, A.double(), B.double(), ids, space.rank_offsets, 0.5)
    assert_close(y, want, torch.float32)


def test_a_recording_restores_the_outer_one():
    with _launch.recording(run=True) as outer:
        with _launch.recording(run=False) as inner:
            assert _launch._RECORD is inner
        assert _launch._RECORD is outer
    assert _launch._RECORD is None


def test_the_call_cache_keeps_errors_as_clear_as_the_first_call(seed):
    routing, ids, space, x, W, A, B = _layer_problem(seed)
    fk.flix_linear(x, W, None, A, B, routing, scaling=0.5, backend="torch")
    with pytest.raises(TypeError, match="weight dtype torch.float64 does not match x dtype torch.float32"):
        fk.flix_linear(x, W.double(), None, A, B, routing, scaling=0.5, backend="torch")
    with pytest.raises(ValueError, match="dropout_p must be in"):
        fk.flix_linear(x, W, None, A, B, routing, scaling=0.5, dropout_p=float("nan"), backend="torch")
    with pytest.raises(ValueError, match="does not match the routing"):
        fk.flix_linear(x[:2], W, None, A, B, routing, scaling=0.5, backend="torch")
    with pytest.raises(TypeError, match="scaling must be a float"):
        fk.flix_linear(x, W, None, A, B, routing, scaling="0.5", backend="torch")
    with pytest.raises(TypeError, match="routing must be a flix_kernels.Routing"):
        fk.flix_linear(x, W, None, A, B, ids, scaling=0.5, backend="torch")
    with pytest.raises(TypeError, match="x must be a tensor"):
        fk.flix_linear(x.tolist(), W, None, A, B, routing, scaling=0.5, backend="torch")


def test_the_call_cache_sees_a_new_float_scale_and_an_in_place_change_of_the_scaling(seed):
    routing, ids, space, x, W, A, B = _layer_problem(seed)
    ref = lambda s: flix_linear_reference(x.double(), W.double(), None, A.double(), B.double(), ids,  # noqa: E731
                                          space.rank_offsets, s)
    for s in (0.5, 2.0):
        assert_close(fk.flix_linear(x, W, None, A, B, routing, scaling=s, backend="torch"), ref(s), torch.float32)
    scaling = torch.full((space.num_features,), 0.5, device=DEVICE)
    assert_close(fk.flix_linear(x, W, None, A, B, routing, scaling=scaling, backend="torch"), ref(0.5), torch.float32)
    scaling.mul_(3.0)  # the same tensor, changed in place
    assert_close(fk.flix_linear(x, W, None, A, B, routing, scaling=scaling, backend="torch"),
                 ref(scaling.cpu().double()), torch.float32)
    layer = fk.FLixLinear(x.shape[-1], W.shape[0], space, bias=False, init="gaussian").to(DEVICE)
    torch.nn.init.normal_(layer.lora_B)
    before = layer(x, routing=routing)
    layer.set_scaling(alpha=24.0)  # a new scaling tensor (the default alpha is 8)
    assert not torch.allclose(layer(x, routing=routing), before)


def test_the_call_cache_follows_the_forced_strategy(monkeypatch, seed):
    gen = torch.Generator().manual_seed(seed)
    space = fk.FeatureSpace({"a": ["x", "y"], "b": ["u", "v"]}, 4)
    routing = fk.Routing(torch.tensor([[0, 2]] * 3), space)  # one feature set: dense
    A, B = random_adapters(space, 8, 6, gen, torch.float32)
    x = torch.randn(3, 2, 8, generator=gen)
    seen = []
    original = torch_backend._update

    def spy(p, *args, **kwargs):
        seen.append(p.strategy)
        return original(p, *args, **kwargs)

    monkeypatch.setattr(torch_backend, "_update", spy)
    fk.flix_delta(x, A, B, routing, scaling=0.5, backend="torch")
    monkeypatch.setattr(torch_backend, "FORCE_STRATEGY", "grouped")
    fk.flix_delta(x, A, B, routing, scaling=0.5, backend="torch")
    assert seen == ["dense", "grouped"]


def test_the_overhead_mode_checks_times_and_counts(seed):
    record = overhead.measure(torch.device("cpu"), rep_ms=1.0, e2e=False)
    assert not record["failures"], record["failures"]
    names = {r["variant"] for r in record["rows"]}
    assert {"nn.Linear (frozen)", "ours: torch"} <= names
    for r in record["rows"]:
        assert r["median_us"] > 0 and r["p20_us"] <= r["median_us"] <= r["p80_us"]
        assert r["launches"]["total"] >= 1
    assert set(record["checks"]) == {f"{v} T={t}" for v in names for t in overhead.TOKENS}
    if fk.backends.unavailable_reason("triton", "cpu") is None:
        fwd = [r for r in record["rows"] if r["variant"] == "ours: triton" and r["mode"] == "forward"]
        assert fwd and all(r["launches_skipped"] and r["launches"]["kernels"] == 2 for r in fwd)
    if bridge._C is not None:  # the CUDA backend's Python path, timed on a CPU with its launches skipped
        fwd = [r for r in record["rows"] if r["variant"] == "ours: cuda" and r["mode"] == "forward"]
        assert len(fwd) == len(overhead.TOKENS)
        for r in fwd:  # the decode path: one call into the extension, no torch op
            assert r["launches_skipped"] and r["launches"]["by_kernel"] == {"cuda:decode_linear": 1}, r["launches"]
            assert r["launches"]["torch_ops"] == 0
        assert all(record["checks"][f"ours: cuda T={t}"].startswith("not checked here") for t in overhead.TOKENS)


def test_the_overhead_mode_does_not_time_a_wrong_variant(monkeypatch):
    original = torch_backend._call

    def off_by_a_little(*args, **kwargs):
        return original(*args, **kwargs) * 1.01

    monkeypatch.setattr(torch_backend, "_call", off_by_a_little)
    record = overhead.measure(torch.device("cpu"), rep_ms=1.0, e2e=False)
    assert record["failures"] and all("ours: torch" in f for f in record["failures"])
    assert not [r for r in record["rows"] if r["variant"] == "ours: torch"]


def test_layers_sharing_a_routing_keep_their_own_scales(seed):
    routing, ids, space, x, W, A, B = _layer_problem(seed)
    scales = [torch.full((space.num_features,), s, device=DEVICE) for s in (0.5, 3.0)]
    for _ in range(2):  # alternating, as the layers of a model do
        for s in scales:
            want = flix_linear_reference(x.double(), W.double(), None, A.double(), B.double(), ids,
                                         space.rank_offsets, s.cpu().double())
            assert_close(fk.flix_linear(x, W, None, A, B, routing, scaling=s, backend="torch"), want, torch.float32)


@triton_available
@pytest.mark.parametrize("tokens", overhead.TOKENS)
def test_a_triton_layer_launches_at_most_seven_kernels_per_step_at_decode_sizes(tokens):
    layer = overhead._variants(torch.device(DEVICE), torch.float32, tokens, ["triton"])[0][-1]
    assert overhead.check(layer) < 1e-4
    fwd, step = overhead.launches(layer.forward), overhead.launches(layer.forward_backward)
    assert fwd["total"] == 3, fwd  # shrink, the base GEMM, expand
    assert step["total"] <= overhead.MAX_LAUNCHES, step


def test_the_direct_function_apply_matches_function_apply_and_defers_under_transforms(seed, monkeypatch):
    """flix_kernels._autograd.apply: the same output and gradients as Function.apply, and the
    full Function.apply whenever functorch transforms are active."""
    from flix_kernels import _autograd

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, s):
            ctx.s = s
            return x * s

        @staticmethod
        def backward(ctx, g):
            return g * ctx.s, None

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    y = _autograd.apply(Scale, x, 3.0)
    want = Scale.apply(x, 3.0)
    assert torch.equal(y, want) and y.grad_fn is not None
    assert torch.equal(torch.autograd.grad(y.sum(), x)[0], torch.full_like(x, 3.0))
    calls = []
    original = Scale.apply.__func__
    monkeypatch.setattr(Scale, "apply", classmethod(lambda cls, *a: calls.append(a) or original(cls, *a)))
    monkeypatch.setattr(_autograd, "_transforms_active", lambda: True)
    assert torch.equal(_autograd.apply(Scale, x, 2.0), x * 2.0) and len(calls) == 1
