"""Timing, measured peaks and provenance for ``flix-kernels bench``.

On CUDA a timing is ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call) or
``do_bench_cudagraph`` (replays of a captured graph, for shapes where launches dominate); on a
CPU it is a host clock around each call. Every timing is taken twice, the second time after the
case's other variants, so the spread between two identical measurements is on record next to the
difference between variants (:mod:`.report` flags ratios that the spread could explain).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


def _quantiles(samples_ms: list[float]) -> tuple[float, float, float]:
    qs = statistics.quantiles(samples_ms, n=10, method="inclusive") if len(samples_ms) > 1 else samples_ms * 9
    return statistics.median(samples_ms), qs[1], qs[7]  # median, p20, p80


def _cpu_bench(fn, rep_ms: float) -> tuple[float, float, float]:
    fn()  # warm-up: allocator, first-call work
    samples, start = [], time.perf_counter()
    while len(samples) < 3 or ((time.perf_counter() - start) * 1e3 < rep_ms and len(samples) < 10_000):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


class Timer:
    """``first(fn)`` -> median/p20/p80 of one run; ``repeat(fn, row)`` adds the median of a second
    identical run and the spread between the two. The suite takes the repeat after the case's
    other variants, so a burst of load on a shared machine shows as spread instead of hitting
    both runs alike; ``time(fn)`` takes both back to back."""

    def __init__(self, device: torch.device, rep_ms: float):
        self.device, self.rep_ms = device, rep_ms

    def _once(self, fn, graph: bool):
        if self.device.type != "cuda":
            return _cpu_bench(fn, self.rep_ms)
        from triton.testing import do_bench, do_bench_cudagraph

        q = [0.5, 0.2, 0.8]
        if graph:
            return tuple(do_bench_cudagraph(fn, rep=self.rep_ms, quantiles=q))
        return tuple(do_bench(fn, warmup=max(10, self.rep_ms / 4), rep=self.rep_ms, quantiles=q))

    def first(self, fn, graph: bool = False) -> dict:
        fn()  # compile, build metadata and autotune outside the timed region and any capture
        self.sync()
        med, p20, p80 = self._once(fn, graph)
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "cuda_graph": graph}

    def repeat(self, fn, row: dict, graph: bool = False) -> dict:
        """Time ``fn`` again and add ``repeat_median_ms`` and ``spread`` (the relative difference
        of the two medians, against the smaller) to ``row``, the result of :meth:`first`."""
        fn()
        self.sync()
        med, again = row["median_ms"], self._once(fn, graph)[0]
        row.update(repeat_median_ms=again, spread=abs(med - again) / max(min(med, again), 1e-12))
        return row

    def time(self, fn, graph: bool = False) -> dict:
        return self.repeat(fn, self.first(fn, graph), graph)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


DEVICES = "cpu, cuda or cuda:N"


def resolve_device(spec) -> torch.device:
    """``spec`` ("cpu", "cuda", "cuda:N" or a torch.device) as a device these tools can run on;
    ValueError naming the value and what is accepted, or why CUDA cannot be used here."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(spec)!r}; use {DEVICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(spec)!r} is not supported here; use {DEVICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"device {str(spec)!r}: torch {torch.__version__} ({build}) sees no CUDA device; use cpu")
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise ValueError(f"device {str(spec)!r}: torch sees {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return device


def peak_memory_mib(fn, device: torch.device) -> float | None:
    """Peak device memory of one call above what was allocated before it (None on a CPU: torch
    keeps no allocator statistics there)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak / 2**20


def measured_peaks(device: torch.device, dtype: torch.dtype, timer: Timer) -> dict:
    """This device's matmul rate in ``dtype`` (TFLOP/s) and copy bandwidth (GB/s, bytes read plus
    written), measured on random data: the two ceilings every floor below is computed from."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    gen = torch.Generator(device).manual_seed(1)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    nbytes = (1 << 30) if cuda else (1 << 27)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device, generator=gen)
    dst = torch.empty_like(src)
    matmul, copy = (lambda: a @ b), (lambda: dst.copy_(src))
    mm, cp = timer.first(matmul), timer.first(copy)
    timer.repeat(matmul, mm)  # each repeat apart from its first run, as in the suite
    timer.repeat(copy, cp)
    tflops = 2 * n**3 / (mm["median_ms"] * 1e-3) / 1e12
    return {"matmul_tflops": tflops, "matmul_dtype": str(dtype).replace("torch.", ""), "matmul_n": n,
            "matmul_spread": mm["spread"], "copy_GBps": 2 * nbytes / (cp["median_ms"] * 1e-3) / 1e9,
            "copy_bytes": nbytes, "copy_spread": cp["spread"]}


def floor_ms(flops: float, nbytes: float, peaks: dict) -> float:
    """max(FLOPs / measured matmul rate, bytes / measured copy bandwidth) in ms."""
    return max(flops / (peaks["matmul_tflops"] * 1e12), nbytes / (peaks["copy_GBps"] * 1e9)) * 1e3


def floor_bound(flops: float, nbytes: float, peaks: dict) -> str:
    """Which measured peak sets :func:`floor_ms`: "matmul" or "copy"."""
    return "matmul" if flops / (peaks["matmul_tflops"] * 1e12) >= nbytes / (peaks["copy_GBps"] * 1e9) else "copy"


def git_commit() -> str:
    if os.environ.get("FLIX_COMMIT"):
        return os.environ["FLIX_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _nvidia_smi_clocks() -> dict | None:
    fields = "clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,driver_version"
    try:
        out = subprocess.check_output(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], text=True,
                                      stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return dict(zip(fields.split(","), (v.strip() for v in out.splitlines()[0].split(","))))


def provenance(device: torch.device) -> dict:
    """Device, clocks (where readable), library versions, commit and date of a run."""
    import flix_kernels

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "flix_kernels": flix_kernels.__version__}
    for mod in ("triton", "peft", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev = {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
               "multiprocessors": props.multi_processor_count, "memory_GiB": round(props.total_memory / 2**30, 1),
               "clocks": _nvidia_smi_clocks()}
    else:
        dev = {"type": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads()}
    return {"device": dev, "versions": versions, "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "host_load": {"cores": os.cpu_count(), "start": load_average()}}


def load_average() -> float | None:
    """The host's 1-minute load average (runnable processes), where the OS reports one: a
    machine busy with other work shows here before it shows in the timings."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
