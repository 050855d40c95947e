"""Outputs of ``flix-kernels bench``: ``results.json``, ``results.md``, the plots, the console
table, and the targets the suite reports against.

Targets (headline shape, ours = the fastest of our backends there): forward <= 1.08x base
F.linear, forward+backward <= 1.20x; >= 10x faster than the per-feature loop; decode T=8 <=
1.25x base (CUDA-graph replays on a GPU); never slower than PEFT's single LoRA of equal rank.
"""

from __future__ import annotations

import json
from pathlib import Path

from .._io import atomic_write, atomic_write_text

TARGETS = {"headline forward / base": 1.08, "headline forward+backward / base": 1.20,
           "torch loop / ours at headline (forward+backward)": 10.0, "decode T=8 forward / base": 1.25}


def _timed(rows):
    return [r for r in rows if "median_ms" in r]


def _lookup(rows, case, variant=None, mode=None, graph=False):
    return [r for r in _timed(rows) if r["case"] == case and (variant is None or r["variant"] == variant)
            and (mode is None or r["mode"] == mode) and r.get("graph", False) == graph]


def best_ours(rows, case, mode, graph=False):
    cands = [r for r in _lookup(rows, case, mode=mode, graph=graph) if r["ours"]]
    return min(cands, key=lambda r: r["median_ms"]) if cands else None


def _ratio(rows, case, variant, mode, graph=False):
    ours = best_ours(rows, case, mode, graph)
    other = _lookup(rows, case, variant, mode, graph)
    if not ours or not other:
        return None, None
    return other[0]["median_ms"] / ours["median_ms"], ours["variant"]


def summarize(record: dict) -> dict:
    """Ratios per case and the targets, with the measured figure and whether each is met."""
    rows, cuda = record["rows"], record["device"]["type"] == "cuda"
    ratios = {}
    for case in {r["case"] for r in _timed(rows)}:
        for mode in ("forward", "forward+backward"):
            for graph in (False, True):
                ours = best_ours(rows, case, mode, graph)
                if not ours:
                    continue
                entry = {"ours": ours["variant"], "ours_ms": ours["median_ms"]}
                for name, key in (("base F.linear", "ours / base"), ("torch loop", "loop / ours"),
                                  ("PEFT LoRA (r=active rank)", "peft / ours"), ("torch dense-masked", "dense / ours"),
                                  ("torch._grouped_mm", "grouped_mm / ours"),
                                  ("torch backend + compile", "compiled torch / ours")):
                    r, _ = _ratio(rows, case, name, mode, graph)
                    if r is not None:
                        entry[key] = 1 / r if key == "ours / base" else r
                ratios[f"{case} | {mode}{' | graph' if graph else ''}"] = entry
    targets = {}

    def target(name, key, ratio_key, invert=False):
        e = ratios.get(key)
        if e and ratio_key in e:
            v = e[ratio_key]
            targets[name] = {"target": TARGETS[name], "measured": v, "ours": e["ours"],
                             "met": v >= TARGETS[name] if invert else v <= TARGETS[name]}

    target("headline forward / base", "headline | forward", "ours / base")
    target("headline forward+backward / base", "headline | forward+backward", "ours / base")
    target("torch loop / ours at headline (forward+backward)", "headline | forward+backward", "loop / ours", True)
    target("decode T=8 forward / base", f"decode T=8 | forward{' | graph' if cuda else ''}", "ours / base")
    slower = [f"{k}: {e['peft / ours']:.2f}x" for k, e in ratios.items() if e.get("peft / ours", 2) < 1.0]
    targets["never slower than PEFT LoRA"] = {"target": "peft / ours >= 1 everywhere", "met": not slower,
                                             "measured": slower or "met in every measured case"}
    auto = {}  # what the measurements say flix_kernels.backends.AUTO_TABLE should try first
    for cls, key in (("decode", f"decode T=8 | forward{' | graph' if cuda else ''}"),
                     ("prefill", "headline | forward+backward")):
        cands = sorted((r for r in _lookup(rows, key.split(" | ")[0], mode=key.split(" | ")[1], graph=" | graph" in key)
                        if r["ours"]), key=lambda r: r["median_ms"])
        if cands:
            auto[cls] = [r["variant"].removeprefix("ours: ") for r in cands]
    return {"ratios": ratios, "targets": targets, "measured_auto_order": auto}


