"""``flix-kernels bench --overhead``: the host cost of one FLix layer, measurable on any machine.

At tiny shapes (in = out = 64; T = 1, 8 and 64 tokens; 64 features in two groups of rank 16,
so every token has an active rank of 32) a layer's time is its host path: Python, dispatch and
launches. Per call, forward (under no_grad) and forward+backward (gradients of x and the
adapters) are timed for ``nn.Linear`` (frozen), PEFT's LoRA layer of rank 32 and
:class:`~flix_kernels.FLixLinear` per backend. Backend "torch" runs for real. "triton" and
"cuda" run with their kernel launches recorded and skipped (:func:`flix_kernels._launch.recording`;
on a CPU the CUDA backend inside :func:`flix_kernels.cuda.host_path_only`, which lets it take CPU
tensors), so what is timed is exactly the Python path a GPU run takes, on a CPU as on a GPU; where
a backend's kernels can run here they are also run once, for the check (the CUDA kernels only on
a GPU: on a CPU its check is recorded as not done).

Every variant is checked against the float64 oracle before it is timed (the kernel backends
on CPU through Triton's interpreter, in a child process when this one does not interpret);
a wrong variant is not timed and is reported as a failure. Each timing is a host clock around
batches of calls, the median of the batches with p20/p80, taken twice (the second run after
the other variants) as in the rest of the suite.

Also counted: kernel launches per forward and per forward+backward (the package's own kernels,
and the torch ops that would each be at least one launch on a GPU), and one host-bound
end-to-end number, a training step of a tiny Llama with FLix on every linear layer against
PEFT LoRA of the same active rank, in the same run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from .. import _launch
from ..backends import unavailable_reason
from ..features import FeatureSpace
from ..nn import FLixLinear
from ..reference import flix_linear_reference
from ..routing import Routing

WIDTH, RANK, PER_GROUP, GROUPS = 64, 16, 32, 2
ACTIVE_RANK = RANK * GROUPS
TOKENS = (1, 8, 64)
KERNEL_BACKENDS = ("triton", "cuda")
SCALE = 0.5
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# Ops that never launch a kernel: allocations, views and aliases.
_NO_KERNEL = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "_unsafe_view", "detach",
              "alias", "lift_fresh"}


def layout(tokens: int) -> tuple[int, int]:
    """``(examples, tokens per example)`` of the ``tokens``-token case: one-token examples up to
    8, then 8 examples."""
    examples = min(tokens, 8)
    return examples, tokens // examples


def space() -> FeatureSpace:
    return FeatureSpace({f"g{g}": [f"f{g * PER_GROUP + i}" for i in range(PER_GROUP)] for g in range(GROUPS)}, RANK)


def _routing(sp: FeatureSpace, examples: int, gen: torch.Generator) -> Routing:
    ids = torch.stack([torch.randint(g * PER_GROUP, (g + 1) * PER_GROUP, (examples,), generator=gen)
                       for g in range(GROUPS)], 1)
    return Routing(ids, sp)


class _Layer:
    """One variant at one token count: ``call()`` runs the layer on its input, ``leaves`` are what
    forward+backward differentiates, ``oracle()`` its float64 output and gradients."""

    def __init__(self, name, module, x, routing=None):
        self.name, self.module, self.x, self.routing = name, module, x, routing
        self.leaves = [x] + [p for p in module.parameters() if p.requires_grad]
        self.grad_out = torch.randn(*x.shape[:-1], WIDTH, generator=torch.Generator().manual_seed(3)).to(x)

    def call(self):
        return self.module(self.x) if self.routing is None else self.module(self.x, routing=self.routing)

    def forward(self):
        with torch.no_grad():
            return self.call()

    def forward_backward(self):
        return torch.autograd.grad(self.call(), self.leaves, self.grad_out)


def _variants(device, dtype, tokens: int, backends) -> tuple[list[_Layer], dict]:
    gen = torch.Generator().manual_seed(tokens)
    sp = space()
    examples, per = layout(tokens)
    routing = _routing(sp, examples, gen).to(device)
    shape = (examples, WIDTH) if per == 1 else (examples, per, WIDTH)
    x = torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_(True)
    base = torch.nn.Linear(WIDTH, WIDTH, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(WIDTH, WIDTH, generator=gen) / WIDTH**0.5)
    base = base.to(device, dtype).requires_grad_(False)
    out, skipped = [_Layer("nn.Linear (frozen)", base, x)], {}
    try:
        from peft import LoraConfig, inject_adapter_in_model

        holder = torch.nn.Module()
        holder.proj = copy.deepcopy(base)
        holder = inject_adapter_in_model(LoraConfig(r=ACTIVE_RANK, lora_alpha=SCALE * ACTIVE_RANK,
                                                    target_modules=["proj"]), holder)
        peft_layer = holder.proj.to(device, dtype)
        with torch.no_grad():
            for p in (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        out.append(_Layer(f"PEFT LoRA (r={ACTIVE_RANK})", peft_layer, x))
    except ImportError:
        skipped[f"PEFT LoRA (r={ACTIVE_RANK})"] = "peft is not installed (pip install peft)"
    flix = FLixLinear.from_linear(copy.deepcopy(base), sp, alpha=SCALE * RANK, init="gaussian")
    with torch.no_grad():
        flix.lora_B.copy_(torch.randn(flix.lora_B.shape, generator=gen) * 0.1)
    flix = flix.to(device, dtype)
    for b in backends:
        layer = copy.deepcopy(flix)
        layer.backend = b
        out.append(_Layer(f"ours: {b}", layer, x, routing))
    return out, skipped


def _oracle(layer: _Layer):
    m = layer.module
    x = layer.x.detach().double().requires_grad_(True)
    if isinstance(m, FLixLinear):
        A = m.lora_A.detach().double().requires_grad_(True)
        B = m.lora_B.detach().double().requires_grad_(True)
        y = flix_linear_reference(x, m.base_layer.weight.double(), None, A, B, layer.routing.feature_ids,
                                  m.space.rank_offsets, m.scaling.double())
        leaves = [x, A, B]
    elif hasattr(m, "lora_A"):
        A = m.lora_A["default"].weight.detach().double().requires_grad_(True)
        B = m.lora_B["default"].weight.detach().double().requires_grad_(True)
        y = F.linear(x, m.base_layer.weight.double()) + m.scaling["default"] * F.linear(F.linear(x, A), B)
        leaves = [x, A, B]
    else:
        y, leaves = F.linear(x, m.weight.double()), [x]
    return [y, *torch.autograd.grad(y, leaves, layer.grad_out.double())]


def check(layer: _Layer) -> float:
    """The largest relative error of the output and the gradients against float64; raises
    AssertionError above the dtype's tolerance."""
    got = [layer.call()]
    got += torch.autograd.grad(got[0], layer.leaves, layer.grad_out)
    worst = 0.0
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, _oracle(layer)):
        err = ((g.double() - w).norm() / w.norm().clamp_min(1e-30)).item()
        worst = max(worst, err) if err == err else float("nan")
        if not err <= TOLERANCE[layer.x.dtype]:
            raise AssertionError(f"{layer.name} at T={layer.x.shape[:-1].numel()}: {name} relative error {err:.3g}")
    return worst


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that launch at least one kernel on a GPU (not views or allocations)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in _NO_KERNEL):
            self.ops += 1
        return func(*args, **(kwargs or {}))


