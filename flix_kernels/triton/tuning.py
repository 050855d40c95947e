"""What the Triton launchers share on the host: dtypes and precision, the overrides and
autotuning of launch configurations, and the memo of launch plans.

Every grid is computed from tensor shapes and host ints that the routing fixed when it was
built, never from device values, so a launch needs no host-device synchronisation and can be
captured in a CUDA graph. Each kernel family (:mod:`.shrink`, :mod:`.expand`,
:mod:`.weight_grad`) chooses its block sizes per shape class (decode: at most 64 tokens;
prefill/training otherwise) in its own ``config``; ``OVERRIDES[kind]`` replaces any of them
(tests use it to force K splits, token chunks and small tiles).

Autotuning (``FLIX_TRITON_AUTOTUNE=1``): the first launch of each kernel for a *shape class*
(decode or not, and the power-of-two buckets of tokens, N, K and R, the dtype and the mode)
times the family's candidate configurations around the default on scratch outputs and keeps
the fastest for the process. Off by default so that a first call never waits on tuning; it is
skipped during CUDA-graph capture.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import OrderedDict

import torch
import triton.language as tl

from .. import settings

# Test/tuning hook: {"shrink": {...}, "expand": {...}, "weight_grad": {...}} entries override the configs.
OVERRIDES: dict[str, dict] = {}
AUTOTUNE = settings.value("FLIX_TRITON_AUTOTUNE")
_TUNED: dict[tuple, dict] = {}


def autotuning() -> bool:
    """Whether autotuning is on (read at every launch: tests switch it)."""
    return AUTOTUNE


DOT_MIN = 16  # tl.dot's smallest block dimension: block sizes are powers of two from here

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_unavailable_reason() -> str | None:
    """Why Triton's interpreter cannot run the kernels here: before Triton 3.7 it converts
    one-element arrays to Python scalars in a way NumPy 2.4 removed, so every kernel fails
    ("only 0-dimensional arrays can be converted to Python scalars")."""
    import numpy
    import triton

    def version(text: str) -> tuple[int, int]:
        major, minor = (text.split(".") + ["0"])[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) fails under NumPy "
                f"{numpy.__version__} (NumPy 2.4 removed a conversion it uses): install 'numpy<2.4' or Triton >= 3.7")
    return None


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul setting (tf32 only when torch allows it)."""
    # The getter behind torch.backends.cuda.matmul.allow_tf32, without its Python __getattr__.
    if dtype is torch.float32 and torch._C._get_cublas_allow_tf32():
        return "tf32"
    return "ieee"


def dot_kind(dtype: torch.dtype) -> str:
    """What a dot of ``dtype`` operands costs in registers and shared memory, which launch
    configurations size their tiles by: "16-bit" (bf16/fp16 on the tensor cores), "tf32"
    (fp32 operands, tensor cores), "ieee" (fp32 by FMA: the operand tiles live in registers)."""
    return "16-bit" if dtype.itemsize == 2 else precision(dtype)


def finish(kind: str, cfg: dict, device: torch.device) -> dict:
    """``cfg`` with the tests' ``OVERRIDES[kind]`` applied (and no warps in the interpreter,
    which has none to vary; ahead-of-time checks off a GPU keep them)."""
    cfg.update(OVERRIDES.get(kind, {}))
    if device.type != "cuda" and interpreting():
        cfg.pop("num_warps", None)
    return cfg


def unique(configs: list[dict]) -> list[dict]:
    """Candidate configurations without repeats (and without warps in the interpreter)."""
    if "num_warps" not in configs[0]:
        configs = [{k: v for k, v in c.items() if k != "num_warps"} for c in configs]
    seen, out = set(), []
    for c in configs:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=25)
    start = time.perf_counter()  # interpreter: only the tuning logic is exercised
    fn()
    return (time.perf_counter() - start) * 1e3


def tuned(kind: str, cfg: dict, candidates, key: tuple, run, device: torch.device) -> dict:
    """``cfg``, or with autotuning on, the fastest of ``candidates(cfg)`` for this shape class.

    ``run(cfg)`` launches the kernel on scratch outputs (it must not change real results)."""
    if not AUTOTUNE or OVERRIDES.get(kind) or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return cfg
    key = (kind, device.type) + key
    if key not in _TUNED:
        best, best_ms = cfg, float("inf")
        for cand in unique(candidates(cfg)):
            try:
                ms = _time_ms(lambda: run(cand), device)
            except Exception:  # e.g. a tile that needs more shared memory than the device has
                continue
            if ms < best_ms:
                best, best_ms = cand, ms
        _TUNED[key] = best
    return _TUNED[key]


def tuned_configs() -> list[dict]:
    """What autotuning chose in this process, JSON-ready: ``{"kind", "shape_class", "config"}``
    per shape class (kind "choice": the fused base GEMM or cuBLAS + expand)."""
    return [{"kind": key[0], "shape_class": [str(k) for k in key[1:]], "config": cfg}
            for key, cfg in _TUNED.items()]


def choose(key: tuple, options: dict, device: torch.device) -> str:
    """With autotuning on, the fastest of ``options`` (name -> side-effect-free callable) for
    this shape class, timed once per process; else the first option. An option that fails to
    launch (say a tile over the device's shared memory) is left out with a warning; if every
    option fails, the first one's error is raised."""
    if not AUTOTUNE or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return next(iter(options))
    key = ("choice", device.type) + key
    if key not in _TUNED:
        times, errors = {}, {}
        for name, fn in options.items():
            try:
                times[name] = _time_ms(fn, device)
            except Exception as exc:
                errors[name] = exc
        if not times:
            raise next(iter(errors.values()))
        for name, exc in errors.items():
            warnings.warn(f"autotuning {key}: option {name!r} failed and is not used "
                          f"({type(exc).__name__}: {exc})", RuntimeWarning, stacklevel=2)
        _TUNED[key] = min(times, key=times.get)
    return _TUNED[key]


def search_steps(num_examples: int) -> int:
    """Binary-lifting steps to find a token's example among ``num_examples`` (constexpr)."""
    return max(1, (max(num_examples, 1) - 1).bit_length())


def launch_opts(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")}


def blocks(cfg: dict, *names: str) -> dict:
    return {k: cfg[k] for k in names}


# Launch plans of every family by everything they depend on (shapes, flags, dtypes, the
# precision setting and the tests' OVERRIDES), so a repeated call only assembles its arguments.
# Read with PLANS.get (a plain dict lookup) on every launch; mutate in place, never rebind (the
# families import the object).
PLANS: OrderedDict[tuple, tuple] = OrderedDict()
MAX_PLANS = 4096  # bound for batch shapes that keep changing


def remember(key: tuple, plan: tuple) -> tuple:
    """Memoise ``plan``; past MAX_PLANS the oldest plans go first (O(1) each), so a full memo
    is not emptied at once and every layer's current plan rebuilt together."""
    PLANS[key] = plan
    while len(PLANS) > MAX_PLANS:
        PLANS.popitem(last=False)
    return plan


def overrides_key(kind: str) -> tuple:
    o = OVERRIDES.get(kind)
    return tuple(sorted(o.items())) if o else ()


def or_(t, fallback):
    """A dummy pointer for an absent optional tensor (the kernel never reads it)."""
    return fallback if t is None else t
