"""``flix-kernels bench --serving``: one decode step of a stack of FLix layers serving a batch of
requests at once, each request with its own feature set.

The model is a stack of frozen linear layers (on a GPU 8 of 4096 -> 4096, the width of a 7B
Llama; on a CPU 4 of 256, 2 of 128 with ``--quick``) in the bench dtype, with FLix adapters on
every layer. The feature space has 1024 features in 4 groups of 256, rank 16 each; a request
draws one feature per group with zipf popularity (``p(i) ~ 1 / (i + 1) ** 1.1``), so a batch
mixes popular and rare features and, at 32 requests, nearly every request has a set of its own.
A step feeds one token per request, for B = 1, 8, 32 and 64 requests.

Variants, each checked against the float64 oracle of the whole stack before it is timed:

* ``base``: the stack of ``nn.Linear`` alone, the floor;
* ``ours: <backend>``: :class:`~flix_kernels.FLixLinear` with each backend that runs here, eager,
  and on CUDA also replayed from a CUDA graph (the routing is built before the capture);
* ``PEFT mixed adapters``: PEFT's LoRA layers holding one adapter per distinct feature set of the
  batch (the set's rank rows stacked: rank 4 x 16, its scales folded into B, so the same function),
  called with ``adapter_names=``, PEFT's own mixed-batch inference. Eager only: its forward indexes
  the batch with Python lists, which a CUDA graph cannot capture.

Reported per variant and batch: the step time (median, p20..p80, and a second run's median), the
requests served per second (one token each) and the ratio to the base stack. The target of
issue 19: our best eager step at least 3x faster than PEFT's at 32 requests.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F

from ..features import FeatureSpace
from ..nn import FLixLinear
from ..reference import flix_linear_reference
from ..routing import Routing

GROUPS, PER_GROUP, RANK, ZIPF = 4, 256, 16, 1.1
BATCHES = (1, 8, 32, 64)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}
PEFT_TARGET = 3.0  # PEFT's mixed-adapter step over ours, at TARGET_REQUESTS
TARGET_REQUESTS = 32


def sizes(device: torch.device, quick: bool) -> tuple[int, int, tuple[int, ...]]:
    """``(layers, width, batches)`` of a run."""
    if device.type == "cuda":
        return (4, 4096, (1, 32)) if quick else (8, 4096, BATCHES)
    return (2, 128, (1, 8, 32)) if quick else (4, 256, BATCHES)


def space() -> FeatureSpace:
    return FeatureSpace({f"g{g}": [f"g{g}_{i}" for i in range(PER_GROUP)] for g in range(GROUPS)}, RANK)


def draw_requests(requests: int, gen: torch.Generator) -> torch.Tensor:
    """``(requests, GROUPS)`` feature ids: one per group, zipf-popular within the group."""
    weights = 1.0 / torch.arange(1, PER_GROUP + 1, dtype=torch.float64) ** ZIPF
    return torch.stack([torch.multinomial(weights, requests, replacement=True, generator=gen) + g * PER_GROUP
                        for g in range(GROUPS)], 1)


class _Model:
    """The frozen stack and its FLix adapters (on the device, in the bench dtype)."""

    def __init__(self, layers: int, width: int, device, dtype, gen: torch.Generator):
        self.space = space()
        self.base = []
        self.flix = []
        for _ in range(layers):
            lin = torch.nn.Linear(width, width, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(width, width, generator=gen) / width**0.5)
            flix = FLixLinear.from_linear(copy.deepcopy(lin), self.space, alpha=float(RANK), init="gaussian")
            with torch.no_grad():  # an update of about half the base output's size, so errors in it show
                flix.lora_A.copy_(torch.randn(flix.lora_A.shape, generator=gen) / width**0.5)
                flix.lora_B.copy_(torch.randn(flix.lora_B.shape, generator=gen) * 0.5 / (GROUPS * RANK)**0.5)
            flix = flix.to(device, dtype).requires_grad_(False)
            with torch.no_grad():  # per-feature scales, so a wrong scale (or PEFT's folding of it) shows
                flix.scaling.copy_((torch.rand(self.space.num_features, generator=gen) + 0.5).to(flix.scaling))
            self.base.append(lin.to(device, dtype).requires_grad_(False))
            self.flix.append(flix)

    def with_backend(self, backend: str) -> list[FLixLinear]:
        """The FLix layers, set to ``backend`` (copies sharing the tensors: a module attribute set
        once, not in every timed step)."""
        out = []
        for layer in self.flix:
            alias = copy.copy(layer)  # its own attribute dict; the parameter and buffer dicts are shared
            alias.backend = backend
            out.append(alias)
        return out

    def oracle(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = x.double()
        for layer in self.flix:
            h = flix_linear_reference(h, layer.base_layer.weight.double(), None, layer.lora_A.double(),
                                      layer.lora_B.double(), ids, self.space.rank_offsets, layer.scaling.double())
        return h

    def base_oracle(self, x: torch.Tensor) -> torch.Tensor:
        h = x.double()
        for lin in self.base:
            h = F.linear(h, lin.weight.double())
        return h


def _peft_stack(model: _Model, ids: torch.Tensor):
    """PEFT LoRA layers over copies of the base layers, one adapter per distinct feature set of
    ``ids``; returns ``(layers, adapter name of each request)``, or raises ImportError."""
    from peft import LoraConfig, inject_adapter_in_model

    sets = sorted({tuple(int(f) for f in row) for row in ids})
    names = {s: f"set{i}" for i, s in enumerate(sets)}
    holder = torch.nn.Module()
    for i, lin in enumerate(model.base):
        holder.add_module(f"l{i}", copy.deepcopy(lin))
    rank = GROUPS * RANK
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=[f"l{i}" for i in range(len(model.base))])
    with warnings.catch_warnings():  # PEFT warns that a second adapter is being added: that is the point
        warnings.simplefilter("ignore", UserWarning)
        for s in sets:  # injecting again adds an adapter to the existing LoRA layers
            holder = inject_adapter_in_model(config, holder, adapter_name=names[s])
    off = model.space.rank_offsets
    with torch.no_grad():
        for i, flix in enumerate(model.flix):
            layer = getattr(holder, f"l{i}")
            for s in sets:
                rows = torch.cat([torch.arange(int(off[f]), int(off[f + 1])) for f in s]).to(flix.lora_A.device)
                col_scale = torch.cat([flix.scaling[f].expand(int(off[f + 1] - off[f])) for f in s])
                layer.lora_A[names[s]].weight.copy_(flix.lora_A[rows])
                layer.lora_B[names[s]].weight.copy_(flix.lora_B[:, rows] * col_scale.to(flix.lora_B.dtype))
    holder = holder.to(model.base[0].weight.device, model.base[0].weight.dtype).eval().requires_grad_(False)
    return [getattr(holder, f"l{i}") for i in range(len(model.base))], [names[tuple(int(f) for f in row)]
                                                                        for row in ids]


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def run_serving(device: torch.device, dtype: torch.dtype, backends, *, quick: bool, timer, progress=None) -> dict:
    """The serving record: ``rows`` (variant, requests, distinct sets, graph, timings, tokens/s,
    ratio to base), ``targets``, ``skipped`` and ``failures``."""
    layers, width, batches = sizes(device, quick)
    gen = torch.Generator().manual_seed(20261202)
    model = _Model(layers, width, device, dtype, gen)
    cuda = device.type == "cuda"
    timed_backends = [b for b in backends if cuda or b == "torch"]  # the Triton interpreter is no timing
    rows, failures, skipped = [], [], {}
    if not cuda and any(b != "torch" for b in backends):
        skipped["kernel backends"] = "timed on GPUs only (Triton interprets on a CPU; the CUDA kernels need a GPU)"
    for requests in batches:
        ids = draw_requests(requests, gen)
        routing = Routing(ids, model.space).to(device)
        x = torch.randn(requests, width, generator=gen).to(device, dtype)
        want, want_base = model.oracle(x, ids), model.base_oracle(x)
        distinct = len({tuple(r.tolist()) for r in ids})

        def base_step():
            h = x
            for lin in model.base:
                h = lin(h)
            return h

        steps = {"base": (base_step, want_base)}
        for b in timed_backends:
            def flix_step(stack=model.with_backend(b)):
                h = x
                for layer in stack:
                    h = layer(h, routing=routing)
                return h

            steps[f"ours: {b}"] = (flix_step, want)
        try:
            peft_layers, names = _peft_stack(model, ids)

            def peft_step():
                h = x
                for layer in peft_layers:
                    h = layer(h, adapter_names=names)
                return h

            steps["PEFT mixed adapters"] = (peft_step, want)
        except ImportError:
            skipped["PEFT mixed adapters"] = "peft is not installed (pip install peft)"
        for name, (step, oracle) in steps.items():
            if progress:
                progress.say(f"serving: {requests} requests, {name}")
            with torch.no_grad():
                try:
                    err = _rel_error(step(), oracle)
                except Exception as e:  # a variant that cannot run this batch is reported, not timed
                    failures.append(f"serving {name} at {requests} requests: {type(e).__name__}: {e}"[:300])
                    continue
                if not err <= TOLERANCE[dtype]:
                    failures.append(f"serving {name} at {requests} requests: relative error {err:.3g} against "
                                    "float64; not timed")
                    continue
                for graph in ((False, True) if cuda and name != "PEFT mixed adapters" else (False,)):
                    row = {"variant": name, "requests": requests, "distinct_sets": distinct, "error_vs_fp64": err,
                           **timer.time(step, graph=graph)}
                    row["tokens_per_s"] = requests / (row["median_ms"] * 1e-3)
                    rows.append(row)
    for r in rows:
        ref = next((b for b in rows if b["variant"] == "base" and b["requests"] == r["requests"]
                    and b["cuda_graph"] == r["cuda_graph"]), None)
        r["x_base"] = r["median_ms"] / ref["median_ms"] if ref else None
    record = {"layers": layers, "width": width, "dtype": str(dtype).replace("torch.", ""),
              "features": f"{GROUPS} groups x {PER_GROUP}, rank {RANK}, zipf {ZIPF} (one feature per group and "
                          f"request: active rank {GROUPS * RANK})",
              "batches": list(batches), "rows": rows, "skipped": skipped, "failures": failures}
    record["targets"] = targets(rows)
    return record


def targets(rows: list[dict]) -> dict:
    """PEFT's eager mixed-adapter step over our best eager step at TARGET_REQUESTS requests."""
    at = [r for r in rows if r["requests"] == TARGET_REQUESTS and not r["cuda_graph"]]
    peft = next((r for r in at if r["variant"] == "PEFT mixed adapters"), None)
    ours = min((r for r in at if r["variant"].startswith("ours")), key=lambda r: r["median_ms"], default=None)
    if not (peft and ours):
        return {}
    speedup = peft["median_ms"] / ours["median_ms"]
    noise = peft.get("spread", 0.0) + ours.get("spread", 0.0)
    verdict = ("met" if speedup / (1 + noise) >= PEFT_TARGET else "not met" if speedup * (1 + noise) < PEFT_TARGET
               else "inconclusive (noisy)")
    return {f"PEFT mixed adapters / ours at {TARGET_REQUESTS} requests (eager)": {
        "goal": f">= {PEFT_TARGET:g}x", "measured": round(speedup, 2), "noise": round(noise, 3),
        "where": f"{ours['variant']}, {ours['distinct_sets']} distinct sets", "verdict": verdict}}


def markdown_lines(record: dict) -> list[str]:
    """The serving section of results.md."""
    lines = ["## Serving: a decode step of a stack of FLix layers, one feature set per request", "",
             f"{record['layers']} layers of {record['width']} -> {record['width']}, {record['dtype']}, "
             f"{record['features']}; one token per request; every variant checked against float64 first.", "",
             "| variant | requests | distinct sets | CUDA graph | step | p20..p80 | requests/s | x base |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        x_base = "" if r["x_base"] is None else f"{r['x_base']:.2f}"
        lines.append(f"| {r['variant']} | {r['requests']} | {r['distinct_sets']} | {'yes' if r['cuda_graph'] else ''} "
                     f"| {r['median_ms']:.3f} ms | {r['p20_ms']:.3f}..{r['p80_ms']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{x_base} |")
    for name, t in record.get("targets", {}).items():
        lines += ["", f"{name}: {t['measured']}x (goal {t['goal']}, noise {t['noise']}, {t['where']}): {t['verdict']}"]
    if record.get("skipped"):
        lines += ["", "Not timed here: " + "; ".join(f"{k} ({v})" for k, v in record["skipped"].items())]
    return lines
