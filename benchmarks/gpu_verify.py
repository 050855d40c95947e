"""One GPU run that verifies every kernel path and brings all of it back (``gpu_run.sh verify``).

On a bare H100/H200 (a lent device machine: one command of at most 10 minutes, at most 8 files
back from ``$OUT``) it builds the package for the card's architecture alone, then runs the
parts of :data:`PLAN` in order of value, each under its own time budget: a part may use what
the parts before it left unused, never what the parts after it were given, so a slow part
cannot starve the rest. A step cut at its deadline is killed with its process group and
recorded as cut; what it wrote stays (the bench writes ``results.json`` after every case).

What comes back, in ``$OUT``: ``verify.tar.gz`` (``logs/``, ``results/<step>/`` of every bench
step, ``summary.json``, ``summary.md``), ``summary.json`` and ``summary.md`` beside it, and
``verify.log``. ``benchmarks/gpu_import.py`` turns that into
``benchmarks/results/<device>/<commit>/``.

``--dry-run`` (CPU, CI) runs nothing on a GPU: it checks that every command exists, every test
selection collects tests and every bench command parses, then writes the same outputs (marked
as a dry run) and checks them against the file limits.

Uses only the package's public entry points (``python -m flix_kernels``, pytest on ``tests/``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The bench's own noise rules and summary, from this checkout: on a bare GPU machine the package is
# installed only after this process started (its build is the first part), and what a running
# interpreter imports is fixed when it starts.
sys.path.insert(0, str(ROOT))
# What the device tool brings back from $OUT (its README): files, bytes each, characters in a name.
MAX_FILES, MAX_FILE_BYTES, NAME_OK = 8, 16 << 20, re.compile(r"^[A-Za-z0-9._-]+$")
ARCHIVE, SUMMARY_JSON, SUMMARY_MD, LOG = "verify.tar.gz", "summary.json", "summary.md", "verify.log"
TOTAL_S = 540  # the whole run, build included: 9 of the tool's 10 minutes
PACK_S = 15  # kept back for the archive and the summary
MIN_STEP_S = 5  # a step with less time left in its part is not started


@dataclass
class Step:
    """One command. ``kind``: "pytest" (its selection must collect), "bench" (its arguments must
    parse; results under ``results/<name>``), "cmd" (its program must exist)."""

    name: str
    argv: list[str]
    kind: str = "cmd"
    env: dict = field(default_factory=dict)
    # If the step fails: run it again with these variables too, and note on its part what was lost.
    fallback: dict | None = None
    fallback_note: str = ""


@dataclass
class Part:
    name: str
    budget_s: float
    why: str
    steps: list[Step]


def pytest_step(name: str, *args: str, workers: int = 0) -> Step:
    parallel = ["-n", str(workers)] if workers else []
    # -v: one line per test as it ends, so a step cut at its deadline still says what ran.
    return Step(name, [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfE", "--tb=short",
                       "--durations=15", *parallel, *args], "pytest")


def bench_step(name: str, *args: str, env: dict | None = None) -> Step:
    return Step(name, [sys.executable, "-m", "flix_kernels", "bench", "--no-progress", "--out", f"results/{name}",
                       *args], "bench", env or {})


# The headline and decode timings: base, PEFT LoRA and every backend, eager and in a CUDA graph
# (the bench's default variants on a GPU), with short timing runs so the whole plan fits.
TIMING = ("--rep-ms", "40", "--no-compile", "--compare", "peft")
# A path of one backend against base alone (the headline step has the rest).
PATH_TIMING = ("--rep-ms", "40", "--no-compile", "--compare")
KERNEL_TESTS = ("tests/test_kernel_backends.py", "tests/test_isolation.py")
SLOW_TESTS = "not torch_compile and not compiled_model and not large_shapes and not cuda_graph"


def plan(workers: int, arch: str) -> list[Part]:
    """The parts of a verify run, in order of value (``workers``: pytest-xdist processes, 0 for
    none; ``arch``: the card's compute capability, e.g. "90")."""
    tests = dict(workers=workers)
    return [
        Part("build", 140, f"install and build the CUDA extension for sm_{arch} only", [
            Step("install", [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                             "--no-index", "-e", "."], env={"FLIX_CUDA": "1", "FLIX_CUDA_ARCHS": arch},
                 # the CUDA extension did not build: the Triton backend can still be verified
                 fallback={"FLIX_CUDA": "0"},
                 fallback_note="the CUDA extension did not build: the CUDA backend was not verified"),
            Step("info", [sys.executable, "-m", "flix_kernels", "info"])]),
        Part("tests_triton", 70, "Triton: cuBLAS + expand, fused by pointers and by TMA, one- and two-pass dy, "
             "owner and example-major weight gradients, isolation with inf/NaN; bf16/fp16/fp32 against float64", [
                 pytest_step("tests_triton", *KERNEL_TESTS, "tests/test_triton_backend.py", "-k",
                             f"triton and ({SLOW_TESTS})", **tests)]),
        Part("tests_cuda", 45, "CUDA: the general kernels and the decode kernel, isolation, against float64", [
            pytest_step("tests_cuda", *KERNEL_TESTS, "tests/test_cuda_backend.py", "tests/test_cuda_decode.py", "-k",
                        f"cuda and ({SLOW_TESTS})", **tests)]),
        Part("tests_graphs", 20, "CUDA-graph capture of forward and backward, large shapes, bf16 on the GPU", [
            pytest_step("tests_graphs", "tests/test_kernel_backends.py", "tests/test_cuda_decode.py", "-k",
                        "cuda_graph or large_shapes or bf16_matches_oracle_on_gpu", **tests)]),
        Part("headline", 90, "headline forward / backward / forward+backward: base, PEFT LoRA, torch, triton, "
             "cuda, eager and in a CUDA graph, with the per-launch breakdown", [
                 bench_step("headline", "--shapes", "headline", "--no-e2e", *TIMING)]),
        Part("triton_paths", 60, "the Triton backend's other paths at the headline: fused base GEMM through TMA "
             "and by pointers, g and dB by two passes over dy", [
                 bench_step("fused_tma", "--shapes", "headline", "--no-e2e", "--backends", "triton", *PATH_TIMING,
                            env={"FLIX_FUSE_BASE": "1"}),
                 bench_step("fused_pointers", "--shapes", "headline", "--no-e2e", "--backends", "triton",
                            *PATH_TIMING, env={"FLIX_FUSE_BASE": "1", "FLIX_TRITON_TMA": "0"}),
                 bench_step("two_pass_dy", "--shapes", "headline", "--no-e2e", "--backends", "triton", *PATH_TIMING,
                            env={"FLIX_TRITON_DY_PASS": "0"})]),
        Part("decode", 30, "decode T = 1, 8, 64 in every backend, and the CUDA general kernels there", [
            bench_step("decode", "--shapes", "decode", "--no-e2e", *TIMING),
            bench_step("decode_cuda_general", "--shapes", "decode", "--no-e2e", "--backends", "cuda", *PATH_TIMING,
                       env={"FLIX_CUDA_DECODE": "0"})]),
        Part("training", 50, "the 110M training step and the GPU-bound step (hidden 4096) against PEFT LoRA", [
            bench_step("training", "--e2e-only", "--rep-ms", "40")]),
        Part("sanitize", 20, "compute-sanitizer memcheck on small cases of every CUDA and Triton path", [
            Step("memcheck", ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "9", sys.executable, "-m",
                              "pytest", "-p", "no:cacheprovider", "-q", "-x", "tests/test_kernel_backends.py",
                              "tests/test_cuda_decode.py", "-k",
                              "(test_linear_matches_oracle and packed and float32) or test_edge_routings "
                              "or (test_decode_matches_the_oracle and float32)"],
                 env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})]),
    ]


