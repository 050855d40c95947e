"""Pretraining, the four adapter methods, adapter training and exact-match evaluation.

Every method is a FLix feature space injected with :func:`flix_kernels.inject` into the same
frozen base, so they share the code path, the target modules, the optimizer, the data stream
and the per-rank scale; only the space and the routing differ:

* ``lora``: one shared adapter (a space with the single feature ``shared=all``) of rank equal
  to FLix's active rank: plain LoRA, same FLOPs and active rank as FLix.
* ``per_pair``: one adapter per seen (language, task) pair, same rank. A held-out pair has no
  adapter of its own; it falls back to the adapter of the same task in the next language (in
  language order, wrapping around) where that pair was seen.
* ``flix``: one adapter per language and one per task (ranks summing to the active rank);
  an example uses its language's and its task's.
* ``flix_dropout``: the same with feature dropout during training (each active feature of an
  example dropped with probability p), so each feature also learns to work alone.
* ``flix_fair`` (not in the default set): FLix trained with
  :func:`flix_kernels.per_feature_optimizer`, so a step leaves the features no example of the
  batch used exactly as they were (AdamW state included), as separate adapters would.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import FeatureSpace, Routing, flix_layers, inject, per_feature_optimizer, use_routing
from .data import IGNORE, Benchmark
from .numbers import NumbersBenchmark

METHODS = ("lora", "per_pair", "flix", "flix_dropout")  # the default set
LABELS = {"lora": "LoRA (one shared adapter)", "per_pair": "LoRA per seen pair (fallback: same task, other language)",
          "flix": "FLix (language + task)", "flix_dropout": "FLix + feature dropout",
          "flix_fair": "FLix + per-feature optimizer"}


# Adapter-init seed offsets; FLix variants share FLix's init, so they differ only in what they vary.
_INIT_SEED = {"lora": 1, "per_pair": 2, "flix": 3, "flix_dropout": 4, "flix_fair": 3}


@dataclass
class Method:
    name: str
    space: FeatureSpace
    features: Callable[[tuple[str, str]], dict]  # pair -> {group: value} at train and eval time
    feature_dropout: float = 0.0
    per_feature: bool = False  # train with flix_kernels.per_feature_optimizer


def make_method(name: str, bench: Benchmark, cfg) -> Method:
    r_lang, r_task = cfg.rank_language, cfg.rank_task
    active = r_lang + r_task
    if name == "lora":
        return Method(name, FeatureSpace({"shared": ["all"]}, active), lambda p: {"shared": "all"})
    if name == "per_pair":
        seen = [f"{l}/{t}" for l, t in bench.seen]

        def pair_feature(p):
            l, t = p
            if p in bench.seen:
                return {"pair": f"{l}/{t}"}
            langs = list(bench.languages)
            i = langs.index(l)
            for k in range(1, len(langs)):  # the next language that saw this task
                other = langs[(i + k) % len(langs)]
                if (other, t) in bench.seen:
                    return {"pair": f"{other}/{t}"}
            raise ValueError(f"task {t!r} is seen in no language")

        return Method(name, FeatureSpace({"pair": seen}, active), pair_feature)
    if name in ("flix", "flix_dropout", "flix_fair"):
        space = FeatureSpace({"language": list(bench.languages), "task": list(bench.tasks)},
                             {"language": r_lang, "task": r_task})
        p = cfg.feature_dropout if name == "flix_dropout" else 0.0
        return Method(name, space, lambda pair: {"language": pair[0], "task": pair[1]}, p, name == "flix_fair")
    raise ValueError(f"unknown method {name!r}; choose from {tuple(LABELS)}")


# -- model ------------------------------------------------------------------------------------
def build_model(cfg, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.hidden * 2,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                         eos_token_id=3)
    return LlamaForCausalLM(config)


def _lr_at(step: int, total: int, lr: float) -> float:
    """Linear warmup over the first 5% of steps, then cosine decay to 10% of lr."""
    warm = max(1, total // 20)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def pretrain(bench: Benchmark, cfg, seed: int, device, tick=lambda: None) -> tuple[dict, dict]:
    """Train the base model from scratch on the generic objective; returns (state_dict, stats)."""
    torch.manual_seed(seed)
    model = build_model(cfg, bench.vocab_size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    rng = random.Random(f"pretrain-{seed}")
    t0, losses = time.perf_counter(), []
    model.train()
    for step in range(cfg.pretrain_steps):
        ids, labels = bench.pretrain_batch(rng, cfg.pretrain_batch, lm_len=bench.lm_len)
        _set_lr(opt, _lr_at(step, cfg.pretrain_steps, cfg.pretrain_lr))
        loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tick()
    model.eval()
    # Sanity check of the frozen base: exact match on its pretraining format (copy), fresh sources.
    erng = random.Random(f"copy-eval-{seed}")
    with torch.no_grad():
        copy_em = _em(model, bench, [((l, "copy"), bench.source(erng)) for l in bench.languages for _ in range(32)],
                      device)
    stats = {"seconds": time.perf_counter() - t0, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
             "copy_exact_match": copy_em, "parameters": sum(p.numel() for p in model.parameters())}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, stats


# -- evaluation -------------------------------------------------------------------------------
def _em_flags(model, bench: Benchmark, items, device) -> torch.Tensor:
    """Per example: every target token (and EOS) is the argmax of a teacher-forced forward.

    This equals exact match of greedy decoding: if every teacher-forced argmax is right,
    greedy decoding reproduces the target token by token; at the first wrong argmax greedy
    decoding, whose prefix is still the gold one, emits that same wrong token.
    """
    ids, labels = bench.collate(items)
    ids, labels = ids.to(device), labels.to(device)
    pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
    gold, mask = labels[:, 1:], labels[:, 1:] != IGNORE
    return ((pred == gold) | ~mask).all(1).cpu()


def _em(model, bench, items, device) -> float:
    return float(_em_flags(model, bench, items, device).float().mean())


@torch.no_grad()
def evaluate(model, bench: Benchmark, method: Method, eval_sets: dict, device, chunk: int = 512) -> dict:
    """Exact match per pair (teacher-forced, see :func:`_em_flags`), routed like training minus dropout."""
    model.eval()
    items = [(pair, s) for pair, srcs in eval_sets.items() for s in srcs]
    flags = []
    for i in range(0, len(items), chunk):
        part = items[i:i + chunk]
        routing = Routing(method.space.encode([method.features(p) for p, _ in part]), method.space)
        with use_routing(model, routing):
            flags.append(_em_flags(model, bench, part, device))
    flags = torch.cat(flags)
    per_pair, k = {}, 0
    for pair, srcs in eval_sets.items():
        per_pair[f"{pair[0]}/{pair[1]}"] = float(flags[k:k + len(srcs)].float().mean())
        k += len(srcs)
    seen = [per_pair[f"{l}/{t}"] for l, t in bench.seen if f"{l}/{t}" in per_pair]
    held = [per_pair[f"{l}/{t}"] for l, t in bench.held_out if f"{l}/{t}" in per_pair]
    model.train()
    return {"seen": sum(seen) / len(seen) if seen else None, "held_out": sum(held) / len(held) if held else None,
            "per_pair": per_pair}


# -- adapter training -------------------------------------------------------------------------
def train_method(name: str, base_state: dict, bench: Benchmark, cfg, seed: int, eval_sets: dict, device,
                 tick=lambda: None) -> dict:
    """Inject the method's adapters into a copy of the frozen base, train, evaluate on a schedule."""
    method = make_method(name, bench, cfg)
    model = build_model(cfg, bench.vocab_size)
    model.load_state_dict(base_state)
    model.to(device)
    torch.manual_seed(seed * 1000 + _INIT_SEED[name])  # adapter init, reproducible per (seed, method)
    # Every feature of every method gets the same scale alpha / r_k = lora_scale (alpha is one
    # number per layer, so with unequal FLix ranks the per-feature scales are set directly).
    alpha = cfg.lora_scale * method.space.ranks[0]
    targets = inject(model, method.space, target_modules=cfg.target_modules, alpha=alpha, backend=cfg.backend)
    for _, layer in flix_layers(model):
        layer.scaling = torch.full_like(layer.scaling, cfg.lora_scale)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr_for(name)
    opt = (per_feature_optimizer(torch.optim.AdamW, model, lr=lr, weight_decay=cfg.weight_decay,
                                 group_options={"language": {"lr_scale": cfg.language_lr_scale}})
           if method.per_feature else torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay))
    # The same data stream for every method of a seed; feature dropout has its own generator.
    weights = {l: cfg.rare_weight for l in cfg.rare_languages} or None
    stream = bench.train_stream(cfg.batch, stream_seed=seed, exclude=eval_sets, language_weights=weights)
    gen = torch.Generator().manual_seed(seed * 1000 + 7)
    curve, t0, t_eval = [], time.perf_counter(), 0.0
    model.train()
    for step in range(1, cfg.steps + 1):
        items = next(stream)
        ids, labels = bench.collate(items)
        routing = Routing(method.space.encode([method.features(p) for p, _ in items]), method.space,
                          feature_dropout=method.feature_dropout, generator=gen)
        _set_lr(opt, _lr_at(step - 1, cfg.steps, lr))
        with use_routing(model, routing):
            loss = _loss(model, ids.to(device), labels.to(device), cfg.loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tick()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            te = time.perf_counter()
            ev = evaluate(model, bench, method, eval_sets, device)
            t_eval += time.perf_counter() - te
            curve.append({"step": step, "loss": loss.item(), "seen": ev["seen"], "held_out": ev["held_out"]})
    wall = time.perf_counter() - t0
    if method.space.group_names == ["language", "task"] and cfg.held_out_eval:
        ev.update(_diagnostics(model, bench, method, {p: eval_sets[p] for p in bench.held_out}, device))
    return {"method": name, "trainable_params": sum(p.numel() for p in params), "target_modules": len(targets),
            "active_rank": cfg.rank_language + cfg.rank_task, "space": method.space.to_dict(),
            "feature_dropout": method.feature_dropout, "scale": cfg.lora_scale, "lr": lr, "seconds": wall,
            "train_seconds": wall - t_eval, "curve": curve, "final": ev}


def _loss(model, ids: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Next-token cross-entropy over the target tokens: their mean over the batch ("token", as
    transformers computes it) or each example's mean, then the mean over examples ("example"),
    which weighs a one-token target as much as a five-token one."""
    if kind == "token":
        return model(input_ids=ids, labels=labels).loss
    logits = model(input_ids=ids).logits[:, :-1].float()
    gold = labels[:, 1:]
    mask = gold != IGNORE
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), gold.clamp_min(0), reduction="none")
    per_example = (nll * mask).sum(1) / mask.sum(1).clamp_min(1)
    return per_example.mean()


def _diagnostics(model, bench, method: Method, held: dict, device) -> dict:
    """Held-out pairs with one of the two adapters alone, and with the language adapters at half
    their scale. If the task adapter alone beats the composition, the held-out language's
    adapter hurts rather than helps."""
    out = {}
    for group in ("task", "language"):
        alone = Method(method.name, method.space, lambda p, g=group: {g: p[0 if g == "language" else 1]})
        ev = evaluate(model, bench, alone, held, device)
        out[f"held_out_{group}_only"], out[f"{group}_only_per_pair"] = ev["held_out"], ev["per_pair"]
    g = method.space.group_names.index("language")
    language = slice(method.space.group_offsets[g], method.space.group_offsets[g + 1])
    layers = [layer for _, layer in flix_layers(model)]
    saved = [layer.scaling.clone() for layer in layers]
    for layer in layers:
        layer.scaling[language] *= 0.5
    try:
        out["held_out_language_half"] = evaluate(model, bench, method, held, device)["held_out"]
    finally:
        for layer, s in zip(layers, saved):
            layer.scaling.copy_(s)
    return out


DATA = {"synthetic": Benchmark, "numbers": NumbersBenchmark}


def benchmark_for(cfg, seed: int):
    """The benchmark ``cfg.data`` names ("synthetic": :mod:`.data`, "numbers": :mod:`.numbers`)
    for one data seed."""
    if cfg.data not in DATA:
        raise ValueError(f"unknown data {cfg.data!r}; choose from {tuple(DATA)}")
    return DATA[cfg.data].for_config(cfg, seed)


def run_key(method: str, spec: str) -> str:
    """The results' key of a method's run under a variant ("flix", "flix[lr=0.001]")."""
    return f"{method}[{spec}]" if spec else method


def split_key(key: str) -> tuple[str, str]:
    """The inverse of :func:`run_key`: ``"flix[lr=0.001]"`` -> ``("flix", "lr=0.001")``."""
    method, _, spec = key.partition("[")
    return method, spec[:-1]


def run_label(key: str) -> str:
    method, spec = split_key(key)
    return LABELS[method] + (f" [{spec}]" if spec else "")


def run_seed(seed: int, cfg, device, tick=lambda: None, say=lambda s: None,
             done=lambda name, seconds, result: None) -> dict:
    """One seed: pretrain its base, then train and evaluate every run on it. ``tick`` after each
    training step, ``say`` the part begun, ``done(name, seconds, result)`` each part finished
    (the pretraining, each run) with its key number, for a log."""
    bench = benchmark_for(cfg, seed)
    eval_sets = bench.eval_sets(cfg.eval_per_pair)
    if not cfg.held_out_eval:  # never evaluated, so nothing chosen from this run has seen them
        eval_sets = {p: eval_sets[p] for p in bench.seen}
    say(f"seed {seed}: pretraining the base model")
    base_state, base_stats = pretrain(bench, cfg, seed, device, tick)
    done(f"seed {seed}: pretraining the base model", base_stats["seconds"],
         f"copy exact match {base_stats['copy_exact_match']:.1%}, final loss {base_stats['final_loss']:.3f}")
    out = {"seed": seed, "held_out_pairs": [f"{l}/{t}" for l, t in bench.held_out], "base": base_stats, "methods": {}}
    runs = cfg.runs()
    order = list(dict.fromkeys(m for m, _, _ in runs))
    for name, spec, vcfg in sorted(runs, key=lambda r: order.index(r[0])):  # grouped by method
        key = run_key(name, spec)
        say(f"seed {seed}: {run_label(key)}")
        out["methods"][key] = result = train_method(name, base_state, bench, vcfg, seed, eval_sets, device, tick)
        done(f"seed {seed}: {run_label(key)}", result["seconds"], _exact_match(result["final"]))
    return out


def _exact_match(final: dict) -> str:
    """A run's final exact match, for a log line (held-out absent under ``held_out_eval=False``)."""
    parts = [f"{what} {final[key]:.1%}" for key, what in (("seen", "exact match seen"), ("held_out", "held-out"))
             if final.get(key) is not None]
    return ", ".join(parts) or "no exact match measured"


__all__ = ["DATA", "LABELS", "METHODS", "Method", "benchmark_for", "build_model", "evaluate", "make_method",
           "pretrain", "run_key", "run_label", "run_seed", "split_key", "train_method"]
