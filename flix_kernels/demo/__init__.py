"""``flix-kernels demo``: zero-shot composition of (language, task) pairs, FLix against LoRA.

Two benchmarks a CPU trains in minutes: ``numbers`` (the default; real languages' number
words from num2words, :mod:`.numbers`) and ``synthetic`` (isomorphic made-up languages,
:mod:`.data`). A tiny Llama is pretrained from scratch on every language's text (no task) and
frozen; adapters are then trained on the seen (language, task) pairs only and evaluated by
exact match on seen and on held-out pairs. Four methods at the same budget (steps, batch,
target modules, active rank; each method's learning rate chosen on seen pairs): one shared
LoRA, one LoRA per seen pair, FLix (a language and a task adapter per example) and FLix with
feature dropout (:mod:`.experiment`). ``vary`` adds runs with adapter-side fields changed on the
same frozen bases (the investigations of the findings). Outputs: ``results.json``,
``results.md`` and ``curves.png`` (:mod:`.report`). Build configurations with the presets
(:meth:`DemoConfig.default`, ``quick``, ``smoke``), which fill in each benchmark's languages,
tasks and learning rates.

    from flix_kernels.demo import DemoConfig, run
    record = run(DemoConfig.quick(), out_dir="flix-demo")
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue as queue_mod
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .._progress import Progress
from ..bench.timing import resolve_device
from .experiment import LABELS, METHODS, run_key, run_seed

__all__ = ["DemoConfig", "LABELS", "METHODS", "VARIABLE", "check_variants", "parse_variant", "run", "split_variant"]


@dataclass
class DemoConfig:
    """Everything that defines a run. Presets: :meth:`default`, :meth:`quick`, :meth:`smoke`."""

    preset: str = "default"
    seeds: tuple[int, ...] = (0, 1, 2, 3)  # seed k also picks the k-th Latin-square diagonal held out
    # benchmark: "synthetic" (.data) or "numbers" (.numbers: real languages, from num2words)
    data: str = "numbers"
    max_number: int = 99  # numbers: the range 0..max_number
    # numbers: a base pretrained on aligned digits-and-words text (this share of its rows) and
    # ordinal counting besides counting and copying: the smallest setting measured in which
    # composition happens at all (examples/results/numbers_composition/findings.md)
    pretrain_aligned: float = 0.25
    pretrain_ordinals: bool = True
    num_symbols: int = 12  # synthetic: symbols per language
    languages: tuple[str, ...] = ("en", "de", "fr", "es", "pl", "id")
    tasks: tuple[str, ...] = ("spell", "read", "next", "ordinal")
    min_len: int = 4
    max_len: int = 8
    eval_per_pair: int = 64
    # base model (a transformers LlamaForCausalLM) and its pretraining
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    pretrain_steps: int = 1000
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    # adapters: identical budget for every method (but each one's learning rate, method_lr)
    methods: tuple[str, ...] = METHODS
    # Extra runs on the same frozen bases, each "[method:]field=value[,field=value...]" over the
    # fields in VARIABLE (parse_variant): of every method in ``methods``, or of the one named;
    # results are keyed "method[field=value,...]".
    vary: tuple[str, ...] = ()
    held_out_eval: bool = True  # False: seen pairs only, to choose hyper-parameters blind to held-out ones
    rank_language: int = 4  # FLix: rank per language feature
    rank_task: int = 4  # FLix: rank per task feature; LoRA and per-pair LoRA get the sum
    lora_scale: float = 2.0  # alpha / r, the same for every feature of every method
    feature_dropout: float = 0.2  # flix_dropout only
    target_modules: str | tuple[str, ...] = "all-linear"
    steps: int = 1500
    batch: int = 32
    lr: float = 3e-3
    # Learning rates of the methods that do not take ``lr``, as (method, lr) pairs; a variant
    # that sets lr clears them (its lr is then every method's). numbers: each method's rate of
    # the best seen-pair exact match, chosen with held-out pairs unevaluated (lr_selection/).
    method_lr: tuple[tuple[str, float], ...] = (("lora", 0.012), ("per_pair", 0.001), ("flix_dropout", 0.001))
    weight_decay: float = 0.0  # AdamW's, on the adapters
    loss: str = "token"  # adapters' loss: mean over all target tokens, or "example": each example's mean, then theirs
    language_lr_scale: float = 1.0  # flix_fair only: the language adapters' lr relative to lr
    # Fine-tuning data: seen pairs of these languages are sampled with weight rare_weight (others 1).
    rare_languages: tuple[str, ...] = ()
    rare_weight: float = 0.01
    eval_every: int = 100
    backend: str = "auto"
    device: str = "cpu"
    threads: int | None = 1  # CPU threads for torch; 1 because these ops are tiny (more only adds sync)
    workers: int | None = None  # seeds run in parallel processes; default: one per CPU core on CPU, 1 on CUDA

    @classmethod
    def default(cls, **kw) -> "DemoConfig":
        return cls(**_data_defaults(kw))

    @classmethod
    def quick(cls, **kw) -> "DemoConfig":
        """A short smoke run of the pipeline (numbers: about 1.5 minutes on 2 shared CPU cores,
        synthetic: about 4.5): 2 seeds, shorter pretraining and training. Undertrained: its
        accuracies are not the experiment's result (the default run's are)."""
        return cls(**{"preset": "quick", "seeds": (0, 1), "pretrain_steps": 600, "steps": 600, "eval_every": 100,
                      "eval_per_pair": 32, **_data_defaults(kw)})

    @classmethod
    def smoke(cls, **kw) -> "DemoConfig":
        """Seconds, for CI: a tiny model and a few steps of every method; the numbers mean nothing."""
        return cls(**{"preset": "smoke", "seeds": (0,), "hidden": 32, "layers": 1, "heads": 2, "pretrain_steps": 60,
                      "pretrain_batch": 32, "steps": 20, "batch": 16, "eval_every": 10, "eval_per_pair": 8,
                      **_data_defaults(kw)})

    def lr_for(self, method: str) -> float:
        return dict(self.method_lr).get(method, self.lr)

    def runs(self) -> list[tuple[str, str, "DemoConfig"]]:
        """(method, variant, config) of every run: each method as configured, then each variant
        of ``vary`` for every method (or for the one it names), with its fields changed."""
        out = [(m, "", self) for m in self.methods]
        for spec in self.vary:
            method, fields = split_variant(spec)
            changed = parse_variant(fields)
            changed = replace(self, **({"method_lr": ()} if "lr" in changed else {}), **changed)
            out += [(m, fields, changed) for m in ((method,) if method else self.methods)]
        return out

    def with_seeds(self, n: int) -> "DemoConfig":
        """The same run over seeds 0..n-1."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of seeds must be an integer of at least 1, got {n!r}")
        return replace(self, seeds=tuple(range(n)))