# ---- running ---------------------------------------------------------------------------------

def run_step(step: Step, work: Path, seconds: float, env: dict) -> dict:
    """Run ``step`` in the repository root for at most ``seconds``; its output goes to
    ``work/logs/<name>.log``."""
    log = work / "logs" / f"{step.name}.log"
    started = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(step.argv) + "\n")
        f.flush()
        try:
            proc = subprocess.Popen(step.argv, cwd=work if step.kind == "bench" else ROOT, stdout=f,
                                    stderr=subprocess.STDOUT, env={**env, **step.env}, start_new_session=True)
        except OSError as exc:
            f.write(f"could not start: {exc}\n")
            return {"rc": None, "seconds": 0.0, "cut": False, "error": str(exc)}
        try:
            rc, cut = proc.wait(timeout=max(seconds, 1)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, cut = proc.wait(), True
            f.write(f"\n[verify] cut at its deadline after {seconds:.0f} s\n")
    return {"rc": rc, "seconds": round(time.monotonic() - started, 1), "cut": cut}


def run_plan(parts: list[Part], work: Path, say, total_s: float = TOTAL_S) -> list[dict]:
    """Every part in order under its budget (see the module's docstring); returns their records."""
    start = time.monotonic()
    end = start + total_s - PACK_S
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    deadline, out = start, []
    for part in parts:
        deadline = min(deadline + part.budget_s, end)
        rec = {"part": part.name, "why": part.why, "budget_s": part.budget_s, "steps": []}
        for step in part.steps:
            left = deadline - time.monotonic()
            if left < MIN_STEP_S:
                rec["steps"].append({"step": step.name, "status": "not started (no time left in its part)"})
                continue
            got = run_step(step, work, left, env)
            if step.fallback is not None and got["rc"] != 0:
                say(f"{step.name} failed (rc {got['rc']}); again with {step.fallback}")
                retry = Step(f"{step.name}_fallback", step.argv, env={**step.env, **step.fallback})
                got["fallback"] = run_step(retry, work, max(deadline - time.monotonic(), 30), env)
                rec["note"] = step.fallback_note
            got["step"] = step.name
            got["status"] = "cut" if got["cut"] else "passed" if got["rc"] == 0 else "failed"
            try:  # a log or result this script cannot read must not cost the rest of the run
                got.update(outcome(step, work))
            except Exception as exc:
                got["outcome_error"] = f"{type(exc).__name__}: {exc}"
            rec["steps"].append(got)
            say(f"{part.name}/{step.name}: {got['status']} in {got['seconds']} s"
                + (f" ({got['tests']})" if got.get("tests") else ""))
        rec["seconds"] = round(sum(s.get("seconds", 0) for s in rec["steps"]), 1)
        out.append(rec)
    return out


def outcome(step: Step, work: Path) -> dict:
    """What a finished (or cut) step says: pytest's counts from its log, the bench's targets."""
    if step.kind == "pytest":
        text = (work / "logs" / f"{step.name}.log").read_text(errors="replace")
        last = text.strip().splitlines()[-1] if text.strip() else ""
        counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|deselected)", last)
        if counts:
            tests = ", ".join(f"{n} {k}" for n, k in counts)
        else:  # cut before pytest's summary: count the per-test lines
            ended = re.findall(r" (PASSED|FAILED|SKIPPED|ERROR|XFAIL)\b", text)
            tests = ", ".join(f"{ended.count(k)} {k.lower()}" for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")
                              if k in ended) + " before the cut"
        # "FAILED id" (the -rfE summary, and xdist's "[gw0] [ 10%] FAILED id"), or "id FAILED [ 10%]"
        failed = sorted(set(re.findall(r"^(?:\[gw\d+\] \[ *\d+%\] )?(?:FAILED|ERROR) (\S+::\S+)", text, re.M)
                            + re.findall(r"^(\S+::\S+) (?:FAILED|ERROR)\b", text, re.M)))
        return {"tests": tests, "failed_tests": failed[:50]}
    if step.kind == "bench":
        path = work / "results" / step.name / "results.json"
        if not path.exists():
            return {}
        rec = json.loads(path.read_text())
        if "summary" not in rec and rec.get("rows"):  # cut: the bench's checkpoint, not yet summarised
            try:
                _report().annotate(rec)
            except Exception as exc:  # a partial record the report cannot read: keep the rows
                rec["summary"] = {"error": f"{type(exc).__name__}: {exc}"}
        summary = rec.get("summary", {})
        return {"cases": [c["label"] for c in rec.get("cases", [])], "failures": rec.get("failures", [])[:20],
                "targets": summary.get("targets", {}), "auto_order": summary.get("measured_auto_order", {}),
                "headline_ms": headline_ms(rec)}
    if step.argv[0] == "compute-sanitizer":
        text = (work / "logs" / f"{step.name}.log").read_text(errors="replace")
        if "Device not supported" in text:  # seen on the gVisor machines (the device tool's KINDS.md)
            return {"status": "unavailable", "error": "compute-sanitizer does not support this device here"}
        return {"sanitizer": (re.findall(r"ERROR SUMMARY: .*", text) or ["no summary"])[-1]}
    return {}