def launches(fn) -> dict:
    """``{"kernels": the package's own launches, "torch_ops": the other ops that launch}`` of one
    ``fn()`` after a first call (which builds the routing's plans and metadata, once per batch)."""
    with _launch.recording(run=False):
        fn()
    with _launch.recording(run=False) as rec, _OpCounter() as ops:
        fn()
    return {"kernels": rec.total, "torch_ops": ops.ops, "total": rec.total + ops.ops,
            "by_kernel": {f"{b}:{k}": n for (b, k), n in sorted(rec.counts.items())}}


def _skipping(backend: str, device):
    """The context a kernel backend's calls are timed in: launches recorded and skipped; the CUDA
    backend on a CPU also accepts CPU tensors there (:func:`flix_kernels.cuda.host_path_only`)."""
    if backend == "cuda" and device.type != "cuda":
        from ..cuda import host_path_only

        return host_path_only()
    return _launch.recording(run=False)


def _checked_here(backend: str, device) -> bool:
    """Whether a variant's numerics can be checked here (the CUDA kernels need a GPU)."""
    return not (backend == "cuda" and device.type != "cuda")


def interleaved_host_times(fns, skip_launches, rep_ms: float, device, batch: int = 10) -> list[dict]:
    """:func:`host_time` of several callables at once: they take turns, one batch of ``batch``
    calls each, until each has run about ``rep_ms``, so a burst of load on a shared machine
    hits them alike and their ratios keep their meaning."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(fn, skip):
        with _skipping(skip, device) if skip else contextlib.nullcontext():
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            sync()
            return (time.perf_counter() - t0) / batch * 1e6

    for fn, skip in zip(fns, skip_launches):
        for _ in range(2):
            run(fn, skip)
    samples = [[] for _ in fns]
    spent = [0.0 for _ in fns]
    while min(spent) < rep_ms * 1e3 or min(len(s) for s in samples) < 5:
        if min(len(s) for s in samples) >= 2000:
            break
        for i, (fn, skip) in enumerate(zip(fns, skip_launches)):
            us = run(fn, skip)
            samples[i].append(us)
            spent[i] += us * batch
    out = []
    for s in samples:
        qs = statistics.quantiles(s, n=10, method="inclusive")
        out.append({"median_us": statistics.median(s), "p20_us": qs[1], "p80_us": qs[7], "min_us": min(s)})
    return out


def _kernel_backends_here(device) -> tuple[list[str], dict]:
    """Kernel backends whose Python path can be timed here with launches skipped: their launch
    module must import, and the device must be one they accept (or a CPU, where the kernels
    would need the interpreter to run)."""
    ok, why = [], {}
    for b in KERNEL_BACKENDS:
        from ..backends import _MODULES

        mod = _MODULES[b]
        if getattr(mod, "ops", None) is None:
            why[b] = unavailable_reason(b, device) or "its launch module is not importable"
        else:  # "cuda" on a CPU: timed inside flix_kernels.cuda.host_path_only (see _skipping)
            ok.append(b)
    return ok, why


def _needs_interpreter(device) -> bool:
    """Whether the Triton backend's path can only be taken here under the interpreter: a CPU
    process with Triton that does not interpret cannot run (or even dispatch to) its kernels."""
    from ..backends import triton_backend

    return device.type == "cpu" and triton_backend.ops is not None and not triton_backend.launch.interpreting()


def run_overhead(device: torch.device, *, rep_ms: float = 100.0, e2e: bool = True, progress=None) -> dict:
    """The overhead record (see :func:`measure`). On a CPU the whole mode runs in a child process
    under Triton's interpreter when this one does not interpret, so every variant is checked and
    timed in one process, as in any other run."""
    if not _needs_interpreter(device):
        return measure(device, rep_ms=rep_ms, e2e=e2e, progress=progress)
    if progress:
        progress.say("overhead mode (in a child process under Triton's interpreter)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = ("import json, torch; from flix_kernels.bench import overhead as o; "
            f"print(json.dumps(o.measure(torch.device('cpu'), rep_ms={rep_ms!r}, e2e={e2e!r})))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:] or ["no output"]
        return {"failures": ["the overhead mode's child process failed: " + " | ".join(tail)], "rows": []}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(device: torch.device, *, rep_ms: float = 100.0, e2e: bool = True, progress=None) -> dict:
    """The overhead record: ``rows`` (variant, tokens, mode, host time, launches), the checks,
    what was not measured and why, the ratios to PEFT LoRA and the end-to-end step. On a CPU with
    one intra-op thread: at these sizes a second thread only adds its wake-ups (and their
    sensitivity to other load on the machine) to every op."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        record = _measure(device, rep_ms, e2e, progress)
    finally:
        torch.set_num_threads(threads)
    record["cpu_threads"] = 1 if device.type == "cpu" else threads
    return record


