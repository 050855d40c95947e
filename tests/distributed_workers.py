"""Worker functions of tests/test_distributed.py, run on each rank by tests/distributed_launch.py
(which sets up and tears down the gloo process group around them).

Every rank builds the same float64 reference model from the same seed and computes the
single-process result on the concatenated batch itself, so each rank checks its own
distributed result against it. Feature ids and data come from the test's seed (the parent's
``seed`` fixture, so ``FLIX_TEST_SEED`` changes them and a failure's report reruns them).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

import flix_kernels as fk

D_IN, D_HID, D_OUT, L = 12, 16, 10, 5
TOL = dict(rtol=1e-9, atol=1e-10)


def space() -> fk.FeatureSpace:
    return fk.FeatureSpace({"language": [f"l{i}" for i in range(5)], "task": ["t0", "t1", "t2"]},
                           {"language": 4, "task": 2})


def feature_ids(sp: fk.FeatureSpace, batch: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, 2) ids: random language and task, each absent with probability 1/4."""
    lang = torch.randint(0, 5, (batch,), generator=gen)
    task = torch.randint(5, 8, (batch,), generator=gen)
    lang[torch.rand(batch, generator=gen) < 0.25] = -1
    task[torch.rand(batch, generator=gen) < 0.25] = -1
    return torch.stack([lang, task], 1)