def _report():
    """:mod:`flix_kernels.bench.report` (imported when first needed: it brings torch)."""
    from flix_kernels.bench import report

    return report


def headline_ms(rec: dict) -> dict:
    """``{"<case> | <mode>[ | graph]": {variant: {"ms", "noise"}}}`` of our variants and base, for
    the decisions (the noise as the bench's report reads it)."""
    out = {}
    for r in rec.get("rows", []):
        if r.get("median_ms") is None or not (r["ours"] or r["variant"] == "base F.linear"):
            continue
        key = f"{r['case']} | {r['mode']}{' | graph' if r.get('graph') else ''}"
        out.setdefault(key, {})[r["variant"]] = {"ms": r["median_ms"], "noise": _report().noise(r)}
    return out


# ---- decisions -------------------------------------------------------------------------------

def faster(a: dict | None, b: dict | None) -> str:
    """"yes" when timing ``a`` beats ``b``, "no" when it loses, each only where the ratio is a
    result by the bench's own rule (its uncertainty smaller than the difference), else
    "inconclusive" (or "not measured")."""
    if not a or not b:
        return "not measured"
    report = _report()
    ratio = a["ms"] / b["ms"]
    if report.ratio_flag(ratio, report.combined_spread(a["noise"], b["noise"])):
        return "inconclusive"
    return "yes" if ratio < 1 else "no"


