"""Outputs of ``flix-kernels demo``: summary over seeds, ``results.json``, ``results.md``,
``curves.png`` (learning curves), the console table and the progress bar."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import torch

from .._io import atomic_write_files, text_writer
from ..bench.timing import provenance as _bench_provenance
from .data import Benchmark
from .experiment import LABELS, benchmark_for


# -- record -----------------------------------------------------------------------------------
def design(cfg) -> dict:
    """The experiment's design in words (stored in results.json, printed in results.md)."""
    b = benchmark_for(cfg, cfg.seeds[0] if cfg.seeds else 0)
    held = {s: [f"{l}/{t}" for l, t in benchmark_for(cfg, s).held_out] for s in cfg.seeds}
    if cfg.data == "numbers":
        return {**_numbers_design(cfg, b), **_common_design(cfg, b, held)}
    return {
        "languages": f"{len(cfg.languages)} languages, each a disjoint range of {cfg.num_symbols} token ids writing "
                     f"the same {cfg.num_symbols} abstract symbols in its own random order (fixed by the seed)",
        "tasks": {t: d for t, d in TASK_DESCRIPTIONS.items() if t in cfg.tasks},
        "example": "prompt [BOS, <language tag>, <task tag>, source..., SEP], target task(source)... EOS, in the "
                   f"language's tokens; sources are {cfg.min_len}-{cfg.max_len} distinct symbols",
        "tags": "every method gets the language and task tag tokens in its input, so the shared LoRA has the same "
                "information as FLix",
        "pretraining": f"{cfg.pretrain_steps} steps from scratch, every language: half next-token LM on sequences "
                       "of a grammar shared by all languages (next symbol = successor with probability "
                       f"{Benchmark.succ_prob}, else uniform), half copying [BOS, <language>, <copy>, src, SEP, src, "
                       "EOS]; then frozen. 'copy' is not a fine-tuning task; no fine-tuning task is pretrained",
        **_common_design(cfg, b, held),
    }


def _numbers_design(cfg, b) -> dict:
    return {
        "data": "numbers (num2words)",
        "languages": f"{len(cfg.languages)} real languages ({', '.join(cfg.languages)}), numbers 0..{cfg.max_number} "
                     "written by num2words, split into word tokens at spaces and hyphens (German compounds at "
                     "'und' / 'hundert'); each language owns its word tokens, the ten digits are shared",
        "tasks": {t: d for t, d in NUMBER_TASK_DESCRIPTIONS.items() if t in cfg.tasks},
        "example": "prompt [BOS, <language tag>, <task tag>, source..., SEP], target... EOS",
        "tags": "every method gets the language and task tag tokens in its input, so the shared LoRA has the same "
                "information as FLix",
        "pretraining": f"{cfg.pretrain_steps} steps from scratch, every language: "
                       + (f"{cfg.pretrain_aligned:.0%} of rows aligned text (a number's digits and words, either "
                          "order, no task tag), the rest " if cfg.pretrain_aligned else "")
                       + "half counting text (the words of consecutive numbers, SEP between them"
                       + (", in ordinals for half of them" if cfg.pretrain_ordinals else "")
                       + "), half copying a number's words; then frozen; no fine-tuning task's tag is pretrained",
    }


def _common_design(cfg, b, held) -> dict:
    return {
        "held_out": "one pair per language and per task (a Latin-square diagonal); seed k holds out diagonal k, "
                    f"so {len(cfg.tasks)} seeds hold out every pair once",
        "held_out_by_seed": held,
        "vocab_size": b.vocab_size,
        "methods": {m: LABELS[m] for m in cfg.methods},
        "budget": f"{cfg.steps} steps x batch {cfg.batch}, AdamW lr {cfg.lr} (5% warmup, cosine to 10%), "
                  f"target modules {cfg.target_modules}, active rank {cfg.rank_language + cfg.rank_task} "
                  f"(FLix {cfg.rank_language} + {cfg.rank_task}), alpha / r = {cfg.lora_scale}, same data "
                  "stream for every method of a seed; all methods are flix_kernels FeatureSpaces injected with "
                  "flix_kernels.inject (LoRA = one feature 'shared=all')",
        "metric": "exact match of the whole target + EOS, teacher-forced argmax at every target position (equal to "
                  f"greedy-decoding exact match), {cfg.eval_per_pair} fixed sources per pair never used in training",
    }