def _measure(device, rep_ms, e2e, progress) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kernel_backends, not_timed = _kernel_backends_here(device)
    backends = ["torch", *kernel_backends]
    rows, checks, failures, skipped = [], {}, [], {}
    for t in TOKENS:
        layers, skip = _variants(device, dtype, t, backends)
        skipped.update(skip)
        good = []
        for layer in layers:
            name = layer.name.removeprefix("ours: ")
            if not _checked_here(name, device):
                checks[f"{layer.name} T={t}"] = "not checked here: its kernels need a GPU (the tests check them there)"
                good.append(layer)
                continue
            try:
                checks[f"{layer.name} T={t}"] = check(layer)
                good.append(layer)
            except AssertionError as e:
                failures.append(str(e))
        for mode in ("forward", "forward+backward"):
            if progress:
                progress.say(f"overhead: T={t} {mode}")
            fns = [layer.forward if mode == "forward" else layer.forward_backward for layer in good]
            names = [layer.name.removeprefix("ours: ") for layer in good]
            skips = [name if name in KERNEL_BACKENDS else None for name in names]
            first, again = (interleaved_host_times(fns, skips, rep_ms, device) for _ in range(2))
            for layer, fn, skip, a, b in zip(good, fns, skips, first, again):
                with _skipping(skip, device) if skip else contextlib.nullcontext():
                    counted = launches(fn)
                row = {"variant": layer.name, "tokens": t, "mode": mode, "launches_skipped": bool(skip),
                       "launches": counted, **a, "repeat_median_us": b["median_us"]}
                row["spread"] = abs(a["median_us"] - b["median_us"]) / max(min(a["median_us"], b["median_us"]), 1e-9)
                rows.append(row)
    record = {"dtype": str(dtype).replace("torch.", ""), "width": WIDTH,
              "features": f"{GROUPS} groups x {PER_GROUP}, rank {RANK} (active rank {ACTIVE_RANK})",
              "tokens": list(TOKENS), "rows": rows, "checks": checks, "not_timed": not_timed, "skipped": skipped,
              "failures": failures,
              "method": ("host clock around batches of 10 calls between device syncs, the variants of one token "
                         "count and mode taking turns batch by batch (so they share the machine's load); median "
                         f"with p20/p80 over a {rep_ms:g} ms run per variant, and a second such run (spread); kernel backends "
                         "with their launches recorded and skipped, so the Python path a GPU run takes is timed; "
                         "launches: the package's kernels plus the torch ops that launch on a GPU (not views or "
                         "allocations)")}
    record["ratios"] = ratios(rows)
    if e2e:
        if progress:
            progress.say("overhead: end-to-end training step")
        from .e2e import run_host_step

        record["e2e"] = run_host_step(device, dtype)
        failures += record["e2e"].get("failures", [])
    record["targets"] = targets(record)
    return record