def write_json(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=1, default=str))


def _fmt(ms):
    return "" if ms is None else (f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3f} ms")


def table_rows(record: dict) -> list[list[str]]:
    floors = {c["label"]: c["floors_ms"] for c in record["cases"]}
    out = []
    for r in record["rows"]:
        if "median_ms" not in r:
            out.append([r["case"], r["variant"], r.get("mode", ""), "", "error: " + r.get("error", ""), "", "", "", ""])
            continue
        base = _lookup(record["rows"], r["case"], "base F.linear", r["mode"], r.get("graph", False))
        ratio = f"{r['median_ms'] / base[0]['median_ms']:.2f}" if base else ""
        floor = floors.get(r["case"], {}).get(r["mode"])
        mem = r.get("peak_mem_mib")
        out.append([r["case"], r["variant"], r["mode"] + (" [graph]" if r.get("graph") else ""), _fmt(r["median_ms"]),
                    f"{_fmt(r['p20_ms'])} .. {_fmt(r['p80_ms'])}", f"{100 * r['spread']:.1f}%", ratio,
                    f"{r['median_ms'] / floor:.2f}" if floor else "", "" if mem is None else f"{mem:.0f}"])
    return out


HEADER = ["case", "variant", "mode", "median", "p20 .. p80", "repeat spread", "x base", "x floor", "peak MiB"]


def markdown(record: dict) -> str:
    dev, v = record["device"], record["versions"]
    p = record["peaks"]
    lines = [f"# flix-kernels bench: {dev['name']}", "",
             f"commit `{record['commit'][:12]}`, {record['date']}; torch {v['torch']}, triton {v.get('triton')}, "
             f"CUDA {v.get('cuda')}, peft {v.get('peft')}; dtype {record['dtype']}"
             + (f"; clocks {dev.get('clocks')}" if dev.get("clocks") else ""), "",
             f"Measured peaks: {p['matmul_dtype']} matmul {p['matmul_tflops']:.1f} TFLOP/s, copy {p['copy_GBps']:.0f} GB/s. "
             f"Method: {record['method']}.", ""]
    s = record.get("summary", {})
    if s.get("targets"):
        lines += ["## Targets", "", "| target | goal | measured | ours | met |", "|---|---|---|---|---|"]
        for name, t in s["targets"].items():
            m = t["measured"]
            lines.append(f"| {name} | {t['target']} | {m if isinstance(m, (str, list)) else f'{m:.3f}'} | "
                         f"{t.get('ours', '')} | {'yes' if t['met'] else '**no**'} |")
        lines.append("")
    lines += ["## All timings", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(record)]
    e2e = record.get("e2e")
    if e2e and "rows" in e2e:
        m = e2e["model"]
        lines += ["", f"## End to end: training step, Llama-style {m['parameters'] / 1e6:.0f}M parameters, batch "
                      f"{e2e['batch']} x {e2e['seq_len']}, {e2e['dtype']}, adapters on every linear layer", "",
                  "| variant | step | tokens/s | peak MiB | trainable params |", "|---|---|---|---|---|"]
        for name, r in e2e["rows"].items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error']} | | | |")
            else:
                mem = "" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
                lines.append(f"| {name} | {r['step_ms']:.1f} ms | {r['tokens_per_s']:.0f} | {mem} | "
                             f"{r['trainable_params'] / 1e6:.2f}M |")
    if record.get("skipped"):
        lines += ["", "Not run here: " + "; ".join(f"{k} ({v})" for k, v in record["skipped"].items())]
    if record.get("backends_unavailable"):
        lines += ["", "Backends unavailable here: " + "; ".join(f"{k} ({v})" for k, v in record["backends_unavailable"].items())]
    if record.get("failures"):
        lines += ["", "## FAILURES", ""] + [f"- {f}" for f in record["failures"]]
    return "\n".join(lines) + "\n"