def decide(parts: list[dict]) -> dict:
    """What the measurements support: the AUTO_TABLE order per shape class (the bench's measured
    order) and, for each optional path, whether it should be on by default."""
    steps = {s["step"]: s for p in parts for s in p["steps"]}

    def ours(step, key, variant):
        return steps.get(step, {}).get("headline_ms", {}).get(key, {}).get(variant)

    fb = "headline | forward+backward"
    auto = {}
    for cls, step in (("prefill", "headline"), ("decode", "decode")):
        order = steps.get(step, {}).get("auto_order", {}).get(cls)
        auto[cls] = order + [b for b in ("torch", "triton", "cuda") if b not in order] if order else None
    return {
        "AUTO_TABLE": auto,
        "paths": {
            "FLIX_FUSE_BASE=1 (fused base GEMM, TMA on Hopper) beats cuBLAS + expand":
                faster(ours("fused_tma", fb, "ours: triton"), ours("headline", fb, "ours: triton")),
            "FLIX_TRITON_TMA=1 (TMA) beats the pointer kernel for the fused base GEMM":
                faster(ours("fused_tma", fb, "ours: triton"), ours("fused_pointers", fb, "ours: triton")),
            "FLIX_TRITON_DY_PASS=1 (one pass over dy) beats two passes":
                faster(ours("headline", "headline | backward", "ours: triton"),
                       ours("two_pass_dy", "headline | backward", "ours: triton")),
            "FLIX_CUDA_DECODE=1 (decode kernel) beats the general CUDA kernels at T=8 in a graph":
                faster(ours("decode", "decode T=8 | forward | graph", "ours: cuda"),
                       ours("decode_cuda_general", "decode T=8 | forward | graph", "ours: cuda")),
        },
    }


# ---- outputs ---------------------------------------------------------------------------------

