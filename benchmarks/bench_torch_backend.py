"""Backend "torch" against what a user would otherwise write, on the current device (CPU here).

Compared side by side on the same inputs, forward and forward+backward:
  base      F.linear alone (the floor of any FLix layer);
  loop      per-feature index_select / matmul / index_add (PEFT mixed-batch style; our oracle);
  masked    dense LoRA over *all* features' rank slices with a per-token mask;
  dense / grouped / auto   backend "torch" with its strategy forced, and as it picks (dense only
                           where every example shares one feature set: elsewhere it is not exact).
Each variant's output is checked against the loop in float64 before anything is timed.
Also reported: the low-rank FLOPs of each variant and the floor of the low-rank part
(active FLOPs over the measured GEMM rate). Every timing is taken twice, the repeat after the
case's other variants, with the suite's timer (:mod:`flix_kernels.bench.timing`); ratios the
noise could explain are marked as in ``flix-kernels bench``. CPU timings are smoke tests of
the code path, not performance results. Writes JSON + markdown to --out.

    python benchmarks/bench_torch_backend.py [--quick] [--out benchmarks/results/cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flix_kernels as fk  # noqa: E402
from benchmarks.results_files import write_results  # noqa: E402
from flix_kernels.backends import torch_backend  # noqa: E402
from flix_kernels.bench import report  # noqa: E402
from flix_kernels.bench.timing import Timer, measured_peaks  # noqa: E402
from flix_kernels.cli import check_out_folder  # noqa: E402
from flix_kernels.reference import flix_delta_reference  # noqa: E402

CPU = torch.device("cpu")


def example_rank_mask(routing, scaling):
    """(B, total_rank) scale of every rank slice per example (0 where unused); built once per batch."""
    space = routing.space
    own = torch.zeros(routing.num_examples, space.total_rank, dtype=torch.float64)
    for k in range(space.num_features):
        has = (routing.feature_ids == k).any(1)
        own[has, space.rank_offsets[k]:space.rank_offsets[k + 1]] = scaling
    return own


def masked_all_features(x, A, B, own):
    """Dense LoRA over every feature's slice, masked per example: what a user writes first."""
    h = x @ A.t() * own.to(x.dtype)[:, None, :]
    return h @ B.t()


def run_case(name, space, ids, L, in_f, out_f, timer):
    gen = torch.Generator().manual_seed(0)
    B = ids.shape[0]
    x = torch.randn(B, L, in_f, generator=gen)
    W = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
    A = torch.randn(space.total_rank, in_f, generator=gen) / in_f**0.5
    Bm = torch.randn(out_f, space.total_rank, generator=gen) / space.total_rank**0.5
    s = 0.5

    def ours(strategy):
        def f(x, A, Bm):
            torch_backend.FORCE_STRATEGY = strategy
            try:
                return fk.flix_delta(x, A, Bm, fk.Routing(ids, space) if strategy else routing, scaling=s, backend="torch")
            finally:
                torch_backend.FORCE_STRATEGY = None
        return f

    routing = fk.Routing(ids, space)
    own = example_rank_mask(routing, s)
    variants = {
        "loop": lambda x, A, Bm: flix_delta_reference(x, A, Bm, ids, space.rank_offsets, s),
        "masked": lambda x, A, Bm: masked_all_features(x, A, Bm, own),
        "dense": ours("dense"),
        "grouped": ours("grouped"),
        "auto": ours(None),
    }
    if routing.uniform_features is None:  # dense is exact only for one shared feature set, so it is not run
        del variants["dense"]
    # Correctness first, in float64 against the loop oracle.
    ref = flix_delta_reference(x.double(), A.double(), Bm.double(), ids, space.rank_offsets, s)
    for v, f in variants.items():
        got = f(x.double(), A.double(), Bm.double())
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}/{v}: {m}")

    T = B * L
    active = sum(sum(space.ranks[k] for k in fk.Routing(ids, space).features_of(b)) for b in range(B)) * L
    timed = []  # (row, fn): each timed once here, then again after the case's other variants

    def first(variant, pass_, fn):
        timed.append(({"variant": variant, "pass": pass_, **timer.first(fn)}, fn))

    first("base F.linear", "fwd", lambda: F.linear(x, W))
    xg, Ag, Bg = x.clone().requires_grad_(True), A.clone().requires_grad_(True), Bm.clone().requires_grad_(True)
    for v, f in variants.items():
        # Routing built once per batch and shared by layers: time the per-layer cost with a warm cache.
        if v in ("dense", "grouped"):
            torch_backend.FORCE_STRATEGY = v
            r = fk.Routing(ids, space)
            fn = lambda r=r: fk.flix_delta(x, A, Bm, r, scaling=s, backend="torch")  # noqa: E731
            fb = lambda r=r: fk.flix_delta(xg, Ag, Bg, r, scaling=s, backend="torch").sum().backward()  # noqa: E731
            fn()
            fb()
            torch_backend.FORCE_STRATEGY = None
        elif v == "auto":
            fn = lambda: fk.flix_delta(x, A, Bm, routing, scaling=s, backend="torch")  # noqa: E731
            fb = lambda: fk.flix_delta(xg, Ag, Bg, routing, scaling=s, backend="torch").sum().backward()  # noqa: E731
        else:
            fn = lambda f=f: f(x, A, Bm)  # noqa: E731
            fb = lambda f=f: f(xg, Ag, Bg).sum().backward()  # noqa: E731
        first(v, "fwd", fn)
        first(v, "fwd+bwd", fb)
    rows = []
    for row, fn in timed:
        timer.repeat(fn, row)
        row["noise"] = report.noise(row)
        rows.append(row)
    base = rows[0]
    for row in rows:
        if row["pass"] == "fwd":
            row["x_base"] = row["median_ms"] / base["median_ms"]
            row["x_base_uncertainty"] = report.combined_spread(row["noise"], base["noise"])
            row["x_base_flag"] = None if row is base else report.ratio_flag(row["x_base"], row["x_base_uncertainty"])
    strategy = torch_backend.plan(routing, routing.layout((B, L)), torch.device("cpu")).strategy
    return {
        "case": name, "B": B, "L": L, "in": in_f, "out": out_f, "features": space.num_features,
        "total_rank": space.total_rank, "tokens": T, "active_rank_per_token": active / T,
        "auto_strategy": strategy, "lowrank_active_flops_fwd": 2 * active * (in_f + out_f),
        "base_flops_fwd": 2 * T * in_f * out_f, "rows": rows,
    }


