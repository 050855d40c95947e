"""The per-launch breakdown of ``flix-kernels bench``: every launch of one forward and one
backward of the Triton backend at the headline case, timed on its own, against its own floor.

The launches are taken from the backend itself (:func:`flix_kernels._launch.recording` with
``keep=True`` keeps a replay of each), checked first (the layer's output and gradients against
the float64 oracle), then each replay is timed alone as the suite times a variant. Floors come
from :mod:`flix_kernels.triton.traffic`, which models the same launches on paper: a launch's
floor is ``max(FLOPs / measured matmul rate, floor bytes / measured copy bandwidth)``, and its
tile traffic (the bytes its programs move without cache reuse) is shown beside it. The cuBLAS
GEMMs of the base layer (unless the fused base GEMM computes them) and the torch op that sums
split partials are not ours and are left out.
"""

from __future__ import annotations

import torch

from .. import _launch
from ..ops import flix_linear
from .cases import SCALING, Case
from .timing import floor_ms

# The model's names of each launch, by the kernel that performs it.
_KIND = {"shrink_kernel": ("(shrink)",), "expand_kernel": ("(expand)", "(fused GEMM)"),
         "fused_linear_tma_kernel": ("(fused GEMM)",), "rank_grad_kernel": ("(owner)",),
         "example_outer_kernel": ("(split partials)",), "rank_reduce_kernel": ("(split reduce)",),
         "dy_pass_kernel": ("(one pass over dy)",)}


def _record(x, weight, A, B, routing, grad_out) -> tuple[dict[str, list], list, bool]:
    """``({"forward": [(kernel, replay)], "backward": [...]}, [y, dx, dA, dB], fused)`` of one
    Triton forward+backward; ``fused``: its base GEMMs ran in our kernel."""
    leaves = [t.detach().requires_grad_(True) for t in (x, A, B)]
    with _launch.recording(run=True, keep=True) as fwd:
        y = flix_linear(leaves[0], weight, None, leaves[1], leaves[2], routing, scaling=SCALING, backend="triton")
    with _launch.recording(run=True, keep=True) as bwd:
        grads = torch.autograd.grad(y, leaves, grad_out)
    launches = {"forward": [(launch.name, launch.replay) for launch in fwd.launches],
                "backward": [(launch.name, launch.replay) for launch in bwd.launches]}
    fused = any(launch.name == "fused_linear_tma_kernel" or launch.kwargs.get("MODE") == 2
                for launch in fwd.launches)
    return launches, [y.detach(), *grads], fused


def model_batch(case: Case, routing, dtype):
    """The :class:`~flix_kernels.triton.traffic.Batch` of a batched case."""
    from ..triton import traffic

    return traffic.Batch(case.examples, case.seq_len, case.d_in, case.d_out, active=case.active, rank=case.rank,
                         present=int(torch.unique(routing.feature_ids[routing.feature_ids >= 0]).numel()),
                         num_features=case.features, dtype=dtype, adapter_dtype=dtype)


def rows(case: Case, routing, inputs, want: list, tolerance: float, dtype, device, peaks: dict,
         timer=None) -> list[dict]:
    """One row per launch: pass, kernel, the model's name for it, FLOPs, floor and tile bytes,
    the floor in ms, and (with a ``timer``) its measured time and time over floor. ``want`` is
    the float64 ``[y, dx, dA, dB]`` of these inputs; a recorded run farther from it than
    ``tolerance`` (relative, in norm) raises before anything is timed."""
    from ..triton import traffic

    recorded, got, fused = _record(inputs.x, inputs.weight, inputs.lora_A, inputs.lora_B, routing, inputs.grad_out)
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        err = ((g.double() - w).norm() / w.norm().clamp_min(1e-30)).item()
        if not err <= tolerance:
            raise AssertionError(f"per-launch breakdown at {case.label}: {name} relative error {err:.3g} "
                                 f"(tolerance {tolerance:g})")
    sms = _launch.num_sms(device)
    model = traffic.layer(model_batch(case, routing, dtype), sms=sms, fused=fused)
    out = []
    for phase, launches in recorded.items():
        ours = [m for m in model[phase] if "(split sum)" not in m.name]
        names = [k for k, _ in launches]
        if len(ours) != len(launches) or any(not any(kind in m.name for kind in _KIND.get(k, ()))
                                             for k, m in zip(names, ours)):
            raise AssertionError(f"{case.label} {phase}: the backend launched {names}, the traffic model has "
                                 f"{[m.name for m in ours]}")
        for (kernel, replay), m in zip(launches, ours):
            row = {"pass": phase, "kernel": kernel, "launch": m.name, "flops": m.flops, "floor_bytes": m.floor_bytes,
                   "tile_bytes": m.tile_bytes, "floor_ms": floor_ms(m.flops, m.floor_bytes, peaks)}
            if timer is not None:
                t = timer.first(replay)
                timer.repeat(replay, t)
                row.update(time_ms=t["median_ms"], spread=t["spread"], x_floor=t["median_ms"] / row["floor_ms"])
            out.append(row)
    return out


def markdown_lines(section: dict) -> list[str]:
    """The breakdown as a markdown table (``record["kernels"]``)."""
    lines = [f"## Per-launch breakdown ({section['backend']}, {section['case']})", "",
             "Each launch of one forward and one backward replayed and timed on its own (cuBLAS GEMMs and the "
             "split-partials sum excluded); floor = max(FLOPs / matmul rate, floor bytes / copy bandwidth); tile "
             "traffic: the bytes its programs move without cache reuse (flix_kernels/triton/traffic.py).", "",
             "| pass | launch | kernel | time | floor | x floor | floor MiB | tile MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in section["rows"]:
        t = f"{r['time_ms'] * 1e3:.1f} us" if "time_ms" in r else "not timed"
        x = f"{r['x_floor']:.2f}" if "x_floor" in r else ""
        lines.append(f"| {r['pass']} | {r['launch']} | {r['kernel']} | {t} | {r['floor_ms'] * 1e3:.1f} us | {x} | "
                     f"{r['floor_bytes'] / 2**20:.1f} | {r['tile_bytes'] / 2**20:.1f} |")
    return lines
