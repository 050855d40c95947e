"""The CUDA bridge: the extension ``flix_kernels._C`` (kernels in ``csrc/``, built by setup.py
with CMake when nvcc is found) and why it cannot run when it cannot.

The extension does not use PyTorch's C++ API: :mod:`flix_kernels.cuda.launch` validates the
tensors and passes device pointers, sizes, strides and the current CUDA stream, so one build
works with any torch version. See ``csrc/flix.h`` for the kernels' interface.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Optional

import torch

try:
    from .. import _C

    _LOAD_ERROR: Optional[str] = None
    if not hasattr(_C, "TILES"):  # built from older sources: its kernels may not match this Python side
        _C, _LOAD_ERROR = None, "it was built from an older checkout (it does not report its TILES)"
except ImportError as exc:  # not built (no nvcc at install time, FLIX_CUDA=0) or not loadable
    _C = None
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["MIN_CAPABILITY", "build_info", "build_status", "extension_error", "host_path_only", "host_path_timing",
           "unavailable_reason"]

# WMMA on bf16 and the kernels' shared-memory tiles need Ampere or newer.
MIN_CAPABILITY = (8, 0)
_BUILD_FILE = Path(__file__).resolve().parent.parent / "_build.json"
_DEVICE_REASON: dict = {}  # device index (or "no_torch_cuda") -> reason or None; fixed per process
_HOST_PATH_ONLY = False


@contextlib.contextmanager
def host_path_only() -> Iterator:
    """Time the "cuda" backend's Python path on any machine: inside this block the backend accepts
    CPU tensors and every launch is recorded and skipped (:func:`flix_kernels._launch.recording`),
    so the calls do all their host work (validation, plans, packing, allocations) and no kernel
    runs. Outputs hold whatever the allocator gave. Yields the launch record."""
    global _HOST_PATH_ONLY
    from .._launch import recording

    if _C is None:
        raise RuntimeError(f"flix_kernels.cuda.host_path_only needs the extension: {extension_error()}")
    saved, _HOST_PATH_ONLY = _HOST_PATH_ONLY, True
    try:
        with recording(run=False) as rec:
            yield rec
    finally:
        _HOST_PATH_ONLY = saved


def host_path_timing() -> bool:
    """Whether a :func:`host_path_only` block is active."""
    return _HOST_PATH_ONLY


def build_status() -> dict:
    """What setup.py recorded: ``cuda_extension`` ("built", "skipped" or "failed"), ``reason``,
    ``archs``, ``nvcc``; empty when the package was not installed through setup.py."""
    try:
        return json.loads(_BUILD_FILE.read_text())
    except (OSError, ValueError):
        return {}


def extension_error() -> Optional[str]:
    """Why ``flix_kernels._C`` is not loaded (None when it is)."""
    if _C is not None:
        return None
    status = build_status()
    if status.get("cuda_extension") in ("skipped", "failed"):
        return f"the CUDA extension flix_kernels._C was {status['reason']}"
    return ("the CUDA extension flix_kernels._C is not importable "
            f"({_LOAD_ERROR}); reinstall with nvcc on PATH (FLIX_CUDA=1 pip install -v . shows the build)")


def build_info() -> dict:
    """Build facts of the loaded extension (target archs, CUDA runtime, compiler, driver)."""
    return {} if _C is None else dict(_C.build_info())


def unavailable_reason(device=None) -> Optional[str]:
    """Why the CUDA kernels cannot run on ``device`` (default: the current CUDA device); None
    when they can."""
    if _C is None:
        return extension_error()
    dev = torch.device(device) if device is not None else None
    if _HOST_PATH_ONLY and (dev is None or dev.type == "cpu"):
        return None
    if not torch.cuda.is_available():
        if "no_torch_cuda" not in _DEVICE_REASON:  # asked once: the answer does not change in a process
            count, why = _C.device_count()
            here = (f"no CUDA device is usable here ({why or 'none found'})" if count == 0 else
                    "this torch build has no CUDA support, so it cannot hand CUDA tensors to the kernels")
            _DEVICE_REASON["no_torch_cuda"] = f"the CUDA kernels need a CUDA device; {here}"
        return _DEVICE_REASON["no_torch_cuda"]
    if dev is not None and dev.type != "cuda":
        return f"the CUDA kernels need a CUDA device, got {dev}"
    index = dev.index if dev is not None and dev.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_REASON:
        cap = torch.cuda.get_device_capability(index)
        _DEVICE_REASON[index] = None if cap >= MIN_CAPABILITY else (
            f"the CUDA kernels need compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer; "
            f"cuda:{index} is {cap[0]}.{cap[1]}")
    return _DEVICE_REASON[index]
