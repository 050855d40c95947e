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
from .experiment import LABELS, benchmark_for, run_key, run_label, split_key


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
    own_lr = [(m, lr) for m, lr in cfg.method_lr if m in cfg.methods]
    return {
        "held_out": "one pair per language and per task (a Latin-square diagonal); seed k holds out diagonal k, "
                    f"so {len(cfg.tasks)} seeds hold out every pair once",
        "held_out_by_seed": held,
        "vocab_size": b.vocab_size,
        "methods": {m: LABELS[m] for m in cfg.methods},
        **({"variants": "also run with these fields changed (of every method, or of the one before ':'), on the "
                        "same frozen bases and held-out pairs: " + "; ".join(cfg.vary)} if cfg.vary else {}),
        **({"evaluation": "seen pairs only: held-out pairs were neither evaluated nor stored (a run for choosing "
                          "hyper-parameters)"} if not cfg.held_out_eval else {}),
        **({"rare_languages": f"seen pairs of {', '.join(cfg.rare_languages)} are sampled with weight "
                              f"{cfg.rare_weight} (the other languages' with 1)"} if cfg.rare_languages else {}),
        "budget": f"{cfg.steps} steps x batch {cfg.batch}, AdamW lr {cfg.lr}"
                  + (" (" + ", ".join(f"{m} {lr}" for m, lr in own_lr) + ")" if own_lr else "")
                  + f" (5% warmup, cosine to 10%), weight decay {cfg.weight_decay}, loss: the mean over "
                  + ("each example's target tokens, then over examples" if cfg.loss == "example" else "target tokens")
                  + f", target modules {cfg.target_modules}, active rank {cfg.rank_language + cfg.rank_task} "
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


def _lora_of(key: str) -> str:
    """The shared-LoRA run a run is paired with: LoRA under the same variant."""
    return run_key("lora", split_key(key)[1])


def _mean_by(per_pairs: list[dict], pairs_by_seed: list[list[str]], part: int) -> dict:
    """Mean exact match per language (part 0) or task (part 1) over the given pairs of every seed."""
    by: dict[str, list[float]] = {}
    for per_pair, pairs in zip(per_pairs, pairs_by_seed):
        for pair in pairs:
            by.setdefault(pair.split("/")[part], []).append(per_pair[pair])
    return {k: statistics.fmean(v) for k, v in by.items()}


def summarize(record: dict) -> dict:
    """Per run (method, or method under a variant): seen / held-out exact match over seeds (mean,
    std, min, max), held-out by task and by language, the one-adapter diagnostics, parameters,
    time, the mean learning curve, and the paired held-out difference to LoRA (same variant).
    Without held-out evaluation (``held_out_eval=False``) only the seen figures exist."""
    seeds = record["seeds"]
    keys = list(seeds[0]["methods"]) if seeds else []
    held_pairs = [s["held_out_pairs"] for s in seeds]
    out = {}
    for m in keys:
        runs = [s["methods"][m] for s in seeds]
        held = runs[0]["final"]["held_out"] is not None
        parts = ("seen", "held_out") if held else ("seen",)
        steps = [c["step"] for c in runs[0]["curve"]]
        curve = [{"step": st, **{k: statistics.fmean(r["curve"][i][k] for r in runs) for k in parts}}
                 for i, st in enumerate(steps)]
        seen_pairs = [[p for p in r["final"]["per_pair"] if p not in s["held_out_pairs"]] for s, r in zip(seeds, runs)]
        out[m] = {"label": run_label(m), "seen": _stats([r["final"]["seen"] for r in runs]),
                  "seen_by_task": _mean_by([r["final"]["per_pair"] for r in runs], seen_pairs, 1),
                  "trainable_params": runs[0]["trainable_params"], "lr": runs[0].get("lr"),
                  "seconds": statistics.fmean(r["seconds"] for r in runs),
                  "train_seconds": statistics.fmean(r["train_seconds"] for r in runs), "curve": curve}
        if not held:
            continue
        per_pairs = [r["final"]["per_pair"] for r in runs]
        out[m].update({"held_out": _stats([r["final"]["held_out"] for r in runs]),
                       "held_out_by_task": _mean_by(per_pairs, held_pairs, 1),
                       "held_out_by_language": _mean_by(per_pairs, held_pairs, 0)})
        for k in ("held_out_task_only", "held_out_language_only", "held_out_language_half"):
            if k in runs[0]["final"]:
                out[m][k] = _stats([r["final"][k] for r in runs])
        if "task_only_per_pair" in runs[0]["final"]:
            out[m]["held_out_by_task_task_only"] = _mean_by([r["final"]["task_only_per_pair"] for r in runs],
                                                            held_pairs, 1)
        ref = _lora_of(m)
        if m != ref and ref in keys:
            d = [r["final"]["held_out"] - s["methods"][ref]["final"]["held_out"] for s, r in zip(seeds, runs)]
            out[m]["held_out_vs_lora"] = {**_stats(d), "wins": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d)}
    return {"methods": out, "base": _stats([s["base"]["copy_exact_match"] for s in seeds]) if seeds else None,
            "findings": findings(out)}