NUMBER_TASK_DESCRIPTIONS = {"spell": "digits -> the number's words", "read": "the number's words -> digits",
                            "next": "the number's words -> the next number's words",
                            "ordinal": "digits -> the ordinal's words (n >= 1)"}


TASK_DESCRIPTIONS = {"reverse": "the sequence backwards (positional)",
                     "rotate": "rotate left by one (positional)",
                     "sort": "sorted by abstract symbol order, which differs per language in token ids "
                             "(needs the language's symbols)",
                     "shift": "every symbol replaced by its successor, wrapping around (needs the language's symbols)",
                     "swap": "swap adjacent pairs (positional)",
                     "copy": "the sequence itself (pretraining only)"}


def provenance(device: torch.device) -> dict:
    p = _bench_provenance(device)
    try:  # whether the package differs from the commit named (results of uncommitted code say so)
        out = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=Path(__file__).resolve().parent.parent,
                             capture_output=True, text=True, timeout=10)
        p["package_modified"] = bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        p["package_modified"] = None
    return p


def _stats(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize(record: dict) -> dict:
    """Per method: seen / held-out exact match over seeds (mean, std, min, max), held-out by task,
    parameters, time, the mean learning curve, and the paired held-out difference to LoRA."""
    seeds = record["seeds"]
    methods = list(seeds[0]["methods"]) if seeds else []
    out = {}
    for m in methods:
        runs = [s["methods"][m] for s in seeds]
        by_task: dict[str, list[float]] = {}
        for s, r in zip(seeds, runs):
            for pair in s["held_out_pairs"]:
                by_task.setdefault(pair.split("/")[1], []).append(r["final"]["per_pair"][pair])
        steps = [c["step"] for c in runs[0]["curve"]]
        curve = [{"step": st, **{k: statistics.fmean(r["curve"][i][k] for r in runs) for k in ("seen", "held_out")}}
                 for i, st in enumerate(steps)]
        out[m] = {"label": LABELS[m], "seen": _stats([r["final"]["seen"] for r in runs]),
                  "held_out": _stats([r["final"]["held_out"] for r in runs]),
                  "held_out_by_task": {t: statistics.fmean(v) for t, v in by_task.items()},
                  "trainable_params": runs[0]["trainable_params"], "seconds": statistics.fmean(r["seconds"] for r in runs),
                  "train_seconds": statistics.fmean(r["train_seconds"] for r in runs), "curve": curve}
        for k in ("held_out_task_only", "held_out_language_only"):
            if k in runs[0]["final"]:
                out[m][k] = _stats([r["final"][k] for r in runs])
        if m != "lora" and "lora" in methods:
            d = [r["final"]["held_out"] - s["methods"]["lora"]["final"]["held_out"] for s, r in zip(seeds, runs)]
            out[m]["held_out_vs_lora"] = {**_stats(d), "wins": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d)}
    return {"methods": out, "base": _stats([s["base"]["copy_exact_match"] for s in seeds]) if seeds else None,
            "findings": findings(out)}


def findings(summary: dict) -> list[str]:
    """What the numbers say, in sentences (no judgement beyond the numbers)."""
    if not summary:
        return []
    lines = []
    best = max(summary, key=lambda m: summary[m]["held_out"]["mean"])
    lines.append(f"Best held-out (zero-shot) exact match: {summary[best]['label']}, "
                 f"{100 * summary[best]['held_out']['mean']:.1f}%.")
    for m, s in summary.items():
        d = s.get("held_out_vs_lora")
        if d:
            lines.append(f"{s['label']} vs shared LoRA on held-out pairs: {100 * d['mean']:+.1f} points "
                         f"(paired over {d['n']} seeds: std {100 * d['std']:.1f}, min {100 * d['min']:+.1f}, "
                         f"max {100 * d['max']:+.1f}; better in {d['wins']} of {d['n']}).")
    for m, s in summary.items():
        if "held_out_task_only" in s:
            lines.append(f"{s['label']} on held-out pairs with one adapter alone: task adapter only "
                         f"{100 * s['held_out_task_only']['mean']:.1f}%, language adapter only "
                         f"{100 * s['held_out_language_only']['mean']:.1f}% (both: {100 * s['held_out']['mean']:.1f}%).")
    tasks = list(next(iter(summary.values()))["held_out_by_task"])
    lines.append("Held-out exact match by task (mean over seeds): " + "; ".join(
        f"{s['label'].split(' (')[0]}: " + ", ".join(f"{t} {100 * s['held_out_by_task'][t]:.0f}%" for t in tasks)
        for s in summary.values()) + ".")
    return lines


