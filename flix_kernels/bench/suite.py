"""The benchmark suite: every variant, checked against float64, then timed side by side.

For each case (see :mod:`.cases`) and variant (see :mod:`.variants`): the output and the
gradients of its first input set are compared with the float64 oracle; a variant that fails the
check is not timed (a wrong fast number is worse than none) and the run ends with an error.
Then forward (under ``no_grad``), backward (over a kept graph) and forward+backward are timed on
inputs rotated over several sets, eager and, on CUDA, replayed from a CUDA graph; the peak
memory of one forward+backward is recorded.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..backends import available_backends
from ..reference import flix_linear_reference
from .cases import SCALING, SHAPE_SETS, Case, Inputs, make_inputs, make_routing, shape_sets
from .report import E2E_KEYS
from .timing import (Timer, floor_bound, floor_ms, load_average, measured_peaks, peak_memory_mib, provenance,
                     resolve_device)
from .variants import Context, Variant, variants

MODES = ("forward", "backward", "forward+backward")
# Relative error (Frobenius norm) allowed against float64, by the variant's dtype: fp32 leaves
# room for TF32 dots in Triton, bf16/fp16 for one rounding of every output.
TOLERANCE = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}


class WrongResult(AssertionError):
    pass


@dataclass
class Config:
    device: torch.device
    shapes: tuple[str, ...] = SHAPE_SETS
    quick: bool = False
    compile_torch: bool | None = None  # default: on CUDA only
    e2e: bool = True
    overhead: bool = False  # the host-overhead mode (see .overhead); --quick runs it too
    serving: bool = False  # the serving mode (see .serving); --quick runs it too
    quantized: bool = False  # the quantized-base mode (see .quantized); --quick runs it too
    rep_ms: float | None = None
    backends: list[str] | None = None  # default: every available one
    compare: tuple[str, ...] | None = None  # comparison variants beside base and ours (default: all)
    cases: list[Case] | None = None  # explicit cases (tests); overrides shapes
    dtype: torch.dtype | None = None
    log: list[str] = field(default_factory=list)


def oracle(problem: str, ctx: Context, s: Inputs):
    """float64 output and gradients (w.r.t. x and the problem's adapters) for input set ``s``."""
    dev = s.x.device
    x = s.x.detach().double().requires_grad_(True)
    w = s.weight.detach().double()
    if problem == "base":
        y, leaves = F.linear(x, w), [x]
    else:
        if problem == "flix":
            A, B = s.lora_A, s.lora_B
            ids, offsets = ctx.routing.feature_ids, ctx.routing.space.rank_offsets
        else:  # one adapter of the active rank on every token
            A, B = s.single_A, s.single_B
            ids, offsets = torch.zeros(ctx.routing.num_examples, 1, dtype=torch.long), [0, A.shape[0]]
        A = A.detach().double().requires_grad_(True)
        B = B.detach().double().requires_grad_(True)
        y = flix_linear_reference(x, w, None, A, B, ids, offsets, SCALING)
        y = y + 0 * (A.sum() + B.sum())  # zero gradients for features no token uses
        leaves = [x, A, B]
    grads = torch.autograd.grad(y, leaves, s.grad_out.double().to(dev))
    return [y, *grads]


def check(variant: Variant, ctx: Context, s: Inputs, fn, leaves) -> dict:
    """Relative errors of the output and every gradient; raises :class:`WrongResult` above the
    dtype's tolerance or when anything is not finite."""
    y = fn()
    got = [y, *torch.autograd.grad(y, leaves, s.grad_out)]
    want = oracle(variant.problem, ctx, s)
    errs, tol = {}, TOLERANCE[s.x.dtype]
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        if g.shape != w.shape:
            raise WrongResult(f"{variant.name}: {name} has shape {tuple(g.shape)}, expected {tuple(w.shape)}")
        err = ((g.double() - w).norm() / w.norm().clamp_min(1e-30)).item()
        errs[name] = err
        if not err <= tol:  # NaN fails too
            raise WrongResult(f"{variant.name} on {ctx.case.label}: {name} relative error {err:.3g} > {tol:g}")
    return errs


def _call(mode: str, prepared, inputs: list[Inputs]):
    """A callable running ``mode`` on the next input set each call (rotation keeps the caches honest)."""
    state = {"i": 0}
    n = len(prepared)
    kept = [fn() for fn, _ in prepared] if mode == "backward" else None  # graphs the timed backward re-walks

    def call():
        i = state["i"] % n
        state["i"] += 1
        fn, leaves = prepared[i]
        if mode == "forward":
            with torch.no_grad():
                return fn()
        if mode == "backward":
            return torch.autograd.grad(kept[i], leaves, inputs[i].grad_out, retain_graph=True)
        return torch.autograd.grad(fn(), leaves, inputs[i].grad_out)

    return call


def _dedupe(cases: list[Case]) -> list[Case]:
    seen, out = set(), []
    for c in cases:
        key = c.as_dict()
        key.pop("label")
        key = tuple(sorted(key.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def plan(cfg: Config) -> list[Case]:
    """The cases a run of ``cfg`` times, in order."""
    sets = shape_sets(resolve_device(cfg.device).type, cfg.quick)
    return _dedupe(cfg.cases or [c for s in cfg.shapes for c in sets[s]])


def parts(cfg: Config) -> int:
    """How many parts a run of ``cfg`` counts in its progress: the cases and the end-to-end step."""
    return len(plan(cfg)) + (1 if cfg.e2e else 0) + (1 if cfg.overhead else 0) + (1 if cfg.serving else 0) + (1 if cfg.quantized else 0)


def run(cfg: Config, progress=None, checkpoint=None) -> dict:
    """Run the suite; returns the results record (see :mod:`.report` for its outputs).
    ``progress`` (a :class:`flix_kernels._progress.Progress`) is told each step (``say``) and
    ticked after each of the :func:`parts`, and told each finished (``finished``: name, time and
    key number); ``checkpoint(record)`` is called after every case, so a run cut short keeps
    what it measured."""
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    dtype = cfg.dtype or (torch.bfloat16 if cuda else torch.float32)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    rep = cfg.rep_ms or ((60 if cfg.quick else 200) if cuda else (100 if cfg.quick else 400))
    timer = Timer(device, rep)
    compile_torch = cuda if cfg.compile_torch is None else cfg.compile_torch
    backends = cfg.backends or available_backends(device)
    not_here = {b: why for b, why in _unavailable(device).items() if b not in backends}
    cases = plan(cfg)
    if progress:
        progress.say("measuring this device's matmul rate and copy bandwidth")
    record = {**provenance(device), "dtype": str(dtype).replace("torch.", ""), "quick": cfg.quick,
              "backends": backends, "backends_unavailable": not_here,
              "method": (f"{'triton.testing.do_bench (CUDA events, L2 flushed before each call) and CUDA-graph replays' if cuda else 'host clock around each call'}"
                         f"; median with p20/p80 of a {rep:g} ms run, and the median of a second identical run "
                         "taken after the case's other variants (spread); "
                         "inputs rotated over several random sets; forward under no_grad, backward over a kept graph; "
                         "every variant checked against float64 before it is timed"),
              "peaks": measured_peaks(device, dtype, timer), "cases": [], "rows": [], "skipped": {}, "failures": []}
    elem = torch.tensor([], dtype=dtype).element_size()
    cpu_gen = torch.Generator().manual_seed(20241125)
    gen = torch.Generator(device).manual_seed(7)
    for case in cases:
        started, failed = time.perf_counter(), len(record["failures"])
        space = case.space()
        routing = make_routing(case, space, cpu_gen, device)
        rotations = 2 if not cuda or case.tokens * case.d_in > 2**24 else 4
        inputs = make_inputs(case, space, dtype, device, gen, rotations)
        ctx = Context(case, routing, device, {})
        vs, skipped = variants(device, dtype, case, compile_torch=compile_torch, backends=backends,
                               compare=cfg.compare)
        record["skipped"].update(skipped)
        flops, nbytes, peaks = case.flops(), case.bytes(elem), record["peaks"]
        record["cases"].append({**case.as_dict(), "floors_ms": {m: floor_ms(flops[m], nbytes[m], peaks) for m in MODES},
                                "floor_bound": {m: floor_bound(flops[m], nbytes[m], peaks) for m in MODES}})
        timed = []
        for v in vs:
            if progress:
                progress.say(f"{case.label}: {v.name}")
            timed += _run_variant(v, ctx, inputs, timer, record, cuda)
        if progress:
            progress.say(f"{case.label}: repeating every timing")
        for v, prepared, row in timed:
            _repeat(v, ctx, prepared, inputs, row, timer, record)
        if case.label == "headline" and cuda and "triton" in backends:
            _breakdown(case, ctx, inputs[0], dtype, device, timer, record)
        del inputs, ctx, timed
        if cuda:
            torch.cuda.empty_cache()
        if checkpoint:
            checkpoint(record)
        if progress:
            progress.finished(case.label, time.perf_counter() - started,
                              case_result(record["rows"], case.label, len(record["failures"]) - failed))
            progress.tick()
    if cfg.overhead:
        from .overhead import run_overhead

        if progress:
            progress.say("host overhead at tiny shapes")
        started = time.perf_counter()
        record["overhead"] = run_overhead(device, rep_ms=max(rep / 4, 20.0), progress=progress)
        record["failures"] += record["overhead"].get("failures", [])
        if checkpoint:
            checkpoint(record)
        if progress:
            progress.finished("host overhead", time.perf_counter() - started, part_result(record["overhead"]))
            progress.tick()
    if cfg.serving:
        from .serving import run_serving

        if progress:
            progress.say("serving: a decode step of a stack of layers, one feature set per request")
        started = time.perf_counter()
        record["serving"] = run_serving(device, dtype, backends, quick=cfg.quick, timer=timer, progress=progress)
        record["failures"] += record["serving"]["failures"]
        if checkpoint:
            checkpoint(record)
        if progress:
            progress.finished("serving", time.perf_counter() - started, part_result(record["serving"]))
            progress.tick()
    if cfg.quantized:
        from .quantized import run_quantized

        if progress:
            progress.say("quantized base: a training step over an NF4 base, against PEFT LoRA over it")
        started = time.perf_counter()
        record["quantized"] = run_quantized(device, dtype, quick=cfg.quick)
        record["failures"] += record["quantized"].get("failures", [])
        if checkpoint:
            checkpoint(record)
        if progress:
            progress.finished("quantized base", time.perf_counter() - started, part_result(record["quantized"]))
            progress.tick()
    if cfg.e2e:
        from .e2e import run_e2e

        if progress:
            progress.say("end-to-end training step")
        started = time.perf_counter()
        record["e2e"] = run_e2e(device, dtype, backends, quick=cfg.quick, timer=timer)
        if checkpoint:
            checkpoint(record)
        if cuda and not cfg.quick:  # the GPU-bound step beside the host-bound one
            if progress:
                progress.say("end-to-end training step, GPU-bound (two Llama-7B-wide layers)")
            record["e2e_gpu_bound"] = run_e2e(device, dtype, backends, quick=cfg.quick, timer=timer, size="slice")
            if checkpoint:
                checkpoint(record)
        record["failures"] += [f for k in E2E_KEYS for f in record.get(k, {}).get("failures", [])]
        if progress:
            progress.finished("end-to-end training step", time.perf_counter() - started, part_result(record["e2e"]))
            progress.tick()
    if "triton" in backends:  # which Triton paths these numbers are of
        from ..backends import triton_backend

        record["triton"] = triton_backend.settings(device)
    if "cuda" in backends:
        from ..backends import cuda_backend

        record["cuda"] = cuda_backend.settings()
    record["host_load"]["end"] = load_average()
    return record


def case_result(rows: list[dict], label: str, failures: int = 0) -> str:
    """The key number of case ``label`` for its line in a log: our fastest variant's eager
    forward+backward (forward where a variant has no backward) and its ratio to the base layer's."""
    def best(mode, ours):
        timed = [r for r in rows if r["case"] == label and r["mode"] == mode and not r.get("graph")
                 and "median_ms" in r and (r["ours"] if ours else r["variant"] == "base F.linear")]
        return min(timed, key=lambda r: r["median_ms"], default=None)

    failed = f"; {failures} failure(s)" if failures else ""
    for mode in ("forward+backward", "forward"):
        ours, base = best(mode, True), best(mode, False)
        if ours is not None:
            ratio = f" ({ours['median_ms'] / base['median_ms']:.2f}x base F.linear)" if base else ""
            return f"{ours['variant']} fastest of ours, {mode} {ours['median_ms']:.3f} ms{ratio}{failed}"
    return "no variant of ours timed" + failed


def part_result(part: dict) -> str:
    """The line of a finished mode (overhead, serving, quantized, end-to-end) in a log: skipped
    and why, else our fastest training step where the mode times steps, and its failures."""
    if isinstance(part.get("skipped"), str):
        return f"skipped ({part['skipped']})"
    rows = part.get("rows") if isinstance(part.get("rows"), dict) else {}  # e2e: {variant: row}
    steps = {n: r["step_ms"] for n, r in rows.items() if n.startswith("ours") and "step_ms" in r}
    out = [f"{min(steps, key=steps.get)} step {min(steps.values()):.1f} ms"] if steps else []
    if part.get("failures"):
        out.append(f"{len(part['failures'])} failure(s)")
    return "; ".join(out) or "ok"


def _breakdown(case: Case, ctx: Context, s: Inputs, dtype, device, timer: Timer, record: dict) -> None:
    """``record["kernels"]``: the Triton backend's launches at this case, each timed alone."""
    from .kernels import rows

    try:
        out = rows(case, ctx.routing, s, oracle("flix", ctx, s), TOLERANCE[dtype], dtype, device, record["peaks"],
                   timer)
    except Exception as e:  # a wrong result or a model that no longer matches the launches
        record["failures"].append(f"per-launch breakdown: {type(e).__name__}: {e}")
        return
    record["kernels"] = {"backend": "triton", "case": case.label, "rows": out}


def _unavailable(device) -> dict:
    from ..backends import BACKENDS, unavailable_reason

    return {b: unavailable_reason(b, device) for b in BACKENDS if unavailable_reason(b, device)}


def _failed(v: Variant, ctx: Context, row: dict, e: Exception, record: dict, timer: Timer, mode: str) -> None:
    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    if v.ours:
        record["failures"].append(f"{v.name} on {ctx.case.label} {mode}: {row['error']}")
    with contextlib.suppress(Exception):
        timer.sync()


def _run_variant(v: Variant, ctx: Context, inputs: list[Inputs], timer: Timer, record: dict, cuda: bool) -> list:
    """Check ``v``, then time each of its modes once; returns ``[(v, prepared, row)]`` for the
    repeat pass (:func:`_repeat`)."""
    base_row = {"case": ctx.case.label, "variant": v.name, "ours": v.ours}
    try:
        prepared = [v.prepare(ctx, s) for s in inputs]
        errs = check(v, ctx, inputs[0], *prepared[0])
    except WrongResult as e:
        record["failures"].append(str(e))
        record["rows"].append({**base_row, "mode": "check", "error": str(e)})
        return []
    except Exception as e:  # noqa: BLE001 - a variant that cannot run here is reported, not fatal
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if v.ours:
            record["failures"].append(f"{v.name} on {ctx.case.label}: {msg}")
        record["rows"].append({**base_row, "mode": "check", "error": msg})
        return []
    timed = []
    for mode in v.modes:
        for graph in ((False, True) if cuda and v.graphable and mode != "backward" else (False,)):
            row = {**base_row, "mode": mode, "graph": graph, "rel_err": errs}
            try:
                call = _call(mode, prepared, inputs)
                row.update(timer.first(call, graph=graph))
                if mode == "forward+backward" and not graph:
                    row["peak_mem_mib"] = peak_memory_mib(call, ctx.device)
                timed.append((v, prepared, row))
            except Exception as e:  # noqa: BLE001
                _failed(v, ctx, row, e, record, timer, mode)
            record["rows"].append(row)
    return timed


TIMING_FIELDS = ("median_ms", "p20_ms", "p80_ms", "cuda_graph", "peak_mem_mib")


def _repeat(v: Variant, ctx: Context, prepared, inputs: list[Inputs], row: dict, timer: Timer, record: dict) -> None:
    """The second timing of ``row`` (a fresh callable: a kept backward graph is rebuilt)."""
    try:
        timer.repeat(_call(row["mode"], prepared, inputs), row, graph=row["graph"])
    except Exception as e:  # noqa: BLE001 - a timing without its repeat is not a result
        for k in TIMING_FIELDS:
            row.pop(k, None)
        _failed(v, ctx, row, e, record, timer, row["mode"] + " (repeat)")
