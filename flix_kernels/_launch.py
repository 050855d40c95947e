"""What every kernel launcher shares, at the bottom of the import graph: the decode shape class,
the device's SM count, power-of-two sizes, and the one door every kernel launch goes through.

The door (:func:`launch_triton`, :func:`call_extension`) lets ``flix-kernels bench --overhead``
count the launches of a layer and skip them, so that it times exactly the Python path a GPU
run takes on any machine (see :func:`recording`). Outside a recording it costs one global
lookup per launch, and a look at the kernel's class (under Triton's interpreter it refuses
bfloat16 tensors, see :data:`INTERPRETER_BF16`).
"""

from __future__ import annotations

import contextlib
import enum
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

__all__ = ["DECODE_TOKENS", "INTERPRETER_BF16", "ExpandMode", "Launch", "LaunchRecord", "call_extension", "cdiv",
           "launch_triton", "next_pow2", "num_sms", "recording"]

# Token counts up to this are the decode shape class (launch plans and "auto" pick by it).
DECODE_TOKENS = 64


class ExpandMode(enum.IntEnum):
    """What an expand launch (both kernel families) does with its output Y, given the update
    ``U = drop(H M_S)``: WRITE ``Y = U``; ACCUMULATE ``Y += U`` (cuBLAS wrote the base into Y);
    FUSED_BASE ``Y = X2 W2^T + bias + U``, the base GEMM in the same tile (Triton only). The
    Triton kernel takes it as its ``MODE`` constexpr."""

    WRITE = 0
    ACCUMULATE = 1
    FUSED_BASE = 2


_SM_COUNT: dict[int, int] = {}

# Triton's interpreter (TRITON_INTERPRET=1) computes a bfloat16 tl.dot wrongly (errors of ~1e10,
# triton-lang/triton issue 11584), so bfloat16 is refused there: by the backend's ``supports``
# and by :func:`launch_triton` for direct launcher users.
INTERPRETER_BF16 = ("Triton's interpreter (TRITON_INTERPRET=1), which computes bfloat16 tl.dot wrongly "
                    "(triton-lang/triton issue 11584): cast to float16 or float32, or run on a CUDA GPU "
                    "without TRITON_INTERPRET")
# The class of a kernel that @triton.jit made under TRITON_INTERPRET=1 lives here: a kernel runs in
# the interpreter when it was built there, whatever the variable says at launch.
_INTERPRETER_MODULE = "triton.runtime.interpreter"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the interpreter's small grids)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host ints (``triton.cdiv`` is a constexpr function, several times dearer)."""
    return -(-a // b)


def next_pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """The smallest power of two >= ``n`` (and >= ``lo``), capped at ``hi``."""
    v = max(lo, 1 << max(int(n) - 1, 0).bit_length())
    return v if hi is None else min(v, hi)


@dataclass
class Launch:
    """One recorded launch: ``fn`` (the Triton kernel or the extension function), its grid
    (Triton) and arguments; :meth:`replay` launches it again on the same arguments."""

    backend: str
    fn: object
    grid: tuple | None
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.fn.__name__

    def replay(self) -> None:
        if self.grid is None:
            self.fn(*self.args, **self.kwargs)
        else:
            self.fn[self.grid](*self.args, **self.kwargs)


class LaunchRecord:
    """Launches seen during a :func:`recording`: ``counts[(backend, kernel)]``; with
    ``run=False`` none of them ran (their outputs hold whatever the allocator gave). With
    ``keep=True`` also ``launches``, every :class:`Launch` in order (the bench replays and times
    each on its own; the ahead-of-time checks compile each launched specialization)."""

    def __init__(self, run: bool, keep: bool = False):
        self.run, self.keep = run, keep
        self.counts: Counter = Counter()
        self.launches: list[Launch] = []

    @property
    def total(self) -> int:
        return sum(self.counts.values())


_RECORD: LaunchRecord | None = None


@contextlib.contextmanager
def recording(run: bool = False, keep: bool = False) -> Iterator[LaunchRecord]:
    """Count every kernel launch of the FLix ops in this block; ``run=False`` skips them;
    ``keep=True`` keeps a replay of each (see :class:`LaunchRecord`)."""
    global _RECORD
    saved, _RECORD = _RECORD, LaunchRecord(run, keep)
    try:
        yield _RECORD
    finally:
        _RECORD = saved


def launch_triton(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``: every Triton launch of the package goes through here."""
    rec = _RECORD
    if rec is not None:
        rec.counts[("triton", kernel.__name__)] += 1
        if rec.keep:
            rec.launches.append(Launch("triton", kernel, tuple(grid), args, kwargs))
        if not rec.run:
            return
    if type(kernel).__module__ == _INTERPRETER_MODULE:  # the dtype scan only when interpreting
        _refuse_interpreted_bf16(kernel, args, kwargs)
    kernel[grid](*args, **kwargs)


def _refuse_interpreted_bf16(kernel, args, kwargs) -> None:
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(repr(k), a) for k, a in kwargs.items()]
    for name, a in named:
        if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16:
            raise TypeError(f"{kernel.__name__}: {name} is a torch.bfloat16 tensor, which cannot run in "
                            f"{INTERPRETER_BF16} (or use the FLix ops with backend='torch')")


def call_extension(fn: Callable, *args, **kwargs) -> None:
    """``fn(*args, **kwargs)`` for a launch function of the CUDA extension (same rules as
    :func:`launch_triton`)."""
    rec = _RECORD
    if rec is not None:
        rec.counts[("cuda", fn.__name__)] += 1
        if rec.keep:
            rec.launches.append(Launch("cuda", fn, None, args, kwargs))
        if not rec.run:
            return
    fn(*args, **kwargs)