# What a preset takes for each benchmark's own fields when the caller gives none.
# synthetic: its committed results' settings (one learning rate for every method).
_DATA_DEFAULTS = {"synthetic": {"languages": ("L0", "L1", "L2", "L3"), "tasks": ("reverse", "rotate", "sort", "swap"),
                                "method_lr": ()}}


# The fields a variant may change: adapter training only, so every variant shares the seed's base.
VARIABLE = ("lr", "batch", "weight_decay", "loss", "rank_language", "rank_task", "lora_scale", "feature_dropout",
            "language_lr_scale", "rare_languages", "rare_weight")


def split_variant(spec: str) -> tuple[str | None, str]:
    """``"flix:lr=1e-3"`` -> ``("flix", "lr=1e-3")``; ``"lr=1e-3"`` -> ``(None, "lr=1e-3")``."""
    head, colon, rest = spec.partition(":")
    if not colon:
        return None, spec
    if head.strip() not in LABELS:
        raise ValueError(f"variant {spec!r}: unknown method {head.strip()!r}; choose from {', '.join(LABELS)}")
    return head.strip(), rest


def parse_variant(spec: str, allowed: tuple[str, ...] = VARIABLE) -> dict:
    """``"lr=1e-3,rank_task=6"`` -> ``{"lr": 0.001, "rank_task": 6}``, typed like DemoConfig's
    fields (a tuple is written ``a+b``); only the fields in ``allowed`` (default: those a
    variant may change). A ValueError names what is wrong."""
    fields = {f.name: f for f in dataclasses.fields(DemoConfig)}
    out = {}
    for part in spec.split(","):
        name, eq, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not name or not value:
            raise ValueError(f"variant {spec!r}: expected field=value[,field=value...], got {part!r}")
        if name not in allowed:
            why = " (the base is shared by every variant)" if allowed is VARIABLE else ""
            raise ValueError(f"variant {spec!r}: {name!r} cannot vary{why}; choose from {', '.join(allowed)}")
        if name in out:
            raise ValueError(f"variant {spec!r}: {name!r} given twice")
        default = fields[name].default
        try:
            if isinstance(default, tuple):
                kind = type(default[0]) if default else str
                out[name] = tuple(_typed(kind, v) for v in value.split("+") if v)
            else:
                kind = type(default) if default is not None else int
                out[name] = _typed(kind, value)
        except (TypeError, ValueError):
            raise ValueError(f"variant {spec!r}: {name}={value!r} is not a valid {kind.__name__}") from None
    return out


def _typed(kind: type, text: str):
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "1")
    return kind(text)


