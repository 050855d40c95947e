"""per_feature_optimizer: a step leaves the rows of features no example used exactly unchanged
(values and optimizer state), and training equals the same optimizer over separate per-feature
parameters whose unused gradients are None (PEFT-style adapters), step for step."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import flix_kernels as fk
from flix_kernels.reference import token_example_index

SPACE = fk.FeatureSpace({"language": ["en", "fr", "sw", "yo"], "task": ["qa", "mt", "sum"]}, {"language": 3, "task": 2})
DIMS = (6, 10, 5)


def _flix_model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(fk.FLixLinear(DIMS[0], DIMS[1], SPACE, init="gaussian", backend="torch", dtype=torch.float64),
                          nn.Tanh(),
                          fk.FLixLinear(DIMS[1], DIMS[2], SPACE, init="gaussian", backend="torch", dtype=torch.float64))
    for m in model:
        if isinstance(m, fk.FLixLinear):
            m.base_layer.requires_grad_(False)
            with torch.no_grad():
                m.lora_B.normal_(0, 0.3)
    return model


class _Separate(nn.Module):
    """The same layers with one (A_k, B_k) parameter pair per feature; a forward uses only the
    features present in the batch, so the others get no gradient (None), as separate adapters."""

    def __init__(self, flix: nn.Sequential):
        super().__init__()
        offs = SPACE.rank_offsets
        self.bases = [m.base_layer for m in flix if isinstance(m, fk.FLixLinear)]
        self.scales = [m.scaling for m in flix if isinstance(m, fk.FLixLinear)]
        self.A = nn.ParameterList([nn.Parameter(m.lora_A.detach()[offs[k]:offs[k + 1]].clone())
                                   for m in flix if isinstance(m, fk.FLixLinear) for k in range(SPACE.num_features)])
        self.B = nn.ParameterList([nn.Parameter(m.lora_B.detach()[:, offs[k]:offs[k + 1]].clone())
                                   for m in flix if isinstance(m, fk.FLixLinear) for k in range(SPACE.num_features)])

    def layer(self, i, x, ids):
        F_ = SPACE.num_features
        y = self.bases[i](x)
        tok = token_example_index(ids.shape[0], x.shape[:-1])
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        for k in range(F_):
            rows = (ids == k).any(1)[tok].nonzero().flatten()
            if rows.numel():
                d = (x2[rows] @ self.A[i * F_ + k].t() @ self.B[i * F_ + k].t()) * self.scales[i][k]
                y2 = y2.index_add(0, rows, d)
        return y2.view(y.shape)

    def forward(self, x, ids):
        return self.layer(1, torch.tanh(self.layer(0, x, ids)), ids)


def _batches(seed, steps):
    """Batches where "yo" and "sum" are rare (absent from most), and one with no feature at all."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        lang = torch.randint(0, 3 if step % 3 else 4, (4,), generator=gen)
        task = torch.randint(4, 6 if step % 4 else 7, (4,), generator=gen)
        ids = torch.stack([lang, task], 1)
        if step == 2:
            ids = torch.full((4, 2), -1)
        ids[0, 1] = -1  # an absent group
        out.append((ids, torch.randn(4, 3, DIMS[0], generator=gen, dtype=torch.float64)))
    return out


def _loss(y):
    """A bounded regression loss (training must not diverge: chaos would amplify rounding)."""
    return ((y - 0.5).square() * torch.linspace(0.5, 2, y.shape[-1], dtype=y.dtype)).mean()


@pytest.mark.parametrize("opt_class,kw", [(torch.optim.AdamW, dict(lr=0.05, weight_decay=0.1)),
                                          (torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=0.01)),
                                          (torch.optim.Adam, dict(lr=0.05, amsgrad=True))],
                         ids=["AdamW", "SGD-momentum", "Adam-amsgrad"])