def model(seed: int, sp: fk.FeatureSpace) -> nn.Module:
    """Two FLix layers around a GELU, float64, lora_B random (never zero) so every gradient is."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(D_IN, D_HID), nn.GELU(), nn.Linear(D_HID, D_OUT)).double()
    fk.inject(m, sp, target_modules=["0", "2"], init="gaussian")
    with torch.no_grad():
        for _, layer in fk.flix_layers(m):
            layer.lora_B.normal_()
    return m


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def lora_state(m: nn.Module) -> dict:
    return {f"{n.removeprefix('module.')}.{p}": full(getattr(layer, p)).detach().clone()
            for n, layer in fk.flix_layers(m) for p in ("lora_A", "lora_B")}


def assert_states_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m: f"{what} {k}: {m}")


def data_parallel(rank: int, world: int, seed: int, out_dir: str) -> None:
    """DDP and FSDP2 (fully_shard) against single-process training on the concatenated batch:
    gradients of the first step and parameters after three SGD steps, each rank with its own
    routing (the last rank's batch has no feature at all in step 0). Then save_adapters from
    the sharded model (rank 0 writes) and load_adapters before and after sharding."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    sp = space()
    per_rank, steps = 3, 3
    gen = torch.Generator().manual_seed(seed)  # the same stream on every rank
    batches = []
    for step in range(steps):
        ids = feature_ids(sp, world * per_rank, gen)
        if step == 0:
            ids[-per_rank:] = -1  # the last rank routes no feature: its update is zero, its grads too
        batches.append((ids, torch.randn(world * per_rank, L, D_IN, generator=gen, dtype=torch.float64),
                        torch.randn(world * per_rank, L, D_OUT, generator=gen, dtype=torch.float64)))

    def train(m, shard_batch: bool, record_grads: bool):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        grads = None
        for ids, x, y in batches:
            if shard_batch:
                sl = slice(rank * per_rank, (rank + 1) * per_rank)
                ids, x, y = ids[sl], x[sl], y[sl]
            fk.set_routing(m, fk.Routing(ids, sp))
            loss = torch.nn.functional.mse_loss(m(x), y)
            opt.zero_grad()
            loss.backward()
            if record_grads and grads is None:
                grads = {n: full(p.grad).clone() for n, p in m.named_parameters() if p.grad is not None}
            opt.step()
        return grads

    ref = model(seed, sp)
    ref_grads = train(ref, shard_batch=False, record_grads=True)
    ref_grads = {n.replace("module.", ""): g for n, g in ref_grads.items()}
    assert set(ref_grads) == {f"{l}.{p}" for l in ("0", "2") for p in ("lora_A", "lora_B")}

    # DDP: only the lora parameters require grad, so only they are reduced.
    ddp = DDP(model(seed, sp))
    grads = train(ddp, shard_batch=True, record_grads=True)
    assert_states_equal({n.replace("module.", ""): g for n, g in grads.items()}, ref_grads, "DDP step-0 grads")
    assert_states_equal(lora_state(ddp), lora_state(ref), "DDP params after 3 steps")

    # FSDP2: every FLix layer and the root sharded over all ranks (frozen base weights included).
    mesh = init_device_mesh("cpu", (world,))
    fsdp = model(seed, sp)
    for _, layer in fk.flix_layers(fsdp):
        fully_shard(layer, mesh=mesh)
    fully_shard(fsdp, mesh=mesh)
    assert type(fsdp[0].lora_A).__name__ == "DTensor"
    grads = train(fsdp, shard_batch=True, record_grads=True)
    assert_states_equal(grads, ref_grads, "FSDP2 step-0 grads")
    assert_states_equal(lora_state(fsdp), lora_state(ref), "FSDP2 params after 3 steps")

    # save_adapters from the sharded model: gathered on every rank, written once by rank 0.
    path = os.path.join(out_dir, "fsdp_adapters")
    fk.save_adapters(fsdp, path)
    assert os.path.isfile(os.path.join(path, "flix_adapters.safetensors"))  # the barrier held every rank
    # rank 0's write fails (the path is a file): every rank raises, none hangs
    blocked = os.path.join(out_dir, "a_file")
    if rank == 0:
        open(blocked, "w").close()
    dist.barrier()
    import pytest

    with pytest.raises((OSError, RuntimeError)) as err:
        fk.save_adapters(fsdp, blocked)
    assert rank == 0 or "rank 0 failed" in str(err.value)
    # load_adapters into a plain model, into a sharded one, and into one sharded after loading.
    plain = model(seed + 1, sp)
    fk.load_adapters(plain, path)
    assert_states_equal(lora_state(plain), lora_state(ref), "loaded into an unsharded model")
    after = model(seed + 1, sp)
    for _, layer in fk.flix_layers(after):
        fully_shard(layer, mesh=mesh)
    fk.load_adapters(after, path)
    assert_states_equal(lora_state(after), lora_state(ref), "loaded after fully_shard")
    before = model(seed + 1, sp)
    fk.load_adapters(before, path)
    for _, layer in fk.flix_layers(before):
        fully_shard(layer, mesh=mesh)
    assert_states_equal(lora_state(before), lora_state(ref), "loaded before fully_shard")
    # the sharded model loaded after sharding still runs forward and backward (a smoke check)
    fk.set_routing(after, fk.Routing(batches[0][0][rank * per_rank:(rank + 1) * per_rank], sp))
    after(batches[0][1][rank * per_rank:(rank + 1) * per_rank]).sum().backward()


def tensor_parallel(rank: int, world: int, seed: int, out_dir: str) -> None:
    """A FLix MLP (ColwiseFLix up, RowwiseFLix down) against the unsharded model: output, dx and
    every gradient, for a mixed routing (grouped strategy), a uniform one (dense) and one with
    no feature; the all-reduces are exactly the base's own plus one T x R_max tensor per layer.
    Then save/load through the sharded layers, with 4 ranks FSDP2 x TP on a 2-D mesh, and the
    styles' errors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from flix_kernels.distributed import ColwiseFLix, RowwiseFLix

    sp = space()
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(seed)  # identical inputs and routings on every TP rank
    B = 4
    ref = model(seed, sp)
    tp = parallelize_module(model(seed, sp), mesh, {"0": ColwiseFLix(), "2": RowwiseFLix()})
    assert tp[0].base_layer.weight.to_local().shape == (D_HID // world, D_IN)
    assert tp[2].lora_A.to_local().shape == (sp.total_rank, D_HID // world)

    sizes: list[int] = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(t, *args, **kwargs):
        sizes.append(t.numel())
        return real_all_reduce(t, *args, **kwargs)

    uniform = torch.tensor([[1, 6]] * B)
    mixed = feature_ids(sp, B, gen)
    mixed[0] = torch.tensor([2, 5])  # at least one example with both groups active
    lengths = torch.tensor([3, 7, 1, 5])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    from flix_kernels.backends import torch_backend

    # (name, feature ids, cu_seqlens, forced torch-backend strategy)
    cases = [("mixed", mixed, None, None), ("mixed, dense", mixed, None, "dense"),
             ("mixed, grouped", mixed, None, "grouped"), ("packed", mixed, cu, None),
             ("packed, grouped", mixed, cu, "grouped"), ("uniform", uniform, None, None),
             ("no feature", torch.full((B, 2), -1), None, None)]
    for what, ids, cu_seqlens, strategy in cases:
        torch_backend.FORCE_STRATEGY = strategy
        routing = fk.Routing(ids, sp, cu_seqlens=cu_seqlens)
        tokens = (int(cu_seqlens[-1]),) if cu_seqlens is not None else (B, L)
        x = torch.randn(*tokens, D_IN, generator=gen, dtype=torch.float64)
        gy = torch.randn(*tokens, D_OUT, generator=gen, dtype=torch.float64)
        fk.set_routing(ref, routing)
        fk.set_routing(tp, routing)
        xr, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        want = ref(xr)
        want.backward(gy)
        dist.all_reduce = counting_all_reduce
        try:
            sizes.clear()
            got = tp(xt)
            got.backward(gy)
        finally:
            dist.all_reduce = real_all_reduce
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{what}: output {m}")
        torch.testing.assert_close(xt.grad, xr.grad, **TOL, msg=lambda m: f"{what}: dx {m}")
        for n, layer in fk.flix_layers(tp):
            for p in ("lora_A", "lora_B"):
                g, w = full(getattr(layer, p).grad), getattr(dict(fk.flix_layers(ref))[n], p).grad
                torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{what}: {n}.{p} grad {m}")
        torch_backend.FORCE_STRATEGY = None
        T = x.shape[:-1].numel()
        rest = list(sizes)
        for n in (T * D_IN, T * D_OUT):  # column: dx in backward; row: the partial output in forward
            assert n in rest, f"{what}: the base's all-reduce of {n} elements is missing from {sizes}"
            rest.remove(n)
        if routing.max_active_rank:  # one h (or dh) per layer: at most T x R_max (2T x R_max packed, whose
            # grouped chunks pad) unless a strategy is forced
            bound = (2 if cu_seqlens is not None else 1) * T * routing.max_active_rank
            bound = bound if strategy is None else 2 * T * sp.total_rank
            assert len(rest) == 2 and rest[0] == rest[1] and 0 < rest[0] <= bound, \
                f"{what}: low-rank all-reduces {rest}, expected two of at most {bound}"
        else:
            assert rest == [], f"{what}: no feature routed, yet low-rank all-reduces {rest}"
        ref.zero_grad()
        tp.zero_grad()

    # autocast: the TP model returns what the unsharded one does (dtype included), in bf16
    ref32, tp32 = model(seed, sp).float(), model(seed, sp).float()
    parallelize_module(tp32, mesh, {"0": ColwiseFLix(), "2": RowwiseFLix()})
    fk.set_routing(ref32, routing)
    fk.set_routing(tp32, routing)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = ref32(x.float()), tp32(x.float())
    assert got.dtype == want.dtype == torch.bfloat16, (got.dtype, want.dtype)
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)

    # TP ranks given different routings: every rank raises, none hangs
    import pytest

    bad = fk.Routing(torch.tensor([[rank % 5, 5]] * B), sp)
    fk.set_routing(tp, bad)
    with pytest.raises(ValueError, match="different routings"):
        tp(x)

    # DTensor hand-over between the layers (use_local_output=False) gives the same result
    dt = parallelize_module(model(seed, sp), mesh, {"0": ColwiseFLix(use_local_output=False),
                                                    "2": RowwiseFLix(use_local_output=False)})
    fk.set_routing(dt, routing)
    fk.set_routing(ref, routing)
    out = dt(x)
    assert type(out).__name__ == "DTensor"
    torch.testing.assert_close(out.full_tensor(), ref(x), **TOL)

    # save from the sharded layers, load back into a sharded model and an unsharded one
    with torch.no_grad():
        for _, layer in fk.flix_layers(ref):
            layer.lora_A.mul_(1.5)
    fresh = parallelize_module(model(seed, sp), mesh, {"0": ColwiseFLix(), "2": RowwiseFLix()})
    path = os.path.join(out_dir, "tp_adapters")
    if rank == 0:  # the reference is unsharded: rank 0 alone may save it
        fk.save_adapters(ref, path)
    dist.barrier()
    fk.load_adapters(fresh, path)
    assert_states_equal(lora_state(fresh), lora_state(ref), "loaded into tensor-parallel layers")
    path2 = os.path.join(out_dir, "tp_adapters_from_sharded")
    fk.save_adapters(fresh, path2)
    plain = model(seed + 1, sp)
    fk.load_adapters(plain, path2)
    assert_states_equal(lora_state(plain), lora_state(ref), "saved from tensor-parallel layers")

    if world == 4:
        two_dimensional(rank, seed, sp, out_dir)

    # errors
    with pytest.raises(TypeError, match="FLixLinear"):
        parallelize_module(nn.Linear(4, 4), mesh, ColwiseFLix())
    dropped = parallelize_module(model(seed, sp), mesh, {"0": ColwiseFLix(), "2": RowwiseFLix()})
    fk.set_routing(dropped, routing)
    for i in (0, 2):
        dropped[i].dropout = 0.1
        with pytest.raises(ValueError, match="dropout"):
            dropped(x)
        dropped.eval()
        torch.testing.assert_close(dropped(x), ref(x), **TOL)  # eval: no dropout, no objection
        dropped.train()
        dropped[i].dropout = 0.0
    with pytest.raises(ValueError, match="1-D"):
        parallelize_module(model(seed, sp), init_device_mesh("cpu", (1, world)), {"0": ColwiseFLix()})
    merged = model(seed, sp)
    fk.merge(merged, {"language": "l1"})
    with pytest.raises(RuntimeError, match="merged"):
        parallelize_module(merged, mesh, {"0": ColwiseFLix()})
    with pytest.raises(ValueError, match="sharded on the last dim"):
        from torch.distributed.tensor import Replicate, distribute_tensor
        tp[2](distribute_tensor(torch.randn(B, L, D_HID, dtype=torch.float64), mesh, [Replicate()]))
    odd = nn.Sequential(nn.Linear(D_IN, 3 * world + 1), nn.Linear(3 * world + 1, D_IN)).double()
    fk.inject(odd, sp, target_modules=["0", "1"])
    with pytest.raises(ValueError, match="out_features=.* not divisible"):
        parallelize_module(odd, mesh, {"0": ColwiseFLix()})
    with pytest.raises(ValueError, match="in_features=.* not divisible"):
        parallelize_module(odd, mesh, {"1": RowwiseFLix()})
    with pytest.raises(RuntimeError, match="already tensor-parallel"):
        parallelize_module(tp, mesh, {"0": ColwiseFLix()})
    with pytest.raises(RuntimeError, match="tensor-parallel"):
        fk.merge(tp, {"language": "l1"})


def two_dimensional(rank: int, seed: int, sp: fk.FeatureSpace, out_dir: str) -> None:
    """FSDP2 over "dp" (2) on top of FLix tensor parallelism over "tp" (2): gradients equal the
    single-process ones on the concatenated batch; save gathers from the 2-D shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    from flix_kernels.distributed import ColwiseFLix, RowwiseFLix

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    gen = torch.Generator().manual_seed(seed + 2)
    per = 2
    ids = feature_ids(sp, 2 * per, gen)
    x = torch.randn(2 * per, L, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(2 * per, L, D_OUT, generator=gen, dtype=torch.float64)
    ref = model(seed, sp)
    fk.set_routing(ref, fk.Routing(ids, sp))
    torch.nn.functional.mse_loss(ref(x), y).backward()
    m = parallelize_module(model(seed, sp), mesh["tp"], {"0": ColwiseFLix(), "2": RowwiseFLix()})
    for _, layer in fk.flix_layers(m):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(m, mesh=mesh["dp"])
    sl = slice(mesh["dp"].get_local_rank() * per, (mesh["dp"].get_local_rank() + 1) * per)
    fk.set_routing(m, fk.Routing(ids[sl], sp))  # the dp group's own batch, the same on its tp ranks
    torch.nn.functional.mse_loss(m(x[sl]), y[sl]).backward()
    want = {f"{n}.{p}": getattr(layer, p).grad for n, layer in fk.flix_layers(ref) for p in ("lora_A", "lora_B")}
    got = {f"{n}.{p}": full(getattr(layer, p).grad) for n, layer in fk.flix_layers(m) for p in ("lora_A", "lora_B")}
    assert_states_equal(got, want, "FSDP2 x TP gradients")
    path = os.path.join(out_dir, "two_d_adapters")
    fk.save_adapters(m, path)
    plain = model(seed + 1, sp)
    fk.load_adapters(plain, path)
    assert_states_equal(lora_state(plain), lora_state(ref), "saved from 2-D shards")