def provenance() -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": os.environ.get("FLIX_COMMIT") or git_commit(), "python": sys.version.split()[0]}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                              "multiprocessors": p.multi_processor_count,
                              "memory_GiB": round(p.total_memory / 2**30, 1)}
    except ImportError:
        pass
    for name in ("triton", "transformers", "peft", "numpy"):  # without importing them (peft imports torchao)
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    info.setdefault("device", {"name": "cpu (dry run)"})
    return info


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(summary: dict) -> str:
    d = summary["provenance"]
    lines = [f"# GPU verify: {d['device']['name']}, commit {d['commit'][:12]}, {d['date']}"
             + (" (DRY RUN: nothing was measured)" if summary["dry_run"] else ""), "",
             f"torch {d.get('torch')}, CUDA {d.get('cuda')}, Triton {d.get('triton')}, transformers "
             f"{d.get('transformers')}, peft {d.get('peft')}, Python {d['python']}; {summary['seconds']} s in all.", "",
             "| part | budget | used | step | status | tests / cases |", "|---|---|---|---|---|---|"]
    for p in summary["parts"]:
        for s in p["steps"]:
            detail = s.get("tests") or ", ".join(s.get("cases", [])) or s.get("sanitizer") or s.get("error") or ""
            lines.append(f"| {p['part']} | {p['budget_s']:.0f} s | {p['seconds']} s | {s['step']} | {s['status']} | "
                         f"{detail} |")
    lines += [f"\n**{p['part']}**: {p['note']}" for p in summary["parts"] if p.get("note")]
    targets = [(s["step"], name, t) for p in summary["parts"] for s in p["steps"]
               for name, t in s.get("targets", {}).items()]
    if targets:
        lines += ["", "## Targets", "", "| run | target | goal | measured | ours | verdict |",
                  "|---|---|---|---|---|---|"]
        for step, name, t in targets:
            m = t.get("measured")
            shown = f"{m:.3f} ± {100 * t.get('uncertainty', 0):.0f}%" if isinstance(m, float) else str(m)
            lines.append(f"| {step} | {name} | {t['target']} | {shown} | {t.get('ours', '')} | {t['verdict']} |")
    dec = summary["decisions"]
    lines += ["", "## What the measurements support", "",
              f"- AUTO_TABLE: {json.dumps(dec['AUTO_TABLE'])}"]
    lines += [f"- {name}: {verdict}" for name, verdict in dec["paths"].items()]
    failed = [(s["step"], t) for p in summary["parts"] for s in p["steps"] for t in s.get("failed_tests", [])]
    if failed:
        lines += ["", "## Failed tests", ""] + [f"- {step}: `{t}`" for step, t in failed]
    return "\n".join(lines) + "\n"


def pack(work: Path, out: Path, summary: dict) -> list[Path]:
    """Write the summary, the archive of ``work`` and return the files in ``out`` (checked
    against the device tool's limits; plots and long logs go first if the archive is too big)."""
    (work / SUMMARY_JSON).write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (work / SUMMARY_MD).write_text(markdown(summary))
    for name in (SUMMARY_JSON, SUMMARY_MD):
        shutil.copyfile(work / name, out / name)
    for drop in (lambda p: False, lambda p: p.suffix == ".png", lambda p: p.suffix == ".log"):
        with tarfile.open(out / ARCHIVE, "w:gz") as tar:
            for path in sorted(work.rglob("*")):
                if path.is_file() and not drop(path):
                    tar.add(path, arcname=str(path.relative_to(work)))
        if (out / ARCHIVE).stat().st_size < MAX_FILE_BYTES - (1 << 20):
            break
    return check_limits(out)