def test_training_equals_separate_per_feature_parameters(seed, opt_class, kw):
    flix = _flix_model(seed)
    separate = _Separate(flix)
    opt = fk.per_feature_optimizer(opt_class, flix, **kw)
    ref = opt_class(separate.parameters(), **kw)
    offs = SPACE.rank_offsets
    layers = [m for m in flix if isinstance(m, fk.FLixLinear)]
    for ids, x in _batches(seed, 8):
        before = [(m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in layers]
        _loss(_routed(flix, x, ids)).backward()
        opt.step()
        opt.zero_grad()
        ref_loss = _loss(separate(x, ids))
        if ref_loss.requires_grad:  # a batch using no feature reaches no adapter
            ref_loss.backward()
        ref.step()
        ref.zero_grad()
        used = set(ids[ids >= 0].tolist())
        F_ = SPACE.num_features
        for i, m in enumerate(layers):
            for k in range(F_):
                a, b = m.lora_A[offs[k]:offs[k + 1]], m.lora_B[:, offs[k]:offs[k + 1]]
                torch.testing.assert_close(a, separate.A[i * F_ + k], rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(b, separate.B[i * F_ + k], rtol=1e-10, atol=1e-12)
                if k not in used:  # untouched, bit for bit
                    assert torch.equal(a, before[i][0][offs[k]:offs[k + 1]]), (i, k)
                    assert torch.equal(b, before[i][1][:, offs[k]:offs[k + 1]]), (i, k)
    # the optimizer state is the separate parameters' (step counts per feature included)
    F_ = SPACE.num_features
    for i, (layer, a_views, b_views) in enumerate(opt._flix_slices.views):
        for k in range(F_):
            for view, own in ((a_views[k], separate.A[i * F_ + k]), (b_views[k], separate.B[i * F_ + k])):
                mine, theirs = opt.state.get(view, {}), ref.state.get(own, {})
                assert set(mine) == set(theirs), (i, k)
                for key in mine:
                    torch.testing.assert_close(mine[key], theirs[key], rtol=1e-10, atol=1e-12)


def _routed(model, x, ids):
    with fk.use_routing(model, fk.Routing(ids, SPACE)):
        return model(x)


def test_a_plain_optimizer_moves_unused_rows_and_this_one_does_not(seed):
    """The problem it solves: AdamW over lora_A decays and moves rows of absent features."""
    ids = torch.tensor([[0, 4], [1, -1]])  # languages 2 and 3, tasks 5 and 6 unused
    x = torch.randn(2, 3, DIMS[0], dtype=torch.float64)
    for fair in (False, True):
        model = _flix_model(seed)
        layer = model[0]
        params = [p for p in model.parameters() if p.requires_grad]
        opt = (fk.per_feature_optimizer(torch.optim.AdamW, model, lr=0.1, weight_decay=0.1) if fair
               else torch.optim.AdamW(params, lr=0.1, weight_decay=0.1))
        rows = slice(SPACE.rank_offsets[2], SPACE.rank_offsets[4])
        for _ in range(3):
            before = layer.lora_A[rows].detach().clone()
            _loss(_routed(model, x, ids)).backward()
            opt.step()
            opt.zero_grad()
            assert torch.equal(layer.lora_A[rows], before) == fair


def test_groups_schedulers_closure_and_scaler(seed):
    model = _flix_model(seed)
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    model.register_parameter("extra", extra)
    opt = fk.per_feature_optimizer(torch.optim.AdamW, model, lr=0.01, group_options={"task": {"lr": 0.1}})
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["feature_group"] for g in opt.param_groups] == ["language", "task", "other"]
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.1, 0.01]
    assert opt.param_groups[2]["params"] == [extra]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    ids = torch.tensor([[0, 4], [2, 5]])
    x = torch.randn(2, 3, DIMS[0], dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = _loss(_routed(model, x, ids)) + extra.sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.005, 0.05, 0.005]
    assert not torch.equal(extra.detach(), torch.ones(3, dtype=torch.float64))

    # GradScaler: the views hold their gradient slices before the step, so unscale_ reaches them
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model2 = _flix_model(seed)
    opt2 = fk.per_feature_optimizer(torch.optim.SGD, model2, lr=0.1)
    model3 = _flix_model(seed)
    opt3 = fk.per_feature_optimizer(torch.optim.SGD, model3, lr=0.1)
    scaler.scale(_loss(_routed(model2, x, ids))).backward()
    scaler.step(opt2)
    scaler.update()
    _loss(_routed(model3, x, ids)).backward()
    opt3.step()
    for a, b in zip(model2.parameters(), model3.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bad_arguments_are_named(seed):
    model = _flix_model(seed)
    with pytest.raises(ValueError, match="'domain'"):
        fk.per_feature_optimizer(torch.optim.AdamW, model, group_options={"domain": {"lr": 1.0}})
    with pytest.raises(TypeError, match="Optimizer subclass"):
        fk.per_feature_optimizer(torch.optim.AdamW(model.parameters()), model)
    with pytest.raises(ValueError, match="no FLix layers"):
        fk.per_feature_optimizer(torch.optim.AdamW, nn.Linear(2, 2))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable FLix layers"):
        fk.per_feature_optimizer(torch.optim.AdamW, model)


def test_with_transformers_trainer(seed, tmp_path):
    """Trainer(optimizers=(per_feature_optimizer(...), None)): features no batch used stay exactly
    as they were; the used ones train."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from _models import make_space, randomize_adapters, tiny_llama

    space = make_space(languages=("en", "fr", "sw", "yo"))
    model = tiny_llama(seed).train()
    fk.inject(model, space, target_modules=["q_proj", "down_proj"])
    randomize_adapters(model, torch.Generator().manual_seed(seed), b_scale=0.1)
    fk.accept_feature_ids(model)
    gen = torch.Generator().manual_seed(seed)
    data = [{"input_ids": torch.randint(3, 90, (6,), generator=gen).tolist(),
             "features": {"language": lang, "task": "qa"}} for lang in ("en", "fr") * 4]
    for ex in data:
        ex["labels"] = list(ex["input_ids"])
    before = {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for n, l in fk.flix_layers(model)}
    opt = fk.per_feature_optimizer(torch.optim.AdamW, model, lr=1e-2, weight_decay=0.1)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=fk.FeatureCollator(space),
                         optimizers=(opt, None)).train()
    offs = space.rank_offsets
    for name, layer in fk.flix_layers(model):
        for value in ("sw", "yo", "mt"):
            k = space.index("language" if value != "mt" else "task", value)
            rows = slice(offs[k], offs[k + 1])
            assert torch.equal(layer.lora_A[rows], before[name][0][rows]), (name, value)
            assert torch.equal(layer.lora_B[:, rows], before[name][1][:, rows]), (name, value)
        k = space.index("language", "fr")
        assert not torch.equal(layer.lora_A[offs[k]:offs[k + 1]], before[name][0][offs[k]:offs[k + 1]])


def _hooks(model) -> list[int]:
    """Post-accumulate-grad hooks on every lora_A / lora_B (the dict torch keeps per tensor)."""
    return [len(p._post_accumulate_grad_hooks or {}) for m in model if isinstance(m, fk.FLixLinear)
            for p in (m.lora_A, m.lora_B)]


def test_rebuilding_the_optimizer_leaves_no_hooks_or_gradients_behind(seed):
    """A learning-rate search builds the optimizer over one model again and again: a dropped
    optimizer's hooks must go with it (they once piled up, slowing backward 7-15x after 300
    rebuilds, and kept the views' gradient slices, so the whole adapter gradient, alive). The
    step's cost is counted in ops, not timed (other load on the machine would make times flaky)."""
    import gc
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        """Counts the aten ops run (backward's hooks included): the step's cost, as a number."""

        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    model = _flix_model(seed)
    ids, x = torch.tensor([[0, 4], [1, 5]]), torch.randn(2, 3, DIMS[0], dtype=torch.float64)

    def train_step(opt):
        _loss(_routed(model, x, ids)).backward()
        opt.step()

    def step_ops(opt):
        train_step(opt)  # the first step also creates the optimizer state: count a later one
        opt.zero_grad()
        with CountOps() as count:
            train_step(opt)
            opt.zero_grad()
        return count.ops

    baseline = _hooks(model)
    opt = fk.per_feature_optimizer(torch.optim.AdamW, model, lr=1e-3)
    with_one = _hooks(model)
    assert [h - b for h, b in zip(with_one, baseline)] == [1] * len(baseline)
    first_ops = step_ops(opt)
    del opt
    for i in range(300):
        opt = fk.per_feature_optimizer(torch.optim.AdamW, model, lr=1e-3)
        if i % 100 == 0:  # some of the dropped ones have stepped (their views held gradients)
            train_step(opt)
        del opt
        gc.collect(0)  # the young generation each time; a full collection is slow with torch loaded
    gc.collect()
    assert _hooks(model) == baseline
    opt = fk.per_feature_optimizer(torch.optim.AdamW, model, lr=1e-3)
    assert _hooks(model) == with_one
    # backward + step run as many ops as with the first optimizer (each stale hook ran its own)
    assert step_ops(opt) == first_ops
    # after zero_grad nothing keeps the layers' gradients alive (a stale view's .grad would)
    train_step(opt)
    grads = [weakref.ref(p.grad) for m in model if isinstance(m, fk.FLixLinear) for p in (m.lora_A, m.lora_B)]
    opt.zero_grad()
    gc.collect()
    assert [g() for g in grads] == [None] * len(grads)


def test_close_removes_the_hooks_and_keeps_the_state(seed):
    model = _flix_model(seed)
    ids, x = torch.tensor([[0, 4], [1, 5]]), torch.randn(2, 3, DIMS[0], dtype=torch.float64)
    baseline = _hooks(model)
    opt = fk.per_feature_optimizer(torch.optim.AdamW, model, lr=1e-2)
    _loss(_routed(model, x, ids)).backward()
    opt.step()
    opt.close()
    assert _hooks(model) == baseline
    opt.close()  # idempotent
    views = [v for _, a, b in opt._flix_slices.views for v in (*a, *b)]
    _loss(_routed(model, x, ids)).backward()  # no hook hands the views their slices any more
    assert all(v.grad is None for v in views)
    with pytest.raises(RuntimeError, match="closed.*per_feature_optimizer.*state_dict"):
        opt.step()
    opt.zero_grad()
    # its state moves to a new optimizer over the same model, which steps as before
    state = opt.state_dict()
    assert len(state["state"]) > 0 and all(int(s["step"]) == 1 for s in state["state"].values())
    fresh = fk.per_feature_optimizer(torch.optim.AdamW, model, lr=1e-2)
    fresh.load_state_dict(state)
    _loss(_routed(model, x, ids)).backward()
    fresh.step()
    assert {int(s["step"]) for s in fresh.state_dict()["state"].values()} == {2}
    fresh.close()
    assert _hooks(model) == baseline