RECORDED_RESULTS = "examples/results/zero_shot_composition/ (results.md, findings.md) in the repository"


def caveat(record: dict) -> str | None:
    """What a quick or smoke run is for: a short run of the pipeline whose accuracies are not the
    experiment's result (None for the default preset)."""
    cfg, preset = record["config"], record["config"]["preset"]
    if preset not in ("quick", "smoke"):
        return None
    from . import DemoConfig

    default = DemoConfig.default()
    methods = record.get("summary", {}).get("methods", {})
    seen = methods.get("lora", {}).get("seen", {}).get("mean")
    fit = f"; the shared LoRA fits only {100 * seen:.0f}% of the seen pairs" if seen is not None and seen < 0.95 else ""
    what = ("a smoke test of the code path: a tiny model and a few steps, so the numbers mean nothing"
            if preset == "smoke" else
            f"a short smoke run of the pipeline ({_seeds(len(cfg['seeds']))}, {cfg['pretrain_steps']} pretraining and "
            f"{cfg['steps']} adapter steps against {_seeds(len(default.seeds))}, {default.pretrain_steps} and "
            f"{default.steps} in the default run), undertrained{fit}, so its accuracies are not the experiment's result")
    return (f"This {preset} run is {what}. The experiment's result is the default run (`flix-kernels demo`), "
            f"recorded in {RECORDED_RESULTS}.")


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


# -- files ------------------------------------------------------------------------------------
def _pct(st: dict) -> str:
    return (f"{100 * st['mean']:.1f} ± {100 * st['std']:.1f} "
            f"[{100 * st['min']:.0f}, {100 * st['max']:.0f}]")


