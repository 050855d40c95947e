"""Launch-config sweep for the OFA kernels (GPU only): each kernel role of
:mod:`flix_kernels.ofa.kernel` on the shapes of ``bench_ofa.py``, one candidate config at a time,
next to the torch/cuBLAS call that does the same piece of work. Every candidate's result is
compared with the default config's before it is timed. The chosen defaults in ``_blocks`` cite
this sweep's JSON.

    python benchmarks/tune_ofa.py --out DIR        # DIR/tune_ofa.json, DIR/tune_ofa.md
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_ofa import GPU_CASES, SMOKE_CASES, make_ids, make_tables, rel_err  # noqa: E402

from benchmarks.results_files import write_results  # noqa: E402
from flix_kernels.backends import unavailable_reason  # noqa: E402
from flix_kernels.bench.timing import Timer, provenance  # noqa: E402
from flix_kernels.ofa import kernel as ok  # noqa: E402

C = lambda bt, bn, bk, w, s: dict(BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)  # noqa: E731
MATMUL = [C(64, 128, 64, 4, 3), C(128, 128, 64, 8, 3), C(128, 128, 64, 4, 3), C(128, 256, 64, 8, 3),
          C(64, 256, 64, 8, 3), C(128, 64, 64, 4, 3), C(64, 128, 32, 4, 4), C(128, 128, 32, 8, 4),
          C(128, 128, 128, 8, 2), C(64, 64, 64, 4, 4), C(32, 128, 64, 4, 3), C(128, 256, 32, 8, 4),
          C(64, 64, 128, 4, 3), C(32, 64, 128, 4, 3)]
OUTER = [C(64, 128, 64, 4, 3), C(128, 128, 64, 8, 3), C(64, 64, 64, 4, 3), C(32, 128, 128, 8, 3),
         C(64, 128, 128, 8, 3), C(64, 256, 128, 8, 3), C(32, 64, 64, 4, 4), C(128, 128, 128, 8, 3)]
SEGMENT = [dict(BLOCK_T=bt, BLOCK_K=bk, num_warps=w) for bt, bk, w in
           [(16, 64, 4), (32, 128, 4), (64, 64, 4), (16, 256, 4), (32, 256, 8), (16, 128, 2), (8, 512, 4)]]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rep-ms", type=float, default=25.0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1): the script runs")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    reason = unavailable_reason("triton", device)
    if reason is not None:
        raise SystemExit(f"tune_ofa.py: the Triton kernels cannot run here: {reason}")
    timer = Timer(device, args.rep_ms)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    rows = []
    for c in SMOKE_CASES if args.smoke else GPU_CASES:
        ids = make_ids(c, device, gen)
        P64, Q64 = make_tables(c, device, gen)
        P, Q = P64.to(dtype), Q64.to(dtype)
        dout = torch.randn(c.T, c.D, generator=gen).to(device, dtype)
        V, K, D, T = c.V, c.k, c.D, c.T
        roles = {
            "lookup": (MATMUL, lambda: ok._forward(ids, P, Q),
                       lambda: F.embedding(ids, P) @ Q),
            "grad_gather": (MATMUL, lambda: ok._gather_matmul(None, V, dout, dout.stride(0), dout.stride(1), Q,
                                                              Q.stride(1), Q.stride(0), T, D, K, torch.float32, dtype),
                            lambda: dout @ Q.t()),
            "grad_primitive": (OUTER, lambda: ok._grad_primitive(ids, P, dout, dtype),
                               lambda: F.embedding(ids, P).t() @ dout),
            "segment": (SEGMENT, lambda: ok._grad_coords(ids, Q, dout, V, -1, dtype),
                        lambda: torch.ops.aten.embedding_dense_backward(dout @ Q.t(), ids, V, -1, False)),
        }
        for role, (cands, ours, theirs) in roles.items():
            ok._CONFIG_OVERRIDE.clear()
            want = ours().float()
            row = {"case": asdict(c), "role": role, "default_ms": timer.time(ours)["median_ms"],
                   "torch_ms": timer.time(theirs)["median_ms"], "candidates": []}
            for cfg in cands:
                ok._CONFIG_OVERRIDE[role] = cfg
                try:
                    got = ours().float()
                    err = rel_err(got, want.double())
                    if not err < 2e-2:
                        raise AssertionError(f"relative difference {err:.3g} from the default config")
                    row["candidates"].append({"config": cfg, "ms": timer.time(ours)["median_ms"]})
                except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
                    row["candidates"].append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            ok._CONFIG_OVERRIDE.clear()
            timed = [x for x in row["candidates"] if "ms" in x]
            row["best"] = min(timed, key=lambda x: x["ms"]) if timed else None
            rows.append(row)
            b = row["best"]
            print(f"{c.name:24s} {role:15s} default {row['default_ms']:.3f}  best {b['ms'] if b else float('nan'):.3f} "
                  f"{b['config'] if b else ''}  torch {row['torch_ms']:.3f}", flush=True)
    record = {**provenance(device), "dtype": str(dtype).replace("torch.", ""), "rows": rows}
    lines = ["# OFA kernel launch-config sweep", "", f"{record['device']['name']}, commit `{record['commit']}`", "",
             "| case | role | default ms | best ms | best config | torch ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        b = r["best"]
        lines.append(f"| {r['case']['name']} | {r['role']} | {r['default_ms']:.3f} | {b['ms']:.3f} | "
                     f"{b['config']} | {r['torch_ms']:.3f} |" if b else f"| {r['case']['name']} | {r['role']} | "
                     f"{r['default_ms']:.3f} | - | - | {r['torch_ms']:.3f} |")
    os.makedirs(args.out, exist_ok=True)
    write_results(args.out, {"tune_ofa.json": record, "tune_ofa.md": "\n".join(lines) + "\n"})


if __name__ == "__main__":
    main()