def ratios(rows: list[dict]) -> dict:
    """Host time of each of ours against PEFT LoRA's at the same tokens and mode, as measured."""
    peft = {(r["tokens"], r["mode"]): r["median_us"] for r in rows if r["variant"].startswith("PEFT")}
    out = {}
    for r in rows:
        key = (r["tokens"], r["mode"])
        if r["variant"].startswith("ours") and key in peft:
            out[f"{r['variant']} T={r['tokens']} {r['mode']}"] = r["median_us"] / peft[key]
    return out


def row_noise(row: dict) -> float:
    """A host timing's relative noise: the wider of its repeat spread and its p20..p80 width."""
    width = (row["p80_us"] - row["p20_us"]) / max(row["median_us"], 1e-9)
    return max(row.get("spread", 0.0), width)


# (name, variants, mode, goal): the targets for the host path, against PEFT LoRA.
TARGETS = (("torch backend forward+backward / PEFT", ("ours: torch",), "forward+backward", 1.2),
           ("torch backend forward / PEFT", ("ours: torch",), "forward", 1.2),
           ("kernel backends' Python path forward+backward / PEFT", ("ours: triton", "ours: cuda"),
            "forward+backward", 0.5),
           ("kernel backends' Python path forward / PEFT", ("ours: triton", "ours: cuda"), "forward", 0.6))
MAX_LAUNCHES = 7


def _verdict(ratio: float, noise: float, goal: float) -> str:
    if ratio * (1 + noise) <= goal:
        return "met"
    if ratio / (1 + noise) > goal:
        return "not met"
    return "inconclusive (noisy)"


