"""Quick start: train FLix adapters on a frozen model, then save, reload, merge, export and unload.

A small frozen MLP learns, through FLix adapters only, a family of regression targets that
depend on an example's (language, task) pair: target = base + u_language + v_task, an
additive structure that FLix models with one update per feature. One pair is held out of
training; because its features were seen in other pairs, composing them predicts it
(zero-shot composition). Runs in well under a minute on a laptop CPU:

    python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch
import torch.nn as nn

import flix_kernels as fk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    dim, batch, seq = 64, 32, 8

    languages, tasks = ["en", "fr", "sw", "yo"], ["copy", "negate", "shift"]
    space = fk.FeatureSpace({"language": languages, "task": tasks}, {"language": 4, "task": 4})
    held_out = {"language": "yo", "task": "shift"}
    pairs = [{"language": l, "task": t} for l in languages for t in tasks if {"language": l, "task": t} != held_out]

    # The frozen "pretrained" model and the hidden per-feature effects we want to learn.
    model = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
    teacher = copy.deepcopy(model)
    effect = {k: 0.5 * torch.randn(dim) for k in languages + tasks}

    def batch_of(examples):
        x = torch.randn(len(examples), seq, dim)
        with torch.no_grad():
            y = teacher(x) + torch.stack([effect[e["language"]] + effect[e["task"]] for e in examples])[:, None, :]
        return x, y

    names = fk.inject(model, space, target_modules="all-linear", alpha=8, backend=args.backend)
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"injected FLix into {names}; trainable parameters: {sum(p.numel() for p in trainable)}")
    opt = torch.optim.AdamW(trainable, lr=3e-3)

    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        examples = [pairs[i] for i in torch.randint(len(pairs), (batch,)).tolist()]
        x, y = batch_of(examples)
        fk.set_routing(model, fk.Routing(space.encode(examples), space, feature_dropout=0.1))
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step:4d}  train loss {loss.item():.4f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f}s on {fk.available_backends()[0]!r}")

    model.eval()
    with torch.no_grad():
        x, y = batch_of([held_out] * batch)
        with fk.use_routing(model, fk.Routing(space.encode([held_out] * batch), space)):
            composed = nn.functional.mse_loss(model(x), y).item()
        with fk.use_routing(model, fk.Routing(space.encode([{}] * batch), space)):
            no_adapter = nn.functional.mse_loss(model(x), y).item()
    print(f"held-out pair {held_out}: loss {composed:.4f} composed vs {no_adapter:.4f} without adapters")

    with tempfile.TemporaryDirectory() as d:
        fk.save_adapters(model, d)
        fresh = fk.load_adapters(model, d)  # the same model: a round trip
        print(f"saved and reloaded {len(fresh)} layers: {sorted(os.listdir(d))}")
        fk.export_peft(model, held_out, os.path.join(d, "peft"))
        print(f"exported {held_out} as a PEFT LoRA adapter: {sorted(os.listdir(os.path.join(d, 'peft')))}")
    with torch.no_grad():
        routing = fk.Routing(space.encode([held_out] * batch), space)
        with fk.use_routing(model, routing):
            routed = model(x)
        # A merged model needs no routing; the last training batch's routing is still set and asks
        # for other features, which a merged model refuses: clear it.
        fk.set_routing(model, None)
        fk.merge(model, held_out)
        merged = model(x)
        fk.unmerge(model)
        # A plain copy with the feature set folded in: nn.Linear layers only, no flix_kernels needed to run it.
        plain = fk.merge_and_unload(copy.deepcopy(model), held_out)
        plain_out = plain(x)
    print(f"merged {held_out} into the base weights: max |merged - routed| = {(merged - routed).abs().max():.2e}")
    print(f"merge_and_unload: {type(plain[0]).__name__} layers, max |plain - routed| = "
          f"{(plain_out - routed).abs().max():.2e}")


if __name__ == "__main__":
    main()
