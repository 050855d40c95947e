"""Outputs of ``flix-kernels bench``: ``results.json``, ``results.md``, the plots, the console
table, and the targets the suite reports against.

Targets (:data:`TARGETS`; headline shape, ours = the fastest of our backends there): forward
<= 1.06x base F.linear, backward <= 1.20x, forward+backward <= 1.12x; >= 10x faster than the
per-feature loop; decode T=8 <= 1.30x base (CUDA-graph replays on a GPU); never slower than
PEFT's single LoRA of equal rank, per layer and per training step.

Noise: every timing carries its repeat spread (the relative difference between two identical
runs, taken apart in time, see :mod:`.timing`); its noise is the wider of that spread and its
p20..p80 width over the median. A ratio of two timings is uncertain by their noise combined; a
ratio whose uncertainty is as large as the difference it claims is flagged "noisy" (marked
``~``), and a time below its floor (x floor < 1, impossible) is flagged "below floor" (``!``),
or "noisy" where its noise reaches the floor.
A target is "met" (or "not met") only when its goal lies outside the ratio's uncertainty;
otherwise it is "inconclusive (noisy)" (and "inconclusive (below base)" when ours measures
faster than the base GEMM it contains). On a CPU the timings are smoke tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .._io import atomic_write, atomic_write_text

TARGETS = {"headline forward / base": 1.06, "headline backward / base": 1.20, "headline forward+backward / base": 1.12,
           "torch loop / ours at headline (forward+backward)": 10.0, "decode T=8 forward / base": 1.30,
           "training step / PEFT LoRA": 1.0}
NOISY, BELOW_FLOOR, BELOW_BASE = "noisy", "below floor", "below base"
# The end-to-end steps of a record: the host-bound 110M model, the GPU-bound Llama slice.
E2E_KEYS = ("e2e", "e2e_gpu_bound")
MARKS = {NOISY: "~", BELOW_FLOOR: "!", BELOW_BASE: "!"}
LEGEND = {NOISY: "~ noisy: the noise of the timings behind this ratio (repeat spread, p20..p80 width) is as large "
                 "as the difference it shows, so it is not a result",
          BELOW_FLOOR: "! below floor: faster than the measured peaks allow, which is impossible; the timing (or "
                       "the peak it is compared with) is wrong, so it is not a result",
          BELOW_BASE: "! below base: faster than the base F.linear it contains, which is impossible; the base "
                      "timing is wrong, so the target is not decided"}
INCONCLUSIVE, INCONCLUSIVE_BASE = "inconclusive (noisy)", "inconclusive (below base)"
NOISE_RULE = ("A timing's noise is the wider of its repeat spread and its p20..p80 width over the median; a ratio's "
              "uncertainty combines the noise of its two timings.")
CPU_CAVEAT = ("CPU timings are smoke tests of the code path (every variant is checked against float64, then "
              "timed at scaled-down shapes on shared cores), not performance results; the targets are GPU targets.")


# -- noise ------------------------------------------------------------------------------------
def combined_spread(*spreads: float) -> float:
    """Relative uncertainty of a ratio (or product) of timings with these relative repeat
    spreads, taken at its worst: (1 + s1)(1 + s2)... - 1."""
    u = 1.0
    for s in spreads:
        u *= 1.0 + s
    return u - 1.0


def effect(ratio: float) -> float:
    """The difference a ratio of two times claims, relative to the smaller time (the same
    measure as a repeat spread): 0.5 and 2.0 both claim 1.0 (a factor of two)."""
    return max(ratio, 1.0 / ratio) - 1.0 if ratio > 0 else math.nan  # a zero or NaN time claims nothing


def ratio_flag(ratio: float, uncertainty: float, floor: bool = False) -> str | None:
    """None for a ratio that is a result; "below floor" for a time under its floor by more than
    the noise (``floor``: the ratio is time / floor); "noisy" when the uncertainty is as large as
    the effect (so also for a time under its floor within the noise: not a result either way)."""
    if floor and ratio * (1.0 + uncertainty) < 1.0:
        return BELOW_FLOOR
    if not uncertainty < effect(ratio):  # NaN (an unknown spread) is noisy too
        return NOISY
    return None


def _spread(row) -> float:
    return row.get("spread", math.nan)


def noise(row) -> float:
    """A timing's relative uncertainty: the wider of its repeat spread and its p20..p80 width
    over the median (a run whose samples scatter, as under a busy machine's time slicing, has
    no well-defined middle even when two runs happen to agree)."""
    med = row["median_ms"]
    width = (row["p80_ms"] - row["p20_ms"]) / med if med > 0 else math.nan
    return max(_spread(row), width) if not math.isnan(width) else math.nan


def _peak_spread(record, case_label, mode) -> float:
    """Spread of the measured peak that bounds this case's floor (0 where a record has none)."""
    peaks = record["peaks"]
    case = next((c for c in record["cases"] if c["label"] == case_label), {})
    bound = case.get("floor_bound", {}).get(mode)
    keys = [f"{bound}_spread"] if bound else ["matmul_spread", "copy_spread"]
    return max(peaks.get(k, 0.0) for k in keys)


