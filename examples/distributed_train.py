"""Train FLix adapters with PyTorch's own distributed engine: DDP, FSDP2 or tensor parallelism.

    torchrun --nproc-per-node 2 examples/distributed_train.py --mode ddp|fsdp|tp [--steps 30] [--out DIR]

CPU processes talk over gloo; with ``--device cuda`` (one GPU per process) over NCCL. The
model is a toy: token embedding, residual MLP blocks whose two projections are FLix layers,
and an output head, all frozen but the FLix adapters. The task is next-token prediction on
synthetic sequences whose rule depends on the example's language and task features.

* ddp:  each rank routes its own batch; DistributedDataParallel averages the lora gradients.
* fsdp: every FLix layer and the root are ``fully_shard``-ed; same data split as ddp.
* tp:   every rank routes the same batch; the block projections are ``ColwiseFLix`` (up) and
        ``RowwiseFLix`` (down) over a 1-D mesh, embedding and head replicated.

At the end every rank calls ``save_adapters(model, --out)``: sharded adapters are gathered,
rank 0 writes.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flix_kernels as fk  # noqa: E402

VOCAB, DIM, HIDDEN, BLOCKS, SEQ = 64, 32, 64, 2, 24
LANGUAGES, TASKS = ["en", "fr", "de", "sw"], ["copy", "shift"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class ToyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        h = self.embed(tokens)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def batch(space: fk.FeatureSpace, size: int, gen: torch.Generator):
    """Tokens whose next token is ``(t + offset[language] * (1 + task)) % VOCAB``."""
    lang = torch.randint(0, len(LANGUAGES), (size,), generator=gen)
    task = torch.randint(0, len(TASKS), (size,), generator=gen)
    step = torch.tensor([1, 3, 5, 7])[lang] * (1 + task)
    start = torch.randint(0, VOCAB, (size, 1), generator=gen)
    tokens = (start + step[:, None] * torch.arange(SEQ + 1)) % VOCAB
    ids = torch.stack([lang, len(LANGUAGES) + task], 1)  # feature ids: language, then task
    return tokens[:, :-1], tokens[:, 1:], fk.Routing(ids, space)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["ddp", "fsdp", "tp"], default="ddp")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16, help="examples per rank (tp: per step)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", default="flix-distributed-adapters")
    args = ap.parse_args()

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    space = fk.FeatureSpace({"language": LANGUAGES, "task": TASKS}, 8)
    torch.manual_seed(0)  # the same frozen base and initial adapters on every rank
    model = ToyLM().to(device)
    fk.inject(model, space, target_modules=["up", "down"])

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    if args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if cuda else None)
    elif args.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for _, layer in fk.flix_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        from torch.distributed.tensor.parallel import parallelize_module

        from flix_kernels.distributed import ColwiseFLix, RowwiseFLix

        for block in model.blocks:
            parallelize_module(block, mesh, {"up": ColwiseFLix(), "down": RowwiseFLix()})

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # tp: every rank must see the same batch; ddp/fsdp: each rank its own
    gen = torch.Generator().manual_seed(1 if args.mode == "tp" else 1 + rank)
    for step in range(args.steps):
        tokens, targets, routing = batch(space, args.batch, gen)
        fk.set_routing(model, routing)  # this rank's own routing
        logits = model(tokens.to(device))
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.to(device).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"[{args.mode}, {world} ranks] step {step:3d}  loss {mean.item() / world:.3f}", flush=True)
    fk.save_adapters(model, args.out)  # every rank: sharded adapters are gathered, rank 0 writes
    if rank == 0:
        print(f"adapters saved to {args.out}")
    dist.barrier()  # no rank tears down while another still runs a collective with it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without finalizing the interpreter: gloo's C++ worker threads may still be about to
    # take the GIL (to drop a finished collective's tensors), and CPython < 3.14 ends such a
    # thread during finalization in a way that calls std::terminate ("terminate called without
    # an active exception", SIGABRT) although the run succeeded (pytorch/pytorch#38228). Seen on
    # busy CPU machines; tests/distributed_launch.py explains it in full.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
