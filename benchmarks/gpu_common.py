"""Helpers shared by the GPU benchmarks: timing, the device's measured peaks, provenance."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def start_run(doc: str, script: str, argv, rotations: int, rep_ms: int):
    """Parse ``--quick/--out/--rotations``, require CUDA, turn tf32 off. Returns ``(args, rep_ms,
    device name, output folder benchmarks/results/<device>/ unless --out)``."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter timing runs")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rotations", type=int, default=rotations, help="input sets the timed calls cycle through")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name()
    out_dir = args.out or ROOT / "benchmarks" / "results" / device_slug(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    return args, (100 if args.quick else rep_ms), name, out_dir


def bench(fn, rep_ms, graph=False):
    """Median/p20/p80 in ms. ``do_bench`` flushes L2 before every call; ``graph=True`` replays
    the calls from a CUDA graph (no launch overhead, no flush: the rotated inputs are what
    keeps the weights from being cached), for the decode shapes where launches dominate."""
    from triton.testing import do_bench, do_bench_cudagraph

    fn()  # compile and build metadata outside the timed region (and outside any capture)
    torch.cuda.synchronize()
    if graph:
        q = do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    else:
        q = do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2], "cuda_graph": graph}


def device_slug(name: str) -> str:
    for chip in ("h200", "h100", "a100", "l40s", "l4", "b200"):
        if chip in name.lower():
            return chip
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        return os.environ.get("FLIX_COMMIT", "unknown")


def peak_rates(dtype):
    """(matmul TFLOP/s on 8192^3 in ``dtype``, copy GB/s counting read + write) on this device."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    t = bench(lambda: a @ b, 200)["median_ms"]
    tflops = 2 * n**3 / (t * 1e-3) / 1e12
    src = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), 200)["median_ms"]
    gbps = 2 * src.numel() / (t * 1e-3) / 1e9
    return tflops, gbps


def rotating(sets, fn):
    """A callable running ``fn`` on the next input set each call (so L2 does not keep them)."""
    state = {"i": 0}

    def call():
        s = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn(*s)

    return call


def with_backward(forward):
    """``forward(x, W, A, B)`` followed by the gradients of x, A and B (W frozen, as in FLix training)."""
    def call(x, W, A, Bm):
        xs, As, Bs = x.detach().requires_grad_(), A.detach().requires_grad_(), Bm.detach().requires_grad_()
        y = forward(xs, W, As, Bs)
        return torch.autograd.grad(y, (xs, As, Bs), torch.ones_like(y))
    return call


def base_forward_backward(x, W, A, Bm):
    """``F.linear`` forward and the input gradient: the floor of a FLix layer's training step."""
    xs = x.detach().requires_grad_()
    y = torch.nn.functional.linear(xs, W)
    return torch.autograd.grad(y, (xs,), torch.ones_like(y))


def write_table(path: Path, title: str, header: list[str], rows: list[list], preamble: list[str] = ()):
    """A markdown table (atomically written)."""
    lines = [f"# {title}", "", *preamble, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return "\n".join(lines)