def _timed(rows):
    return [r for r in rows if "median_ms" in r]


def _lookup(rows, case, variant=None, mode=None, graph=False):
    return [r for r in _timed(rows) if r["case"] == case and (variant is None or r["variant"] == variant)
            and (mode is None or r["mode"] == mode) and r.get("graph", False) == graph]


def best_ours(rows, case, mode, graph=False):
    cands = [r for r in _lookup(rows, case, mode=mode, graph=graph) if r["ours"]]
    return min(cands, key=lambda r: r["median_ms"]) if cands else None


def _ratio(rows, case, variant, mode, graph=False):
    """(other / ours, its uncertainty) at this case and mode, or None."""
    ours = best_ours(rows, case, mode, graph)
    other = _lookup(rows, case, variant, mode, graph)
    if not ours or not other:
        return None
    return other[0]["median_ms"] / ours["median_ms"], combined_spread(noise(other[0]), noise(ours))


COMPARED = (("base F.linear", "ours / base"), ("torch loop", "loop / ours"), ("PEFT LoRA (r=active rank)", "peft / ours"),
            ("torch dense-masked", "dense / ours"), ("torch._grouped_mm", "grouped_mm / ours"),
            ("torch backend + compile", "compiled torch / ours"))


def _target(name, entry, ratio_key, invert=False) -> dict:
    """The verdict on one target: "met" or "not met" only when the goal lies outside the
    ratio's uncertainty; "inconclusive (noisy)" when the noise could put it on either side of the
    goal; "inconclusive (below base)" when ours, which contains the base GEMM, measures faster
    than base F.linear alone by more than the noise (the base timing is wrong)."""
    v, u = entry[ratio_key], entry["uncertainty"][ratio_key]
    goal = TARGETS[name]
    passes = v >= goal if invert else v <= goal
    flag, why = None, None
    if ratio_key == "ours / base" and v * (1 + u) < 1.0:
        flag, why = BELOW_BASE, f"ours at {v:.2f}x the base GEMM it contains (uncertainty {100 * u:.0f}%)"
    elif not u < effect(v / goal):
        flag, why = NOISY, f"uncertainty {100 * u:.0f}% against a distance of {100 * effect(v / goal):.0f}% to the goal"
    verdict = f"inconclusive ({flag})" if flag else "met" if passes else "not met"
    out = {"target": goal, "measured": v, "ours": entry["ours"], "met": verdict == "met", "verdict": verdict,
           "uncertainty": u, "flag": flag}
    if why:
        out["why"] = why
    return out


def _training_step_target(e2e: dict | None) -> dict | None:
    """Our fastest training step over PEFT LoRA's (goal: at most 1.0), with the steps' own noise
    (median against fastest step) as the uncertainty; None without both."""
    rows = (e2e or {}).get("rows", {})
    ours = [(name, r) for name, r in rows.items() if name.startswith("ours: ")]
    peft = rows.get("PEFT LoRA (r=active rank)")
    if not ours or not peft:
        return None
    name, best = min(ours, key=lambda item: item[1]["step_ms"])

    def spread(r):
        return (r["step_ms"] - r.get("step_ms_min", r["step_ms"])) / r["step_ms"]

    entry = {"ours": name, "steps": best["step_ms"] / peft["step_ms"],
             "uncertainty": {"steps": combined_spread(spread(best), spread(peft))}}
    return _target("training step / PEFT LoRA", entry, "steps")