def check_limits(out: Path) -> list[Path]:
    """The files under ``out``; raises when they would not all come back from the device tool."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    problems = [f"{len(files)} files (at most {MAX_FILES})"] if len(files) > MAX_FILES else []
    for p in files:
        rel = p.relative_to(out)
        if p.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{rel}: {p.stat().st_size} bytes (at most {MAX_FILE_BYTES})")
        if len(rel.parts) > 3 or not all(NAME_OK.match(part) for part in rel.parts):
            problems.append(f"{rel}: too deep or a name the tool does not return")
    if problems:
        raise SystemExit("verify: the outputs would not come back: " + "; ".join(problems))
    return files


# ---- the dry run -----------------------------------------------------------------------------

def dry_check(step: Step, work: Path) -> dict:
    """Whether ``step`` could run: its program exists, its test selection collects, its bench
    arguments parse."""
    log = work / "logs" / f"{step.name}.log"
    if step.kind == "pytest":
        argv = [a for i, a in enumerate(step.argv) if a != "-n" and (i == 0 or step.argv[i - 1] != "-n")]
        argv = [a for a in argv if not a.startswith("--durations")] + ["--collect-only"]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        log.write_text(proc.stdout[-20000:] + proc.stderr[-5000:])
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", proc.stdout)  # "131/600 tests collected" with -k
        n = int(m.group(1)) if m else 0
        ok = proc.returncode == 0 and n > 0
        return {"status": "ok" if ok else "fails", "tests": f"{n} collected", "rc": proc.returncode}
    if step.kind == "bench":
        from flix_kernels.cli import build_parser

        try:
            build_parser().parse_args(step.argv[3:])
        except SystemExit as exc:
            return {"status": "fails", "error": f"arguments do not parse ({exc.code})"}
        log.write_text("arguments parse: " + " ".join(step.argv[3:]) + "\n")
        return {"status": "ok"}
    found = shutil.which(step.argv[0]) or Path(step.argv[0]).exists()
    log.write_text(f"{step.argv[0]}: {'found' if found else 'not on this machine'}\n")
    # compute-sanitizer is on the GPU machines only; a missing one there is reported, not fatal.
    return {"status": "ok" if found or step.argv[0] == "compute-sanitizer" else "fails",
            "error": None if found else f"{step.argv[0]} not found here"}


def dry_run(parts: list[Part], work: Path, say) -> list[dict]:
    out = []
    for part in parts:
        rec = {"part": part.name, "why": part.why, "budget_s": part.budget_s, "seconds": 0.0, "steps": []}
        for step in part.steps:
            got = {"step": step.name, **dry_check(step, work)}
            rec["steps"].append(got)
            say(f"{part.name}/{step.name}: {got['status']}" + (f" ({got['tests']})" if got.get("tests") else "")
                + (f": {got['error']}" if got.get("error") else ""))
        out.append(rec)
    return out


# ---- main ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/flix_verify")),
                    help="where the files that come back go (default: $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="check the plan on this machine; run nothing on a GPU")
    ap.add_argument("--arch", default=None, help="compute capability to build for (default: the card's, e.g. 90)")
    args = ap.parse_args(argv)
    out = args.out
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"verify: {out} is not empty (the device tool returns only what is in it)")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"flix_verify_{os.getpid()}"
    (work / "logs").mkdir(parents=True)
    (work / "results").mkdir()
    started = time.monotonic()
    log = open(out / LOG, "w")

    def say(msg: str) -> None:
        line = f"[{time.monotonic() - started:6.1f} s] {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    arch = args.arch or card_arch() or "90"
    try:
        import xdist  # noqa: F401  (pytest-xdist: the GPU image has it; Triton's compiles then run in parallel)
        workers = 0 if args.dry_run else min(8, os.cpu_count() or 1)
    except ImportError:
        workers = 0
    parts = plan(workers, arch)
    if sum(p.budget_s for p in parts) + PACK_S > TOTAL_S:
        raise SystemExit(f"verify: the parts' budgets and packing exceed {TOTAL_S} s")
    say(f"{'dry run' if args.dry_run else 'verify'}: {len(parts)} parts, {sum(p.budget_s for p in parts):.0f} s "
        f"budgeted of {TOTAL_S} s, sm_{arch}, {workers or 'no'} test workers")
    records = dry_run(parts, work, say) if args.dry_run else run_plan(parts, work, say)
    try:
        decisions = decide(records)
    except Exception as exc:  # keep what was measured even if the decisions cannot be made
        decisions = {"AUTO_TABLE": None, "paths": {}, "error": f"{type(exc).__name__}: {exc}"}
    summary = {"dry_run": args.dry_run, "provenance": provenance(), "total_budget_s": TOTAL_S,
               "seconds": round(time.monotonic() - started, 1), "parts": records, "decisions": decisions}
    say("decisions: " + json.dumps(summary["decisions"]))
    log.close()
    files = pack(work, out, summary)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {', '.join(str(p) for p in files)}")
    bad = [s for p in records for s in p["steps"] if s["status"] in ("fails", "failed")]
    return 1 if bad else 0


def card_arch() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}{minor}"
    except ImportError:
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())
