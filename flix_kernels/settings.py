"""Every ``FLIX_*`` environment variable, declared once: its name, default, what it does, who
reads it and when. ``flix-kernels info`` lists the kernel switches with their values, and the
README's table is checked against :data:`SWITCHES`.

A kernel switch holds ``0`` or ``1`` (unset: its default). Any other value is refused with a
``ValueError`` naming the variable when it is read, so a misspelled value never goes unnoticed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["SWITCHES", "Switch", "kernel_switches", "value"]


@dataclass(frozen=True)
class Switch:
    name: str
    default: bool | str | None  # kernel switches: a bool; the others: what unset means
    does: str
    read: str  # who reads it, and when
    scope: str  # "kernels", "install", "tests" or "benchmarks"


SWITCHES: dict[str, Switch] = {s.name: s for s in (
    Switch("FLIX_FUSE_BASE", False,
           "Triton backend: the base GEMM runs inside the expand kernel's tile, so y is written once "
           "(0: cuBLAS, then the update added in place)", "flix_kernels.backends.triton_backend, at import", "kernels"),
    Switch("FLIX_TRITON_TMA", True,
           "Triton backend: the fused base GEMM moves its operands by TMA on a persistent grid on Hopper and "
           "later (0: the pointer kernel everywhere)", "flix_kernels.triton.expand, at import", "kernels"),
    Switch("FLIX_TRITON_DY_PASS", True,
           "Triton backend: g and dB from one read of dy where its workspace fits (0: two passes)",
           "flix_kernels.triton.weight_grad, at import", "kernels"),
    Switch("FLIX_TRITON_AUTOTUNE", False,
           "Triton backend: the first launch of each kernel per shape class times candidate configurations "
           "(and the fused or cuBLAS base path) and keeps the fastest for the process",
           "flix_kernels.triton.tuning, at import", "kernels"),
    Switch("FLIX_CUDA_DECODE", True,
           "CUDA backend: calls of at most 64 tokens take the one-launch decode kernel (0: the general kernels)",
           "flix_kernels.cuda.launch, when a call is planned (once per routing and call signature)", "kernels"),
    Switch("FLIX_CUDA", None,
           "build the CUDA extension: 1 always (a failed build is an error), 0 never; unset: when nvcc and a "
           "driver are found", "setup.py, at install", "install"),
    Switch("FLIX_CUDA_ARCHS", "80-real;89-real;90",
           "CMake CUDA architectures of the extension, e.g. 90", "setup.py, at install", "install"),
    Switch("FLIX_VENV", ".venv", "the virtual environment scripts/dev.sh (make) creates and uses",
           "scripts/dev.sh", "install"),
    Switch("FLIX_TORCH_CPU_VERSION", "2.13.0", "the CPU build of torch scripts/dev.sh installs where no NVIDIA "
           "driver is present", "scripts/dev.sh", "install"),
    Switch("FLIX_TEST_SEED", "0", "the base seed of every test's random draws (each test adds its node id)",
           "tests/conftest.py", "tests"),
    Switch("FLIX_LONG_TESTS", None, "1: the long property runs and every variant of the slow tests",
           "tests/conftest.py", "tests"),
    Switch("FLIX_COMMIT", None, "the commit a benchmark or GPU verify run records where git cannot tell",
           "flix_kernels.bench, benchmarks/gpu_verify.py", "benchmarks"),
)}


def value(name: str) -> bool:
    """The current value of kernel switch ``name`` (its default when unset or empty)."""
    switch = SWITCHES[name]
    if switch.scope != "kernels":
        raise KeyError(f"{name} is not a kernel switch (it is read by {switch.read})")
    raw = os.environ.get(name, "")
    if raw == "":
        return switch.default
    if raw not in ("0", "1"):
        raise ValueError(f"environment variable {name}={raw!r}: use 0 or 1 (unset: {int(switch.default)}); "
                         f"{switch.does}")
    return raw == "1"


def kernel_switches() -> dict[str, dict]:
    """``{name: {"value", "default", "read"}}`` of the kernel switches, as the environment sets them
    now (a switch read at import keeps the value it had then: see ``read``)."""
    return {s.name: {"value": value(s.name), "default": s.default, "read": s.read}
            for s in SWITCHES.values() if s.scope == "kernels"}