def _auto_target(cls: str, measured: list[str], noisy: bool) -> dict:
    """Whether :data:`flix_kernels.backends.AUTO_TABLE` tries this run's fastest backend first
    among those measured (the table is what "auto" uses; the bench checks it against its own run)."""
    from ..backends import AUTO_TABLE

    table = [b for b in AUTO_TABLE[cls] if b in measured]
    met = bool(table) and table[0] == measured[0]
    verdict = "met" if met else INCONCLUSIVE if noisy else "not met"
    return {"target": f"AUTO_TABLE[{cls!r}] first = the fastest measured", "met": verdict == "met", "verdict": verdict,
            "measured": f"measured order {measured}, AUTO_TABLE order {table}"}


def summarize(record: dict) -> dict:
    """Ratios per case (with their uncertainty and flags) and the targets: the measured figure,
    its verdict ("met", "not met", "inconclusive (noisy)") and ``met`` (true only when met)."""
    rows, cuda = record["rows"], record["device"]["type"] == "cuda"
    ratios = {}
    for case in sorted({r["case"] for r in _timed(rows)}):
        for mode in ("forward", "backward", "forward+backward"):
            for graph in (False, True):
                ours = best_ours(rows, case, mode, graph)
                if not ours:
                    continue
                entry = {"ours": ours["variant"], "ours_ms": ours["median_ms"], "ours_noise": noise(ours),
                         "uncertainty": {}, "flags": {}}
                for name, key in COMPARED:
                    got = _ratio(rows, case, name, mode, graph)
                    if got is not None:
                        r, u = got
                        entry[key] = 1 / r if key == "ours / base" else r
                        entry["uncertainty"][key] = u
                        if ratio_flag(r, u):
                            entry["flags"][key] = ratio_flag(r, u)
                ratios[f"{case} | {mode}{' | graph' if graph else ''}"] = entry
    targets = {}
    decode_key = f"decode T=8 | forward{' | graph' if cuda else ''}"
    for name, key, ratio_key, invert in (
            ("headline forward / base", "headline | forward", "ours / base", False),
            ("headline backward / base", "headline | backward", "ours / base", False),
            ("headline forward+backward / base", "headline | forward+backward", "ours / base", False),
            ("torch loop / ours at headline (forward+backward)", "headline | forward+backward", "loop / ours", True),
            ("decode T=8 forward / base", decode_key, "ours / base", False)):
        e = ratios.get(key)
        if e and ratio_key in e:
            targets[name] = _target(name, e, ratio_key, invert)
    peft = [(k, e["peft / ours"], e["flags"].get("peft / ours")) for k, e in ratios.items() if "peft / ours" in e]
    slower = [f"{k}: {v:.2f}x" for k, v, flag in peft if v < 1.0 and not flag]
    noisy = [f"{k}: {v:.2f}x {MARKS[flag]}" for k, v, flag in peft if flag]
    verdict = "not met" if slower else INCONCLUSIVE if noisy else "met"
    if peft:
        targets["never slower than PEFT LoRA"] = {
            "target": "peft / ours >= 1 everywhere", "met": verdict == "met", "verdict": verdict,
            "measured": slower or noisy or "met in every measured case", "noisy": noisy}
    for key in E2E_KEYS:
        if (step := _training_step_target(record.get(key))) is not None:
            targets["training step / PEFT LoRA" + (" (GPU-bound slice)" if key != "e2e" else "")] = step
    auto, auto_noisy = {}, {}  # what the measurements say flix_kernels.backends.AUTO_TABLE should try first
    for cls, key in (("decode", decode_key), ("prefill", "headline | forward+backward")):
        case, mode = key.split(" | ")[:2]
        cands = sorted((r for r in _lookup(rows, case, mode=mode, graph=" | graph" in key) if r["ours"]),
                       key=lambda r: r["median_ms"])
        if cands:
            auto[cls] = [r["variant"].removeprefix("ours: ") for r in cands]
            auto_noisy[cls] = any(ratio_flag(b["median_ms"] / a["median_ms"], combined_spread(noise(a), noise(b)))
                                  for a, b in zip(cands, cands[1:]))
            if cuda:  # "auto" is "torch" off a GPU by design
                targets[f'"auto" picks the measured fastest ({cls})'] = _auto_target(cls, auto[cls], auto_noisy[cls])
    flagged = {NOISY: 0, BELOW_FLOOR: 0, "ratios": 0}
    for r in _timed(rows):
        for kind in ("x base", "x floor"):
            got = row_ratio(record, r, kind)
            if got:
                flagged["ratios"] += 1
                if got[2]:
                    flagged[got[2]] += 1
    notes = [busy] if (busy := busy_note(record)) else []
    if flagged[NOISY] or flagged[BELOW_FLOOR]:
        notes.append(f"{flagged[NOISY]} of {flagged['ratios']} ratios in the timings table are noisy and "
                     f"{flagged[BELOW_FLOOR]} are below their floor; they are marked and are not results.")
    return {"ratios": ratios, "targets": targets, "measured_auto_order": auto, "measured_auto_order_noisy": auto_noisy,
            "flagged": flagged, "caveat": None if cuda else CPU_CAVEAT, "notes": notes}


