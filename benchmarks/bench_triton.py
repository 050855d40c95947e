"""Triton backend on a GPU: the issue's performance targets, side by side in one run.

Headline shape: B=8, L=1024 (T=8192), in=out=4096, 64 features (56 languages + 8 tasks),
rank 16 each, one language and one task per example, bf16. Compared in the same process on
the same (rotated) inputs:

* base ``F.linear`` (cuBLAS) forward and forward+backward (W frozen, x requires grad);
* ``flix_linear`` with backend "triton" (cuBLAS + in-place expand, and the fused base GEMM),
  backend "torch" (vectorised), and the per-feature loop (:mod:`flix_kernels.reference`);
* the low-rank part alone (``flix_delta``) for the same three;
* decode, T = 8 (B = 8, one token each).

Correctness is asserted first (relative error against float64 below 1e-2 for every output
and gradient). Times are medians of ``triton.testing.do_bench`` with p20/p80; each call takes
the next of several input sets (x, W, A, B) so that L2 does not keep the weights between
calls. The floor uses the measured bf16 matmul rate and copy bandwidth of this device.

Writes ``triton_headline.json`` and ``triton_headline.md`` to ``--out`` (default
``benchmarks/results/<device>/``). Needs CUDA.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import flix_kernels as fk
from flix_kernels.backends import triton_backend
from flix_kernels.reference import flix_delta_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import (base_forward_backward, bench, git_commit, peak_rates, start_run,  # noqa: E402
                        rotating, with_backward)


def make_problem(B, L, d, space, dtype, rotations, gen):
    sets = []
    for _ in range(rotations):
        x = torch.randn(B, L, d, generator=gen, device="cuda", dtype=torch.float32).to(dtype)
        W = (torch.randn(d, d, generator=gen, device="cuda") / d**0.5).to(dtype)
        A = (torch.randn(space.total_rank, d, generator=gen, device="cuda") / d**0.5).to(dtype)
        Bm = (torch.randn(d, space.total_rank, generator=gen, device="cuda") / 4).to(dtype)
        sets.append((x, W, A, Bm))
    return sets


def check_correct(routing, space, x, W, A, Bm, scaling):
    """Relative error of every output and gradient against float64, for both triton paths."""
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, A, Bm)]
    ref = F.linear(leaves64[0], W.double()) + fk.flix_delta(*leaves64, routing, scaling=scaling, backend="torch")
    gy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves64, gy)
    errs = {}
    for fuse in (False, True):
        triton_backend.FUSE_BASE = fuse
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, Bm)]
        out = fk.flix_linear(leaves[0], W, None, leaves[1], leaves[2], routing, scaling=scaling, backend="triton")
        grads = torch.autograd.grad(out, leaves, gy.to(out.dtype))
        for name, g, r in zip(("y", "dx", "dA", "dB"), (out, *grads), (ref, *ref_grads)):
            rel = ((g.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
            errs[f"{name} (fused={fuse})"] = rel
            assert rel < 1e-2, f"{name} fused={fuse}: relative error {rel:.3g} >= 1e-2"
    triton_backend.FUSE_BASE = False
    return errs


def main(argv=None):
    args, rep, name, out_dir = start_run(__doc__, "bench_triton.py", argv, rotations=3, rep_ms=400)
    dtype = torch.bfloat16
    gen = torch.Generator("cuda").manual_seed(0)

    B, L, d, r = 8, 1024, 4096, 16
    space = fk.FeatureSpace({"language": [f"l{i}" for i in range(56)], "task": [f"t{i}" for i in range(8)]}, r)
    cpu_gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randint(0, 56, (B,), generator=cpu_gen), torch.randint(56, 64, (B,), generator=cpu_gen)], 1)
    routing = fk.Routing(ids, space).to("cuda")
    scaling = 0.5
    sets = make_problem(B, L, d, space, dtype, args.rotations, gen)
    errors = check_correct(routing, space, *sets[0], scaling)
    # The loop oracle (bf16) also has to agree before it is timed as a competitor.
    x, W, A, Bm = sets[0]
    loop = flix_delta_reference(x, A, Bm, ids, space.rank_offsets, scaling)
    mine = fk.flix_delta(x, A, Bm, routing, scaling=scaling, backend="triton")
    assert ((loop.float() - mine.float()).norm() / mine.float().norm()).item() < 2e-2

    tflops, gbps = peak_rates(dtype)
    T = B * L
    R_act = 2 * r
    flops_base = 2 * T * d * d
    flops_lora = 2 * T * R_act * (d + d)
    bytes_fwd = 2 * (T * d + d * d + T * d)  # x, W, y in bf16
    floor_fwd_ms = max((flops_base + flops_lora) / (tflops * 1e12), bytes_fwd / (gbps * 1e9)) * 1e3

    results = {}

    def fwd_linear(backend, fuse=False):
        def f(x, W, A, Bm):
            triton_backend.FUSE_BASE = fuse
            return fk.flix_linear(x, W, None, A, Bm, routing, scaling=scaling, backend=backend)
        return f

    cases = {
        "base forward (cuBLAS)": lambda x, W, A, Bm: F.linear(x, W),
        "triton forward (cuBLAS + expand)": fwd_linear("triton"),
        "triton forward (fused base)": fwd_linear("triton", True),
        "torch backend forward": fwd_linear("torch"),
        "base forward+backward": base_forward_backward,
        "triton forward+backward": with_backward(fwd_linear("triton")),
        "triton forward+backward (fused base)": with_backward(fwd_linear("triton", True)),
        "torch backend forward+backward": with_backward(fwd_linear("torch")),
        "low-rank triton": lambda x, W, A, Bm: fk.flix_delta(x, A, Bm, routing, scaling=scaling, backend="triton"),
        "low-rank torch backend": lambda x, W, A, Bm: fk.flix_delta(x, A, Bm, routing, scaling=scaling, backend="torch"),
        "low-rank per-feature loop": lambda x, W, A, Bm: flix_delta_reference(x, A, Bm, ids, space.rank_offsets, scaling),
    }
    for label, fn in cases.items():
        results[label] = bench(rotating(sets, fn), rep)
        triton_backend.FUSE_BASE = False
        print(f"{label:45s} {results[label]['median_ms']:.4f} ms", flush=True)

    # Decode: B = 8 examples, one token each; rotate more weight sets (W is what is read).
    dec_routing = fk.Routing(ids, space).to("cuda")
    dec_sets = [(torch.randn(B, d, device="cuda", dtype=dtype), *s[1:]) for s in sets]
    dec_sets += [(s[0], s[1].clone(), s[2].clone(), s[3].clone()) for s in dec_sets]
    dec_cases = {
        "decode base (cuBLAS)": lambda x, W, A, Bm: F.linear(x, W),
        "decode triton (cuBLAS + expand)": lambda x, W, A, Bm: fk.flix_linear(x, W, None, A, Bm, dec_routing,
                                                                               scaling=scaling, backend="triton"),
        "decode torch backend": lambda x, W, A, Bm: fk.flix_linear(x, W, None, A, Bm, dec_routing, scaling=scaling,
                                                                    backend="torch"),
    }
    for label, fn in dec_cases.items():
        for graph in (False, True):
            name = label + (" [CUDA graph]" if graph else "")
            results[name] = bench(rotating(dec_sets, fn), rep, graph=graph)
            print(f"{name:45s} {results[name]['median_ms']:.4f} ms", flush=True)

    med = {k: v["median_ms"] for k, v in results.items()}
    best_fwd = min(med["triton forward (cuBLAS + expand)"], med["triton forward (fused base)"])
    best_fb = min(med["triton forward+backward"], med["triton forward+backward (fused base)"])
    ratios = {
        "forward / base forward": best_fwd / med["base forward (cuBLAS)"],
        "forward+backward / base forward+backward": best_fb / med["base forward+backward"],
        "low-rank: loop / triton": med["low-rank per-feature loop"] / med["low-rank triton"],
        "low-rank: torch backend / triton": med["low-rank torch backend"] / med["low-rank triton"],
        "decode T=8: total / base": med["decode triton (cuBLAS + expand)"] / med["decode base (cuBLAS)"],
        "decode T=8 [CUDA graph]: total / base": (med["decode triton (cuBLAS + expand) [CUDA graph]"]
                                                  / med["decode base (cuBLAS) [CUDA graph]"]),
        "forward / floor": best_fwd / floor_fwd_ms,
    }
    verdicts = {
        "forward / base forward": ratios["forward / base forward"] <= 1.08,
        "forward+backward / base forward+backward": ratios["forward+backward / base forward+backward"] <= 1.20,
        "low-rank: loop / triton": ratios["low-rank: loop / triton"] >= 10,
        "low-rank: torch backend / triton": ratios["low-rank: torch backend / triton"] >= 4,
        "decode T=8: total / base": ratios["decode T=8: total / base"] <= 1.25,
        "decode T=8 [CUDA graph]: total / base": ratios["decode T=8 [CUDA graph]: total / base"] <= 1.25,
    }
    import triton

    record = {
        "benchmark": "triton_headline",
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "shape": {"B": B, "L": L, "in": d, "out": d, "features": 64, "rank": r, "dtype": str(dtype)},
        "method": ("do_bench median (p20/p80; L2 flushed before each call), decode also as CUDA-graph replays; "
                   "inputs rotated over %d sets, tf32 off, correctness asserted first" % args.rotations),
        "measured_peak": {"bf16_matmul_tflops": tflops, "copy_GBps": gbps, "forward_floor_ms": floor_fwd_ms},
        "relative_errors_vs_float64": errors,
        "results": results,
        "ratios": ratios,
        "targets_met": verdicts,
    }
    (out_dir / "triton_headline.json").write_text(json.dumps(record, indent=2))
    lines = [f"# Triton backend, headline shape, {name}", "",
             f"commit `{record['commit'][:10]}`, torch {torch.__version__}, triton {triton.__version__}, CUDA "
             f"{torch.version.cuda}; {record['method']}.",
             f"Measured bf16 matmul {tflops:.0f} TFLOP/s, copy {gbps:.0f} GB/s; forward floor {floor_fwd_ms:.4f} ms.", "",
             "| case | median ms | p20 | p80 |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['median_ms']:.4f} | {v['p20_ms']:.4f} | {v['p80_ms']:.4f} |" for k, v in results.items()]
    lines += ["", "| ratio | value | target met |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {verdicts.get(k, '-')} |" for k, v in ratios.items()]
    (out_dir / "triton_headline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