def plots(record: dict, out_dir: Path) -> list[Path]:
    """``speedup_vs_tokens.png`` (time relative to base F.linear against tokens, per variant)
    and ``headline.png`` (every variant at the headline shape). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = record["rows"]
    tokens = {c["label"]: c["tokens"] for c in record["cases"]}
    token_cases = sorted((c for c in tokens if c.startswith(("decode", "tokens=")) or c == "headline"),
                         key=lambda c: tokens[c])
    written = []
    graph = record["device"]["type"] == "cuda"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, mode in zip(axes, ("forward", "forward+backward")):
        series = {}
        for c in token_cases:
            base = _lookup(rows, c, "base F.linear", mode)
            if not base:
                continue
            for r in _lookup(rows, c, mode=mode):
                if r["variant"] != "base F.linear":
                    series.setdefault(r["variant"], {})[tokens[c]] = r["median_ms"] / base[0]["median_ms"]
            if graph:
                gb = _lookup(rows, c, "base F.linear", mode, True)
                for r in _lookup(rows, c, mode=mode, graph=True):
                    if r["ours"] and gb:
                        series.setdefault(r["variant"] + " [graph]", {})[tokens[c]] = r["median_ms"] / gb[0]["median_ms"]
        for name, pts in sorted(series.items()):
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=name, linewidth=2.5 if name.startswith("ours") else 1.2)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("time / base F.linear (lower is better)")
        ax.set_title(f"{mode}, {record['device']['name']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out_dir / "speedup_vs_tokens.png"))
    plt.close(fig)

    head = [r for r in _lookup(rows, "headline") if r["mode"] in ("forward", "forward+backward")]
    if head:
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(head) + 1))
        labels = [f"{r['variant']} | {r['mode']}" for r in head]
        ax.barh(labels, [r["median_ms"] for r in head], color=["C1" if r["ours"] else "C0" for r in head])
        ax.set_xlabel("median ms")
        ax.set_title(f"headline shape, eager, {record['device']['name']}")
        ax.invert_yaxis()
        fig.tight_layout()
        written.append(_save(fig, out_dir / "headline.png"))
        plt.close(fig)
    return written


def _save(fig, path: Path) -> Path:
    atomic_write(str(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path


def console(record: dict) -> None:
    """The summary tables on the terminal (rich when installed, plain text otherwise)."""
    rows = table_rows(record)
    s = record.get("summary", {})
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown(record))
        return
    con = Console(width=None if Console().is_terminal else 160)
    t = Table(title=f"flix-kernels bench on {record['device']['name']} ({record['dtype']}); details in results.md")
    for h in ("case", "variant", "mode", "median", "x base", "x floor", "peak MiB"):
        t.add_column(h, justify="left" if h in ("case", "variant", "mode") else "right")
    for row in rows:
        t.add_row(*row[:4], *row[6:], style="bold" if row[1].startswith("ours") else None)
    con.print(t)
    if s.get("targets"):
        tt = Table(title="targets")
        for h in ("target", "goal", "measured", "ours", "met"):
            tt.add_column(h)
        for name, x in s["targets"].items():
            m = x["measured"]
            tt.add_row(name, str(x["target"]), m if isinstance(m, str) else (", ".join(m) if isinstance(m, list) else f"{m:.3f}"),
                       x.get("ours", ""), "[green]yes[/]" if x["met"] else "[red]no[/]")
        con.print(tt)
    e2e = record.get("e2e")
    if e2e and "rows" in e2e:
        et = Table(title=f"training step, {e2e['model']['parameters'] / 1e6:.1f}M-parameter Llama, {e2e['batch']}x{e2e['seq_len']}")
        for h in ("variant", "step ms", "tokens/s", "peak MiB"):
            et.add_column(h)
        for name, r in e2e["rows"].items():
            if "error" in r:
                et.add_row(name, "error: " + r["error"], "", "")
            else:
                et.add_row(name, f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:.0f}",
                           "" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}")
        con.print(et)
    for f in record.get("failures", []):
        con.print(f"[red]FAILED[/] {f}")