def busy_note(record: dict) -> str | None:
    """A sentence when the host's load average exceeded its cores by more than one while the
    run measured (its own threads count too, hence the margin), else None."""
    load = record.get("host_load") or {}
    seen = [x for x in (load.get("start"), load.get("end")) if x is not None]
    if not seen or not load.get("cores") or max(seen) <= load["cores"] + 1:
        return None
    return (f"The machine was busy during this run (1-minute load average up to {max(seen):.1f} on {load['cores']} "
            "cores): other processes took CPU time, so the timings include their interference.")


def row_ratio(record: dict, row: dict, kind: str):
    """``(value, uncertainty, flag)`` of a timed row's "x base" (time / base F.linear's at the
    same case and mode) or "x floor" (time / the case's floor), or None where there is none."""
    if kind == "x base":
        base = _lookup(record["rows"], row["case"], "base F.linear", row["mode"], row.get("graph", False))
        if not base:
            return None
        v, u = row["median_ms"] / base[0]["median_ms"], combined_spread(noise(row), noise(base[0]))
        if base[0] is row:  # 1 by definition, not a measured difference
            return v, u, None
        return v, u, ratio_flag(v, u)
    floor = next((c["floors_ms"].get(row["mode"]) for c in record["cases"] if c["label"] == row["case"]), None)
    if not floor:
        return None
    v = row["median_ms"] / floor
    u = combined_spread(noise(row), _peak_spread(record, row["case"], row["mode"]))
    return v, u, ratio_flag(v, u, floor=True)


def annotate(record: dict) -> dict:
    """Add the summary and, on every timed row, its :func:`noise` and its ratios with their
    uncertainty and flag (``x_base``, ``x_base_uncertainty``, ``x_base_flag``, the same for
    ``x_floor``)."""
    for r in _timed(record["rows"]):
        r["noise"] = noise(r)
        for kind in ("x base", "x floor"):
            got = row_ratio(record, r, kind)
            if got:
                key = kind.replace(" ", "_")
                r[key], r[key + "_uncertainty"], r[key + "_flag"] = got
    record["summary"] = summarize(record)
    return record


def write_json(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=1, default=str))


def _fmt(ms):
    return "" if ms is None else (f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3f} ms")


def _ratio_cell(got) -> str:
    if got is None:
        return ""
    v, _, flag = got
    return f"{v:.2f}" + (f" {MARKS[flag]}" if flag else "")


def table_rows(record: dict) -> list[list[str]]:
    """One row per timing: case, variant, mode, median, p20 .. p80, repeat spread, x base,
    x floor (ratios marked ``~`` noisy or ``!`` below floor), peak MiB."""
    out = []
    for r in record["rows"]:
        if "median_ms" not in r:
            out.append([r["case"], r["variant"], r.get("mode", ""), "", "error: " + r.get("error", ""), "", "", "", ""])
            continue
        mem = r.get("peak_mem_mib")
        out.append([r["case"], r["variant"], r["mode"] + (" [graph]" if r.get("graph") else ""), _fmt(r["median_ms"]),
                    f"{_fmt(r['p20_ms'])} .. {_fmt(r['p80_ms'])}", f"{100 * _spread(r):.1f}%",
                    _ratio_cell(row_ratio(record, r, "x base")), _ratio_cell(row_ratio(record, r, "x floor")),
                    "" if mem is None else f"{mem:.0f}"])
    return out


HEADER = ["case", "variant", "mode", "median", "p20 .. p80", "repeat spread", "x base", "x floor", "peak MiB"]
VERDICT_CELL = {"met": "yes", "not met": "**no**", INCONCLUSIVE: INCONCLUSIVE, INCONCLUSIVE_BASE: INCONCLUSIVE_BASE}


def _verdict(t: dict) -> str:
    return t.get("verdict") or ("met" if t["met"] else "not met")  # records written before verdicts