def findings(summary: dict) -> list[str]:
    """What the numbers say, in sentences (no judgement beyond the numbers)."""
    if not summary:
        return []
    lines = []
    if not all("held_out" in s for s in summary.values()):
        best = max(summary, key=lambda m: summary[m]["seen"]["mean"])
        return [f"Held-out pairs were not evaluated (seen pairs only). Best seen exact match: "
                f"{summary[best]['label']}, {100 * summary[best]['seen']['mean']:.1f}%."]
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
                         f"{100 * s['held_out_language_only']['mean']:.1f}%, language adapter at half scale "
                         f"{100 * s['held_out_language_half']['mean']:.1f}% (both: {100 * s['held_out']['mean']:.1f}%).")
    tasks = list(next(iter(summary.values()))["held_out_by_task"])
    lines.append("Held-out exact match by task (mean over seeds): " + "; ".join(
        f"{s['label'].split(' (')[0]}: " + ", ".join(f"{t} {100 * s['held_out_by_task'][t]:.0f}%" for t in tasks)
        for s in summary.values()) + ".")
    return lines


RECORDED_RESULTS = "examples/results/numbers_composition/ (results.md, findings.md) in the repository"


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
    runs = summ["methods"]
    held = all("held_out" in r for r in runs.values())
    lines += ["Exact match (%) of the whole target at the end of training, mean ± std over seeds [min, max]:", "",
              "| method | seen pairs | " + ("held-out pairs (zero-shot) | " if held else "")
              + "lr | trainable params | time / seed |", "|---|---|" + ("---|" if held else "") + "---|---|---|"]
    for s in runs.values():
        lines.append(f"| {s['label']} | {_pct(s['seen'])} | " + (f"{_pct(s['held_out'])} | " if held else "")
                     + f"{s.get('lr') or cfg['lr']:g} | {s['trainable_params']:,} | {s['seconds']:.0f} s |")
    lines += ["", "Seen exact match (%) by task (mean over seeds):", "",
              "| method | " + " | ".join(cfg["tasks"]) + " |", "|---|" + "---|" * len(cfg["tasks"])]
    for s in runs.values():
        lines.append(f"| {s['label']} | " + " | ".join(f"{100 * s['seen_by_task'][t]:.0f}" if t in s.get("seen_by_task", {})
                                                       else "-" for t in cfg["tasks"]) + " |")
    if held:
        for title, key, names in (("task (each seed holds out one pair per task", "held_out_by_task", cfg["tasks"]),
                                  ("language (each seed holds out one pair per language", "held_out_by_language",
                                   cfg["languages"])):
            lines += ["", f"Held-out exact match (%) by {title}; mean over seeds):", "",
                      "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for s in runs.values():
                lines.append(f"| {s['label']} | " + " | ".join(f"{100 * s[key].get(t, float('nan')):.0f}"
                                                               for t in names) + " |")
        diag = {k: s for k, s in runs.items() if "held_out_task_only" in s}
        if diag:
            lines += ["", "FLix on held-out pairs with its adapters changed at evaluation (%, mean ± std [min, max]); "
                          "task only by task in the last column:", "",
                      "| method | both (as trained) | task adapter only | language adapter only | "
                      "language adapter at half scale | task only: " + " / ".join(cfg["tasks"]) + " |",
                      "|---|---|---|---|---|---|"]
            for s in diag.values():
                by = s.get("held_out_by_task_task_only", {})
                lines.append(f"| {s['label']} | {_pct(s['held_out'])} | {_pct(s['held_out_task_only'])} | "
                             f"{_pct(s['held_out_language_only'])} | {_pct(s['held_out_language_half'])} | "
                             + " / ".join(f"{100 * by[t]:.0f}" if t in by else "-" for t in cfg["tasks"]) + " |")
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
              "", "Per seed (seen" + (" / held-out" if held else "") + " exact match %):", "",
              "| seed | held out | " + " | ".join(runs) + " |", "|---|---|" + "---|" * len(runs)]
    for s in record["seeds"]:
        lines.append(f"| {s['seed']} | {', '.join(s['held_out_pairs'])} | " + " | ".join(
            f"{100 * r['final']['seen']:.0f}" + (f" / {100 * r['final']['held_out']:.0f}" if held else "")
            for r in s["methods"].values()) + " |")
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
    held = all("held_out" in r for r in record["summary"]["methods"].values())
    fig, axes = plt.subplots(1, 2 if held else 1, figsize=(11 if held else 6, 4.2), sharey=True, squeeze=False)
    axes = axes[0]
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
    axes[-1].legend(fontsize=7, loc="upper left")
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
    held = all("held_out" in s for s in summ.values())
    for h in ("method", "seen pairs") + (("held-out pairs",) if held else ()) + ("params", "time / seed"):
        t.add_column(h, justify="left" if h == "method" else "right")
    for s in summ.values():
        t.add_row(escape(s["label"]), _pct(s["seen"]), *([_pct(s["held_out"])] if held else []), f"{s['trainable_params']:,}",
                  f"{s['seconds']:.0f} s")
    con.print(t)
    for f in record["summary"]["findings"]:
        con.print("- " + escape(f))
    if record.get("caveat"):
        con.print(f"[bold yellow]{escape(record['caveat'])}[/]")
    out = record.get("outputs", {})
    if out:
        print("wrote " + ", ".join(v for k, v in out.items() if k != "plot_note") + (f"; {out['plot_note']}" if "plot_note" in out else ""))


__all__ = ["caveat", "console", "design", "findings", "markdown", "plot", "provenance", "summarize", "write"]