def check_variants(cfg: DemoConfig) -> None:
    """A ValueError for a variant that names a bad value (before any training starts)."""
    keys = [run_key(m, spec) for m, spec, _ in cfg.runs()]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"runs asked for more than once: {', '.join(twice)}")
    for method, spec, v in cfg.runs():
        where = f"variant {spec!r}: " if spec else ""
        for name in ("lr", "rare_weight", "language_lr_scale", "lora_scale"):
            if not getattr(v, name) > 0:
                raise ValueError(f"{where}{name} must be > 0, got {getattr(v, name)}")
        bad = {m: lr for m, lr in v.method_lr if m not in LABELS or not lr > 0}
        if bad:
            raise ValueError(f"method_lr {bad}: methods must be among {', '.join(LABELS)} and rates > 0")
        if v.batch < 1 or v.rank_language < 1 or v.rank_task < 1:
            raise ValueError(f"{where}batch and ranks must be at least 1")
        if v.loss not in ("token", "example"):
            raise ValueError(f"{where}loss must be 'token' or 'example', got {v.loss!r}")
        if not 0 <= v.feature_dropout < 1 or v.weight_decay < 0:
            raise ValueError(f"{where}feature_dropout must be in [0, 1) and weight_decay >= 0")
        unknown = [l for l in v.rare_languages if l not in v.languages]
        if unknown:
            raise ValueError(f"{where}rare_languages {unknown} are not languages of the run ({', '.join(v.languages)})")
        if len(set(v.rare_languages)) == len(v.languages):
            raise ValueError(f"{where}rare_languages names every language; leave one common")
        if v.language_lr_scale != 1 and method != "flix_fair":
            raise ValueError(f"{where}language_lr_scale needs the per-feature optimizer: only method flix_fair "
                             "has one learning rate per feature group")


def _data_defaults(kw: dict) -> dict:
    return {**_DATA_DEFAULTS.get(kw.get("data", DemoConfig.data), {}), **kw}


def run(config: DemoConfig, out_dir: str | Path | None = None, *, show_progress: bool = False,
        console: bool = False, case_lines: bool = False) -> dict:
    """Run every seed and method; returns the record (and writes results.json, results.md and
    curves.png to ``out_dir`` when given). ``case_lines`` (for a log; the command sets it when
    stdout is not a terminal): no progress bar, one line per finished pretraining or run (name,
    time, exact match) instead."""
    from . import report

    cfg = config
    device = resolve_device(cfg.device)
    if not cfg.seeds:
        raise ValueError("DemoConfig.seeds is empty: give at least one seed")
    check_variants(cfg)
    workers = cfg.workers or (min(len(cfg.seeds), os.cpu_count() or 1) if device.type == "cpu" else 1)
    per_seed = cfg.pretrain_steps + len(cfg.runs()) * cfg.steps
    t0 = time.perf_counter()
    with Progress(show_progress, total=per_seed * len(cfg.seeds), lines=case_lines) as prog:
        if workers > 1 and len(cfg.seeds) > 1:
            seeds = _parallel(cfg, workers, prog)
        else:
            seeds = [_seed(seed, cfg, prog.tick, prog.say, prog.finished) for seed in cfg.seeds]
    record = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
              "design": report.design(cfg), "seeds": seeds, "wall_seconds": time.perf_counter() - t0,
              "provenance": {**report.provenance(device), "torch_threads": cfg.threads or torch.get_num_threads(),
                             "workers": min(workers, len(cfg.seeds))}}
    record["summary"] = report.summarize(record)
    record["caveat"] = report.caveat(record)
    if out_dir is not None:
        record["outputs"] = report.write(record, Path(out_dir))
    if console:
        report.console(record)
    return record


def _seed(seed: int, cfg: DemoConfig, tick, say, done) -> dict:
    old = torch.get_num_threads()
    if torch.device(cfg.device).type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return run_seed(seed, cfg, torch.device(cfg.device), tick=tick, say=say, done=done)
    finally:
        torch.set_num_threads(old)


def _worker(seed: int, cfg: DemoConfig, queue) -> dict:
    # One process per seed: its own interpreter and RNGs, so results equal a sequential run.
    return _seed(seed, cfg, lambda: queue.put(1), lambda s: queue.put(s),
                 lambda name, seconds, result: queue.put((name, seconds, result)))


def _parallel(cfg: DemoConfig, workers: int, prog) -> list[dict]:
    """Seeds in ``workers`` spawned processes (independent runs; 1 torch thread each on CPU)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        queue = manager.Queue()
        futures = [pool.submit(_worker, seed, cfg, queue) for seed in cfg.seeds]

        def relay(msg):
            if msg == 1:
                prog.tick()
            elif isinstance(msg, tuple):  # a finished part: (name, seconds, result)
                prog.finished(*msg)
            else:
                prog.say(msg)

        while not all(f.done() for f in futures):
            try:
                relay(queue.get(timeout=0.2))
            except queue_mod.Empty:
                continue
        while not queue.empty():  # put before its worker ended, after the loop's last look: the last lines
            relay(queue.get())
        return [f.result() for f in futures]