def _measured(t: dict) -> str:
    m = t["measured"]
    if isinstance(m, list):
        return ", ".join(m)
    if isinstance(m, str):
        return m
    return f"{m:.3f}" + (f" ±{100 * t['uncertainty']:.0f}%" if "uncertainty" in t else "") + \
        (f" {MARKS[t['flag']]}" if t.get("flag") else "")


def _e2e_spread(r: dict) -> str:
    return f"{100 * r['spread']:.0f}%" if "spread" in r else ""


def legend(record: dict) -> list[str]:
    """The legend lines of the markers that appear in this record's tables."""
    shown = set()
    for r in _timed(record["rows"]):
        for kind in ("x base", "x floor"):
            got = row_ratio(record, r, kind)
            if got and got[2]:
                shown.add(got[2])
    for t in record.get("summary", {}).get("targets", {}).values():
        if t.get("flag"):
            shown.add(t["flag"])
        if t.get("noisy"):
            shown.add(NOISY)
    return [LEGEND[k] for k in (NOISY, BELOW_FLOOR, BELOW_BASE) if k in shown]


def markdown(record: dict) -> str:
    dev, v = record["device"], record["versions"]
    p = record["peaks"]
    lines = [f"# flix-kernels bench: {dev['name']}", "",
             f"commit `{record['commit'][:12]}`, {record['date']}; torch {v['torch']}, triton {v.get('triton')}, "
             f"CUDA {v.get('cuda')}, peft {v.get('peft')}; dtype {record['dtype']}"
             + (f"; clocks {dev.get('clocks')}" if dev.get("clocks") else ""), ""]
    s = record.get("summary", {})
    if s.get("caveat"):
        lines += [f"**{s['caveat']}**", ""]
    lines += [f"Measured peaks: {p['matmul_dtype']} matmul {p['matmul_tflops']:.1f} TFLOP/s, copy {p['copy_GBps']:.0f} GB/s. "
              f"Method: {record['method']}. {NOISE_RULE}", ""]
    lines += [*s.get("notes", []), ""] if s.get("notes") else []
    if record.get("cuda"):
        lines += [f"CUDA paths: the decode path (csrc/decode.cu, at most 64 tokens) "
                  f"{'on' if record['cuda']['decode_path'] else 'off (FLIX_CUDA_DECODE=0)'}.", ""]
    if record.get("triton"):
        t = record["triton"]
        lines += [f"Triton paths: fused base GEMM {'on' if t['fuse_base'] else 'off'} by default, "
                  f"{'through TMA' if t['tma'] else 'by pointers'} where fused; g and dB "
                  f"{'from one pass over dy' if t.get('dy_pass', True) else 'by two passes'} above decode sizes; autotuning "
                  f"{'on (' + str(len(t['tuned'])) + ' shape classes tuned, in results.json)' if t['autotune'] else 'off'}.",
                  ""]
    legend_lines = [f"- {x}" for x in legend(record)]
    if s.get("targets"):
        lines += ["## Targets", "", "| target | goal | measured | ours | met |", "|---|---|---|---|---|"]
        for name, t in s["targets"].items():
            lines.append(f"| {name} | {t['target']} | {_measured(t)} | {t.get('ours', '')} | "
                         f"{VERDICT_CELL[_verdict(t)]} |")
        lines.append("")
    if record["rows"]:
        lines += ["## All timings", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(record)]
    if legend_lines:
        lines += [""] + legend_lines
    for e2e in (record.get(k) for k in E2E_KEYS):
        if not (e2e and "rows" in e2e):
            continue
        m = e2e["model"]
        lines += ["", f"## End to end: training step, Llama-style {m['parameters'] / 1e6:.0f}M parameters "
                      f"({m['num_hidden_layers']} layers of {m['hidden_size']}), batch "
                      f"{e2e['batch']} x {e2e['seq_len']}, {e2e['dtype']}, adapters on every linear layer", "",
                  "| variant | step (median) | step spread | tokens/s | peak MiB | trainable params |",
                  "|---|---|---|---|---|---|"]
        for name, r in e2e["rows"].items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error']} | | | | |")
            else:
                mem = "" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
                lines.append(f"| {name} | {r['step_ms']:.1f} ms | {_e2e_spread(r)} | {r['tokens_per_s']:.0f} | {mem} | "
                             f"{r['trainable_params'] / 1e6:.2f}M |")
    if record.get("kernels", {}).get("rows"):
        from .kernels import markdown_lines as kernel_lines

        lines += ["", *kernel_lines(record["kernels"])]
    if record.get("overhead", {}).get("rows"):
        from .overhead import markdown_lines

        lines += ["", *markdown_lines(record["overhead"])]
    if record.get("serving", {}).get("rows"):
        from .serving import markdown_lines as serving_lines

        lines += ["", *serving_lines(record["serving"])]
    if record.get("quantized", {}).get("models"):
        from .quantized import markdown_lines as quantized_lines

        lines += ["", *quantized_lines(record["quantized"])]
    elif record.get("quantized", {}).get("skipped"):
        lines += ["", f"Quantized base: not run ({record['quantized']['skipped']})"]
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
    if not _timed(rows):  # an overhead-only run: its numbers are in the tables
        return []
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
    """The summary tables on the terminal (rich when installed, plain text otherwise), with the
    legend of the noise markers and, on a CPU, the caveat that the timings are smoke tests."""
    rows = table_rows(record)
    s = record.get("summary", {})
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        print(markdown(record))
        return
    con = Console(width=None if Console().is_terminal else 160)
    t = None if not rows else Table(title=f"flix-kernels bench on {escape(record['device']['name'])} ({record['dtype']}); details in results.md")
    for h in ("case", "variant", "mode", "median", "noise", "x base", "x floor", "peak MiB") if t else ():
        t.add_column(h, justify="left" if h in ("case", "variant", "mode") else "right")
    for row, r in zip(rows, record["rows"]):
        cells = row[:4] + [f"{100 * noise(r):.0f}%" if "median_ms" in r else ""] + row[6:]
        t.add_row(*map(escape, cells), style="bold" if row[1].startswith("ours") else None)
    if t:
        con.print(t)
    if s.get("targets"):
        tt = Table(title="targets")
        for h in ("target", "goal", "measured", "ours", "met"):
            tt.add_column(h)
        style = {"met": "[green]yes[/]", "not met": "[red]no[/]", INCONCLUSIVE: f"[yellow]{INCONCLUSIVE}[/]",
                 INCONCLUSIVE_BASE: f"[yellow]{INCONCLUSIVE_BASE}[/]"}
        for name, x in s["targets"].items():
            tt.add_row(escape(name), escape(str(x["target"])), escape(_measured(x)), escape(x.get("ours", "")),
                       style[_verdict(x)])
        con.print(tt)
    for e2e in (record.get(k) for k in E2E_KEYS):
        if not (e2e and "rows" in e2e):
            continue
        et = Table(title=f"training step, {e2e['model']['parameters'] / 1e6:.1f}M-parameter Llama, {e2e['batch']}x{e2e['seq_len']}")
        for h in ("variant", "step ms", "spread", "tokens/s", "peak MiB"):
            et.add_column(h)
        for name, r in e2e["rows"].items():
            if "error" in r:
                et.add_row(escape(name), escape("error: " + r["error"]), "", "", "")
            else:
                et.add_row(escape(name), f"{r['step_ms']:.1f}", _e2e_spread(r), f"{r['tokens_per_s']:.0f}",
                           "" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}")
        con.print(et)
    ov = record.get("overhead", {})
    if ov.get("rows"):
        peft = {(r["tokens"], r["mode"]): r["median_us"] for r in ov["rows"] if r["variant"].startswith("PEFT")}
        ot = Table(title="host overhead per layer call (launches of the kernel backends recorded and skipped)")
        for h in ("variant", "T", "mode", "host us", "noise", "x PEFT", "launches"):
            ot.add_column(h)
        from .overhead import row_noise

        for r in ov["rows"]:
            ref = peft.get((r["tokens"], r["mode"]))
            ot.add_row(escape(r["variant"]), str(r["tokens"]), r["mode"], f"{r['median_us']:.1f}",
                       f"{100 * row_noise(r):.0f}%", "" if not ref else f"{r['median_us'] / ref:.2f}",
                       f"{r['launches']['kernels']} + {r['launches']['torch_ops']}",
                       style="bold" if r["variant"].startswith("ours") else None)
        con.print(ot)
        for name, x in ov.get("targets", {}).items():
            con.print(escape(f"{name}: {x['measured']} (goal {x['goal']}) {x['verdict']}"))
    for line in legend(record) + s.get("notes", []):
        con.print(escape(line))
    if s.get("caveat"):
        con.print(f"[bold yellow]{escape(s['caveat'])}[/]")
    for f in record.get("failures", []):
        con.print(f"[red]FAILED[/] {escape(f)}")