def _mark(row) -> str:
    return f" {report.MARKS[row['x_base_flag']]}" if row.get("x_base_flag") else ""


def _x_base(row) -> str:
    return f"{row['x_base']:.2f}{_mark(row)}" if "x_base" in row else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes and shorter timings")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu"), metavar="DIR",
                    help="output folder (default: benchmarks/results/cpu)")
    args = ap.parse_args()
    check_out_folder(ap, Path(args.out))
    torch.manual_seed(0)
    timer = Timer(CPU, 200 if args.quick else 500)
    rate = measured_peaks(CPU, torch.float32, timer)["matmul_tflops"] * 1e12
    langs = fk.FeatureSpace({"language": [f"l{i}" for i in range(32)], "task": [f"t{i}" for i in range(32)]}, 16)
    many = fk.FeatureSpace({"language": [f"l{i}" for i in range(1024)]}, 8)
    B, L, D = (8, 64, 512) if args.quick else (8, 256, 1024)
    g = torch.Generator().manual_seed(1)
    two = torch.stack([torch.randint(0, 32, (B,), generator=g), torch.randint(32, 64, (B,), generator=g)], 1)
    cases = [
        ("headline-like: 64 features in 2 groups, r16, 1 language + 1 task", langs, two),
        ("one feature set for the whole batch", langs, two[:1].repeat(B, 1)),
        ("1024 features, one per example", many, torch.randint(0, 1024, (4 * B, 1), generator=g)),
    ]
    results = []
    for name, space, ids in cases:
        Lc = L // 4 if ids.shape[0] > B else L
        res = run_case(name, space, ids, Lc, D, D, timer)
        res["lowrank_floor_ms"] = 1e3 * res["lowrank_active_flops_fwd"] / rate
        results.append(res)
        print(f"\n{name}: B={res['B']} L={res['L']} in=out={D}, auto -> {res['auto_strategy']}, "
              f"low-rank floor {res['lowrank_floor_ms']:.3f} ms")
        for row in res["rows"]:
            print(f"  {row['variant']:14s} {row['pass']:8s} {row['median_ms']:9.3f} ms  (p20 {row['p20_ms']:.3f}, "
                  f"p80 {row['p80_ms']:.3f}, repeat spread {100 * row['spread']:.0f}%){_mark(row)}")
    print("\n" + report.CPU_CAVEAT)
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__), text=True).strip()
    except Exception:
        commit = None
    meta = {"device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)", "torch": torch.__version__,
            "python": platform.python_version(), "flix_kernels": fk.__version__, "commit": commit,
            "threads": torch.get_num_threads(), "measured_gemm_gflops": rate / 1e9, "quick": args.quick}
    lines = [f"# backend 'torch' on {meta['device']}", "",
             f"torch {meta['torch']}, commit {commit}, measured GEMM rate {rate / 1e9:.1f} GFLOP/s, {meta['threads']} threads.", "",
             f"**{report.CPU_CAVEAT}**", "",
             "Median ms (p20-p80), the repeat spread (the second run after the case's other variants), and the "
             f"forward time over base F.linear's. {report.NOISE_RULE} The low-rank floor is the active low-rank FLOPs "
             "over the GEMM rate.", "", f"- {report.LEGEND[report.NOISY]}", ""]
    for res in results:
        lines += [f"## {res['case']}", "",
                  f"B={res['B']}, L={res['L']}, in=out={res['in']}, {res['features']} features, total rank {res['total_rank']}, "
                  f"active rank/token {res['active_rank_per_token']:.0f}; auto picks **{res['auto_strategy']}**; "
                  f"low-rank floor {res['lowrank_floor_ms']:.3f} ms", "",
                  "| variant | pass | median ms | p20-p80 | repeat spread | x base |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['pass']} | {r['median_ms']:.3f} | {r['p20_ms']:.3f}-{r['p80_ms']:.3f} | "
                  f"{100 * r['spread']:.0f}% | {_x_base(r)} |" for r in res["rows"]]
        lines.append("")
    write_results(args.out, {"torch_backend.json": {"meta": meta, "results": results},
                             "torch_backend.md": "\n".join(lines)})
    print(f"\nwrote {args.out}/torch_backend.json and .md")


if __name__ == "__main__":
    main()