def targets(record: dict) -> dict:
    """Each target's worst measured ratio over the token counts, its noise and its verdict (a
    ratio within the noise of the goal is inconclusive, never met)."""
    rows = record.get("rows", [])
    peft = {(r["tokens"], r["mode"]): r for r in rows if r["variant"].startswith("PEFT")}
    out = {}
    for name, variants, mode, goal in TARGETS:
        worst = None
        for r in rows:
            ref = peft.get((r["tokens"], r["mode"]))
            if r["variant"] in variants and r["mode"] == mode and ref:
                ratio, noise = r["median_us"] / ref["median_us"], row_noise(r) + row_noise(ref)
                if worst is None or ratio > worst[0]:
                    worst = (ratio, noise, f"{r['variant']} T={r['tokens']}")
        if worst:
            out[name] = {"goal": f"<= {goal}x", "measured": round(worst[0], 3), "noise": round(worst[1], 3),
                         "where": worst[2], "verdict": _verdict(worst[0], worst[1], goal)}
    counts = [(r["launches"]["total"], f"{r['variant']} T={r['tokens']}") for r in rows
              if r["mode"] == "forward+backward" and r["variant"].removeprefix("ours: ") in KERNEL_BACKENDS]
    if counts:
        most = max(counts)
        out["launches per forward+backward (kernel backends)"] = {
            "goal": f"<= {MAX_LAUNCHES}", "measured": most[0], "where": most[1],
            "verdict": "met" if most[0] <= MAX_LAUNCHES else "not met"}
    for label, space in record.get("e2e", {}).get("spaces", {}).items():
        rows_ = space["rows"]
        noise = sum((r["step_ms_p80"] - r["step_ms_p20"]) / r["step_ms"] for r in rows_.values())
        out[f"training step ({label}) / PEFT"] = {
            "goal": "<= 1.1x", "measured": round(space["ratio_vs_peft"], 3), "noise": round(noise, 3),
            "verdict": _verdict(space["ratio_vs_peft"], noise, 1.1)}
    return out


def markdown_lines(record: dict) -> list[str]:
    """The overhead section of results.md."""
    lines = ["## Host overhead per layer call (tiny shapes)", "",
             f"in = out = {record.get('width')}, {record.get('features')}, {record.get('dtype')}. "
             f"Method: {record.get('method', '')}.", ""]
    peft = {(r["tokens"], r["mode"]): r["median_us"] for r in record.get("rows", []) if r["variant"].startswith("PEFT")}
    lines += ["| variant | T | mode | host time | noise | x PEFT | launches (ours + torch ops) | launches skipped |",
              "|---|---|---|---|---|---|---|---|"]
    for r in record.get("rows", []):
        ref = peft.get((r["tokens"], r["mode"]))
        vs_peft = "" if not ref else f"{r['median_us'] / ref:.2f}"
        lines.append(f"| {r['variant']} | {r['tokens']} | {r['mode']} | {r['median_us']:.1f} us | "
                     f"{100 * row_noise(r):.0f}% | {vs_peft} | "
                     f"{r['launches']['kernels']} + {r['launches']['torch_ops']} | "
                     f"{'yes' if r['launches_skipped'] else ''} |")
    t = record.get("targets", {})
    if t:
        lines += ["", "| target | goal | measured | noise | where | verdict |", "|---|---|---|---|---|---|"]
        for name, x in t.items():
            lines.append(f"| {name} | {x['goal']} | {x['measured']} | {x.get('noise', '')} | {x.get('where', '')} | "
                         f"{x['verdict']} |")
    e2e = record.get("e2e", {})
    if e2e.get("spaces"):
        m = e2e["model"]
        lines += ["", f"Training step, Llama hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, batch "
                      f"{e2e['batch']} x {e2e['seq_len']}, {e2e['dtype']}, adapters on every linear layer, steps "
                      "interleaved:", "", "| space | variant | step (median) | p20..p80 | trainable params |",
                  "|---|---|---|---|---|"]
        for label, space in e2e["spaces"].items():
            for name, r in space["rows"].items():
                lines.append(f"| {label} | {name} | {r['step_ms']:.2f} ms | {r['step_ms_p20']:.2f}..{r['step_ms_p80']:.2f} "
                             f"| {r['trainable_params']} |")
    if record.get("not_timed"):
        lines += ["", "Not timed here: " + "; ".join(f"{k} ({v})" for k, v in record["not_timed"].items())]
    return lines
