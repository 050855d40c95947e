"""One model called from several threads and asyncio tasks at once, each call with its own
features: every output is exactly the single-threaded one.

The routing of a call (``accept_feature_ids``' ``feature_ids``, ``use_routing``'s block,
``generate``'s batch) belongs to that thread or task; ``set_routing`` stays model-wide, so a
routing set in one thread is seen by forwards running in others (DataParallel replicas,
autograd's worker threads).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import flix_kernels as fk
from _models import make_space, randomize_adapters, tiny_llama, tiny_mlp, token_ids

FEATURES = [{"language": "en", "task": "qa"}, {"language": "fr", "task": "mt"}, {"language": "sw"}, {"task": "mt"},
            {}, {"language": "fr"}]


def _mlp(seed):
    model = tiny_mlp(seed)
    space = make_space()
    fk.inject(model, space, target_modules=["fc1", "fc2", "fc3"])
    randomize_adapters(model, torch.Generator().manual_seed(seed + 1), b_scale=0.5)
    return model.eval(), space


def _run_threads(n, fn):
    """``fn(i)`` in ``n`` threads started together; the exceptions they raised, re-raised here."""
    barrier, errors = threading.Barrier(n), []

    def target(i):
        try:
            barrier.wait()
            fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_accept_feature_ids_from_many_threads_is_exact(seed):
    """The probe: 4 threads x 50 calls with different feature_ids got 181 of 200 wrong logits
    (each other's features) when the routing was stored on the layers."""
    model = tiny_llama(seed)
    space = make_space()
    fk.inject(model, space, target_modules="all-linear")
    randomize_adapters(model, torch.Generator().manual_seed(seed + 1), b_scale=0.5)
    fk.accept_feature_ids(model)
    gen = torch.Generator().manual_seed(seed)
    inputs = [(token_ids(2, 5, gen), [FEATURES[i % len(FEATURES)], FEATURES[(i + 3) % len(FEATURES)]]) for i in range(4)]
    with torch.no_grad():
        want = [model(input_ids=ids, feature_ids=feats).logits for ids, feats in inputs]
    wrong = []

    def work(i):
        ids, feats = inputs[i]
        for _ in range(50):
            with torch.no_grad():
                got = model(input_ids=ids, feature_ids=feats).logits
            if not torch.equal(got, want[i]):
                wrong.append(i)

    _run_threads(4, work)
    assert not wrong, f"{len(wrong)} of 200 forwards used another thread's features"
    assert all(layer._routing is None for _, layer in fk.flix_layers(model))  # nothing left routed model-wide


def test_use_routing_belongs_to_its_thread_and_set_routing_to_every_thread(seed):
    model, space = _mlp(seed)
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(seed))
    routings = [fk.Routing(space.encode([FEATURES[(i + j) % len(FEATURES)] for j in range(3)]), space) for i in range(4)]
    with torch.no_grad():
        want = []
        for r in routings:
            with fk.use_routing(model, r):
                want.append(model(x))
    wrong = []

    def work(i):
        with fk.use_routing(model, routings[i]):
            for _ in range(30):
                with torch.no_grad():
                    if not torch.equal(model(x), want[i]):
                        wrong.append(i)

    _run_threads(4, work)
    assert not wrong
    # A thread without a routing of its own sees none, while another thread has one.
    inside, outside = threading.Event(), threading.Event()
    seen = {}

    def holder():
        with fk.use_routing(model, routings[0]):
            inside.set()
            outside.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(10)
    with pytest.raises(RuntimeError, match="has no routing"):
        model(x)
    outside.set()
    t.join()
    # set_routing is model-wide: a forward in another thread uses it.
    fk.set_routing(model, routings[1])

    def reader():
        with torch.no_grad():
            seen["out"] = model(x)

    t = threading.Thread(target=reader)
    t.start()
    t.join()
    assert torch.equal(seen["out"], want[1])
    with fk.use_routing(model, routings[2]), torch.no_grad():  # a call's routing comes first
        assert torch.equal(model(x), want[2])
    with fk.use_routing(model, None):  # and None means none, not the model-wide one
        with pytest.raises(RuntimeError, match="has no routing"):
            model(x)
    fk.set_routing(model, None)


def _no_grad(fn):
    def call(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)
    return call


def test_asyncio_tasks_keep_their_own_routing_across_awaits(seed):
    model, space = _mlp(seed)
    fk.accept_feature_ids(model)
    x = torch.randn(2, 12, generator=torch.Generator().manual_seed(seed))
    feats = [[FEATURES[i % len(FEATURES)], FEATURES[(i + 1) % len(FEATURES)]] for i in range(6)]
    with torch.no_grad():
        want = [model(x, feature_ids=f) for f in feats]

    async def task(i):
        outs = []
        with fk.use_routing(model, fk.Routing(space.encode(feats[i]), space)):
            for _ in range(5):
                await asyncio.sleep(0)  # every other task runs here, inside its own block
                with torch.no_grad():
                    outs.append(model(x))
                    outs.append(model(x, feature_ids=feats[i]))  # the hook's routing, nested in the block
        # and from a worker thread, which runs with a copy of this task's context (grad mode is
        # per thread: a no_grad block spanning an await would leak into the other tasks)
        outs.append(await asyncio.to_thread(_no_grad(model), x, feature_ids=feats[i]))
        return outs

    async def main():
        return await asyncio.gather(*(task(i) for i in range(len(feats))))

    for i, outs in enumerate(asyncio.run(main())):
        assert all(torch.equal(o, want[i]) for o in outs), f"task {i} saw another task's features"
    assert torch.is_grad_enabled()


def test_generate_from_many_threads_is_exact(seed):
    transformers = pytest.importorskip("transformers")  # noqa: F841
    model = tiny_llama(seed)
    space = make_space()
    fk.inject(model, space, target_modules="all-linear")
    randomize_adapters(model, torch.Generator().manual_seed(seed + 1), b_scale=0.5)
    gen = torch.Generator().manual_seed(seed)
    prompts = [token_ids(2, 4, gen) for _ in range(4)]
    feats = [[FEATURES[i], FEATURES[i + 1]] for i in range(4)]
    args = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, num_beams=2, num_return_sequences=2)
    want = [fk.generate(model, p, feature_ids=f, **args) for p, f in zip(prompts, feats)]
    wrong = []

    def work(i):
        for _ in range(3):
            if not torch.equal(fk.generate(model, prompts[i], feature_ids=feats[i], **args), want[i]):
                wrong.append(i)

    _run_threads(4, work)
    assert not wrong, f"threads {sorted(set(wrong))} generated with another thread's features"
    fk.unload(model)  # the hooks generate installed go with the FLix layers
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_compiled_model_routes_each_thread_by_its_own_feature_ids(seed):
    # 200 calls per thread: with the routing stored on the layers, 10 calls passed; 200 fail.
    model, space = _mlp(seed)
    fk.accept_feature_ids(model)
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(seed))
    feats = [[FEATURES[(i + j) % len(FEATURES)] for j in range(3)] for i in range(3)]
    with torch.no_grad():
        want = [model(x, feature_ids=f) for f in feats]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x, feature_ids=feats[0]), want[0])  # compile once, before the threads
    wrong = []

    def work(i):
        for _ in range(200):
            with torch.no_grad():
                if not torch.equal(compiled(x, feature_ids=feats[i]), want[i]):
                    wrong.append(i)

    _run_threads(3, work)
    assert not wrong
