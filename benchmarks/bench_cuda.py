"""CUDA backend against the Triton backend, the torch backend and the base layer, side by side.

Decode (one token per example, T = 1, 8, 64) and prefill/training (the headline shape,
B=8 x L=1024) at in = out = 4096, 64 features (56 languages + 8 tasks) of rank 16, one language
and one task per example, bf16. For every backend and shape the output and all gradients are
first checked against float64 (relative error < 1e-2); then, on inputs rotated over several
sets so L2 does not keep the weights:

* decode: ``flix_linear`` forward, eager (host launch cost included: what a ``generate`` loop
  pays) and replayed from a CUDA graph (kernel time alone), against ``F.linear``;
* prefill: forward, forward+backward (W frozen, x/A/B trainable), and the low-rank update alone.

Times are medians of ``triton.testing.do_bench`` (p20/p80 kept). The floors use this device's
measured bf16 matmul rate and copy bandwidth. The run ends with the "auto" table the numbers
support (flix_kernels.backends.AUTO_TABLE): per shape class, the faster kernel backend (decode:
eager forward at T = 8; prefill: forward+backward).

Writes ``cuda_vs_triton.json`` and ``cuda_vs_triton.md`` to ``--out`` (default
``benchmarks/results/<device>/``). Needs CUDA and the built extension.

    python benchmarks/bench_cuda.py [--quick] [--out DIR]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import flix_kernels as fk
from flix_kernels import cuda as bridge
from flix_kernels.backends import available_backends

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import (base_forward_backward, bench, git_commit, peak_rates, start_run,  # noqa: E402
                        rotating, with_backward, write_table)

D, RANK, LANGS, TASKS = 4096, 16, 56, 8
SCALING = 0.5


def make_sets(tokens_shape, space, rotations, gen, dtype):
    sets = []
    for _ in range(rotations):
        x = torch.randn(*tokens_shape, D, generator=gen, device="cuda").to(dtype)
        W = (torch.randn(D, D, generator=gen, device="cuda") / D**0.5).to(dtype)
        A = (torch.randn(space.total_rank, D, generator=gen, device="cuda") / D**0.5).to(dtype)
        Bm = (torch.randn(D, space.total_rank, generator=gen, device="cuda") / 4).to(dtype)
        sets.append((x, W, A, Bm))
    return sets


def check(routing, backend, x, W, A, Bm):
    """Relative errors of y, dx, dA, dB against float64; asserts each is below 1e-2."""
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, A, Bm)]
    ref = F.linear(leaves64[0], W.double()) + fk.flix_delta(*leaves64, routing, scaling=SCALING, backend="torch")
    gy = torch.randn_like(ref)
    want = [ref, *torch.autograd.grad(ref, leaves64, gy)]
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, Bm)]
    out = fk.flix_linear(leaves[0], W, None, leaves[1], leaves[2], routing, scaling=SCALING, backend=backend)
    got = [out, *torch.autograd.grad(out, leaves, gy.to(out.dtype))]
    errs = {}
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        errs[name] = ((g.double() - w).norm() / w.norm().clamp_min(1e-30)).item()
        assert errs[name] < 1e-2, f"{backend} {name}: relative error {errs[name]:.3g} >= 1e-2"
    return errs


def forward(routing, backend):
    return lambda x, W, A, Bm: fk.flix_linear(x, W, None, A, Bm, routing, scaling=SCALING, backend=backend)


def forward_backward(routing, backend):
    return with_backward(forward(routing, backend))


def main(argv=None):
    args, rep, name, out_dir = start_run(__doc__, "bench_cuda.py", argv, rotations=4, rep_ms=300)
    dtype = torch.bfloat16
    kernels = [b for b in ("cuda", "triton") if b in available_backends("cuda")]
    if "cuda" not in kernels:
        sys.exit(f"the cuda backend is unavailable: {bridge.unavailable_reason('cuda')}")
    gen = torch.Generator("cuda").manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    space = fk.FeatureSpace({"language": [f"l{i}" for i in range(LANGS)], "task": [f"t{i}" for i in range(TASKS)]},
                            RANK)
    tflops, gbps = peak_rates(dtype)
    results, errors, floors = {}, {}, {}

    def run(label, fn, sets, graph=False):
        results[label] = bench(rotating(sets, fn), rep, graph=graph)
        print(f"{label:55s} {results[label]['median_ms'] * 1e3:9.1f} us", flush=True)

    def routing_for(B, cu=None):
        ids = torch.stack([torch.randint(0, LANGS, (B,), generator=cpu_gen),
                           torch.randint(LANGS, LANGS + TASKS, (B,), generator=cpu_gen)], 1)
        return fk.Routing(ids, space, cu_seqlens=cu).to("cuda")

    # Decode: B examples, one token each.
    for T in (1, 8, 64):
        routing = routing_for(T)
        sets = make_sets((T,), space, args.rotations, gen, dtype)
        for b in kernels:
            errors[f"decode T={T} {b}"] = check(routing, b, *sets[0])
        read = 2 * (D * D + T * 2 * RANK * 2 * D + 2 * T * D)  # W, each token's A_S and B_S, x and y (bf16)
        floors[f"decode T={T}"] = read / (gbps * 1e9) * 1e3
        for graph in (False, True):
            tag = " [graph]" if graph else " [eager]"
            run(f"decode T={T} base F.linear{tag}", lambda x, W, A, Bm: F.linear(x, W), sets, graph)
            for b in kernels + ["torch"]:
                run(f"decode T={T} {b} forward{tag}", forward(routing, b), sets, graph)

    # Prefill / training: the headline shape.
    B, L = 8, 1024
    T = B * L
    routing = routing_for(B)
    sets = make_sets((B, L), space, max(2, args.rotations // 2), gen, dtype)
    for b in kernels:
        errors[f"prefill T={T} {b}"] = check(routing, b, *sets[0])
    flops = 2 * T * D * D + 2 * T * 2 * RANK * 2 * D
    floors[f"prefill T={T} forward"] = max(flops / (tflops * 1e12), 2 * (2 * T * D + D * D) / (gbps * 1e9)) * 1e3
    run(f"prefill T={T} base F.linear forward", lambda x, W, A, Bm: F.linear(x, W), sets)
    run(f"prefill T={T} base F.linear forward+backward", base_forward_backward, sets)
    for b in kernels + ["torch"]:
        run(f"prefill T={T} {b} forward", forward(routing, b), sets)
        run(f"prefill T={T} {b} forward+backward", forward_backward(routing, b), sets)
        run(f"prefill T={T} {b} low-rank update alone",
            lambda x, W, A, Bm, b=b: fk.flix_delta(x, A, Bm, routing, scaling=SCALING, backend=b), sets)

    med = {k: v["median_ms"] for k, v in results.items()}
    ratios = {}
    for T in (1, 8, 64):
        for tag in ("eager", "graph"):
            base = med[f"decode T={T} base F.linear [{tag}]"]
            for b in kernels:
                ratios[f"decode T={T} [{tag}] {b} / base"] = med[f"decode T={T} {b} forward [{tag}]"] / base
    Tp = B * L
    for kind in ("forward", "forward+backward"):
        for b in kernels:
            ratios[f"prefill {kind} {b} / base"] = med[f"prefill T={Tp} {b} {kind}"] / med[f"prefill T={Tp} base F.linear {kind}"]
    suggested = {}
    if "triton" in kernels:
        decode_pick = min(kernels, key=lambda b: med[f"decode T=8 {b} forward [eager]"])
        prefill_pick = min(kernels, key=lambda b: med[f"prefill T={Tp} {b} forward+backward"])
        suggested = {"decode": [decode_pick] + [b for b in kernels if b != decode_pick],
                     "prefill": [prefill_pick] + [b for b in kernels if b != prefill_pick]}
    import triton

    record = {
        "benchmark": "cuda_vs_triton",
        "device": name,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "extension": bridge.build_info(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "shape": {"in": D, "out": D, "features": LANGS + TASKS, "rank": RANK, "dtype": str(dtype),
                  "decode_tokens": [1, 8, 64], "prefill": {"B": B, "L": L}},
        "method": (f"do_bench median (p20/p80; L2 flushed before each call) or CUDA-graph replays ([graph]); inputs "
                   f"rotated over {args.rotations} sets; tf32 off; every backend checked against float64 first"),
        "measured_peak": {"bf16_matmul_tflops": tflops, "copy_GBps": gbps},
        "floors_ms": floors,
        "relative_errors_vs_float64": errors,
        "results": results,
        "ratios": ratios,
        "suggested_auto_table": suggested,
    }
    tmp = out_dir / "cuda_vs_triton.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out_dir / "cuda_vs_triton.json")
    rows = [[k, f"{v['median_ms'] * 1e3:.1f}", f"{v['p20_ms'] * 1e3:.1f}", f"{v['p80_ms'] * 1e3:.1f}"]
            for k, v in results.items()]
    rows += [[f"ratio: {k}", f"{v:.3f}", "", ""] for k, v in ratios.items()]
    rows += [[f"floor: {k}", f"{v * 1e3:.1f}", "", ""] for k, v in floors.items()]
    text = write_table(out_dir / "cuda_vs_triton.md", f"CUDA vs Triton backend, {name}", ["case", "median us", "p20", "p80"],
                       rows, [f"commit `{record['commit'][:10]}`, torch {torch.__version__}, triton {triton.__version__}, "
                              f"CUDA {torch.version.cuda}; {record['method']}.",
                              f"Measured bf16 matmul {tflops:.0f} TFLOP/s, copy {gbps:.0f} GB/s.",
                              f"Suggested AUTO_TABLE: {suggested}"])
    print(text)


if __name__ == "__main__":
    main()