def markdown(record: dict) -> str:
    cfg, des, summ, prov = record["config"], record["design"], record["summary"], record["provenance"]
    v = prov["versions"]
    lines = [f"# flix-kernels demo: zero-shot composition ({cfg['preset']} preset)", "",
             f"commit `{prov['commit'][:12]}`{' (package modified)' if prov.get('package_modified') else ''}, {prov['date']}; torch {v['torch']}, transformers {v.get('transformers')}; "
             f"device {prov['device']['name']} ({prov['device']['type']}, {prov['torch_threads']} torch thread(s) per seed, "
             f"{prov['workers']} seed(s) in parallel); "
             f"seeds {cfg['seeds']}; total wall time {record['wall_seconds'] / 60:.1f} min.", ""]
    if record.get("caveat"):
        lines += [f"**{record['caveat']}**", ""]
    lines += ["Exact match (%) of the whole target at the end of training, mean ± std over seeds [min, max]:", "",
              "| method | seen pairs | held-out pairs (zero-shot) | trainable params | time / seed |",
              "|---|---|---|---|---|"]
    for m, s in summ["methods"].items():
        lines.append(f"| {s['label']} | {_pct(s['seen'])} | {_pct(s['held_out'])} | {s['trainable_params']:,} | "
                     f"{s['seconds']:.0f} s |")
    tasks = list(cfg["tasks"])
    lines += ["", "Held-out exact match (%) by task (each seed holds out one pair per task; mean over seeds):", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for s in summ["methods"].values():
        lines.append(f"| {s['label']} | " + " | ".join(f"{100 * s['held_out_by_task'].get(t, float('nan')):.0f}"
                                                       for t in tasks) + " |")
    base = summ.get("base")
    lines += ["", "## What this run shows", ""] + [f"- {f}" for f in summ["findings"]]
    if base:
        lines.append(f"- The frozen base copies (its pretraining format) with {100 * base['mean']:.0f}% exact match.")
    lines += ["", "## Design", ""]
    for k, val in des.items():
        if isinstance(val, dict):
            lines.append(f"- **{k}**: " + "; ".join(f"{a}: {b}" for a, b in val.items()))
        else:
            lines.append(f"- **{k}**: {val}")
    lines += ["", f"Model: LlamaForCausalLM, hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, "
                  f"{record['seeds'][0]['base']['parameters']:,} parameters (frozen); pretraining "
                  f"{cfg['pretrain_steps']} steps x batch {cfg['pretrain_batch']}, lr {cfg['pretrain_lr']}.",
              "", "Per seed (seen / held-out exact match %):", "",
              "| seed | held out | " + " | ".join(summ["methods"]) + " |", "|---|---|" + "---|" * len(summ["methods"])]
    for s in record["seeds"]:
        lines.append(f"| {s['seed']} | {', '.join(s['held_out_pairs'])} | " + " | ".join(
            f"{100 * r['final']['seen']:.0f} / {100 * r['final']['held_out']:.0f}" for r in s["methods"].values()) + " |")
    if record.get("outputs", {}).get("plot_note"):
        lines += ["", record["outputs"]["plot_note"]]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path):
    """Seen and held-out exact match against step, per method, mean over seeds (band: min..max).
    Returns a writer for atomic_write_files, or a note why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "No plot: matplotlib is not installed (pip install matplotlib)."
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in zip(axes, ("seen", "held_out"), ("seen pairs", "held-out pairs (zero-shot)")):
        for i, (m, s) in enumerate(record["summary"]["methods"].items()):
            runs = [seed["methods"][m]["curve"] for seed in record["seeds"]]
            steps = [c["step"] for c in runs[0]]
            ys = [[100 * r[j][key] for r in runs] for j in range(len(steps))]
            ax.plot(steps, [statistics.fmean(y) for y in ys], marker="o", ms=3, color=f"C{i}", label=s["label"])
            if len(runs) > 1:
                ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=f"C{i}", alpha=0.12)
        ax.set_title(title)
        ax.set_xlabel("adapter training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact match (%)")
    axes[1].legend(fontsize=7, loc="upper left")
    n = len(record["seeds"])
    fig.suptitle(f"zero-shot composition, mean over {n} seed{'s' if n > 1 else ''}" + (" (band: min..max)" if n > 1 else ""))
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)

    return write, None


def write(record: dict, out_dir: Path) -> dict:
    """results.json, results.md and curves.png, all renamed into place together."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png_writer, note = plot(record, out_dir / "curves.png")
    outputs = {"json": str(out_dir / "results.json"), "markdown": str(out_dir / "results.md")}
    if png_writer:
        outputs["plot"] = str(out_dir / "curves.png")
    else:
        outputs["plot_note"] = note
    record["outputs"] = outputs
    md, js = markdown(record), json.dumps(record, indent=1, default=str) + "\n"
    writers = {outputs["json"]: text_writer(js), outputs["markdown"]: text_writer(md)}
    if png_writer:
        writers[outputs["plot"]] = png_writer
    atomic_write_files(writers)
    return outputs


def console(record: dict) -> None:
    summ = record["summary"]["methods"]
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        print(markdown(record))
        return
    con = Console(width=None if Console().is_terminal else 140)
    t = Table(title=f"zero-shot composition ({record['config']['preset']}, {len(record['seeds'])} seed(s)): "
                    "exact match %, mean ± std [min, max]")
    for h in ("method", "seen pairs", "held-out pairs", "params", "time / seed"):
        t.add_column(h, justify="left" if h == "method" else "right")
    for s in summ.values():
        t.add_row(s["label"], _pct(s["seen"]), _pct(s["held_out"]), f"{s['trainable_params']:,}", f"{s['seconds']:.0f} s")
    con.print(t)
    for f in record["summary"]["findings"]:
        con.print("- " + escape(f))
    if record.get("caveat"):
        con.print(f"[bold yellow]{escape(record['caveat'])}[/]")
    out = record.get("outputs", {})
    if out:
        print("wrote " + ", ".join(v for k, v in out.items() if k != "plot_note") + (f"; {out['plot_note']}" if "plot_note" in out else ""))


__all__ = ["caveat", "console", "design", "findings", "markdown", "plot", "provenance", "summarize", "write"]
