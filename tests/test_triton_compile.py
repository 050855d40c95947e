"""Compile every Triton kernel variant for real GPUs (sm_80, sm_90) without a GPU.

The interpreter runs the kernels' Python semantics but not Triton's compiler, which rejects
things the interpreter accepts (loop-carried type changes, unsupported control flow, shared
memory overflows). ``triton.compile`` with an explicit target runs the whole pipeline down to
a cubin with the ptxas that ships with Triton, so CI catches those too. Shared memory per
variant is printed (``-s``).

The test suite runs the kernels in the interpreter on CPU machines (``TRITON_INTERPRET=1`` is
set before flix_kernels is imported), so the compile runs in a subprocess without it:
``python tests/test_triton_compile.py ARCH [--every]`` compiles a representative set of variants
for ``sm_ARCH`` (with ``--every``, as ``FLIX_LONG_TESTS=1`` runs it: every variant).
"""

import os
import subprocess
import sys

import pytest

ARCHS = [80, 90]
# Tensor dtypes of the check: (activations and base weight, adapters, whether fp32 dots may use tf32);
# "bf16+fp32": fp32 adapters on a bf16 model (adapter_dtype=torch.float32).
SASS_DTYPES = {"bf16": ("bfloat16", "bfloat16", False), "fp32": ("float32", "float32", False),
               "tf32": ("float32", "float32", True), "bf16+fp32": ("bfloat16", "float32", False)}


@pytest.fixture(scope="module")
def compiles(tmp_path_factory):
    """Every compile subprocess of this module, started together (the machine's cores compile in
    parallel): ``{"80" | "90" | "sass bf16" | ...: (Popen, output file)}``, each read by its test."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    logs = tmp_path_factory.mktemp("compiles")
    from conftest import LONG_TESTS  # here, not at the top: this file also runs as the compile script

    jobs = {}
    every = ["--every"] if LONG_TESTS else []  # the exhaustive compile of every variant: long mode
    for job in [str(a) for a in ARCHS] + [f"sass {d}" for d in SASS_DTYPES]:
        out = open(logs / job.replace(" ", "_"), "w+")  # a file, not a pipe: no job blocks on a full pipe
        argv = job.split() + (every if job.isdigit() else [])
        jobs[job] = (subprocess.Popen([sys.executable, __file__, *argv], env=env, stdout=out,
                                      stderr=subprocess.STDOUT, text=True), out)
    yield jobs
    for proc, out in jobs.values():
        proc.kill()
        proc.wait()
        out.close()


def _finished(job) -> str:
    proc, out = job
    # About 30 ptxas compiles per job: minutes with a cold Triton cache on a slow 2-core machine.
    proc.wait(timeout=2700)
    out.seek(0)
    text = out.read()
    if proc.returncode == 77:
        pytest.skip(text.strip().splitlines()[-1])
    assert proc.returncode == 0, text[-6000:]
    return text


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_variant_compiles_for(arch, compiles):
    print(_finished(compiles[str(arch)])[-4000:])


@pytest.mark.parametrize("dtype", list(SASS_DTYPES))
def test_gemm_kernels_fit_hopper(dtype, compiles):
    """Each GEMM-class kernel, as launched at the headline shape on sm_90 with ``dtype`` tensors,
    fits the block's shared memory, stores nothing to local memory (no register spills), uses
    warpgroup MMA (HGMMA) where its dots can (not IEEE fp32, which Hopper's tensor cores do not
    compute), and the TMA kernels load through the Tensor Memory Accelerator (UTMALDG), except
    the known failures."""
    import json

    out = _finished(compiles[f"sass {dtype}"])
    rows = [json.loads(line[5:]) for line in out.splitlines() if line.startswith("SASS ")]
    kernels = {r["name"].split()[0] for r in rows}
    assert kernels == GEMM_KERNELS, out[-3000:]
    for r in rows:
        print(r)
    failing = {r["name"] for r in sass_failures(rows, dtype)}
    known = {n for n in SASS_KNOWN_FAILURES if n.startswith(dtype + " ")}
    assert failing - known == set(), f"new failures: {sorted(failing - known)}"
    assert known - failing == set(), f"now passing, remove from SASS_KNOWN_FAILURES: {sorted(known - failing)}"


# ---- the subprocess ----------------------------------------------------------------------


POINTER_DTYPES = {
    "X": "bf16", "M": "bf16", "Y": "bf16", "X2": "bf16", "W2": "bf16", "bias": "bf16", "R": "bf16", "G": "bf16",
    "H": "fp32", "L": "fp32", "WS": "fp32", "scaling": "fp32", "seed_ptr": "i64", "OUT": "i8",
    "L0": "fp32", "R0": "bf16", "G0": "bf16", "L1": "fp32", "R1": "bf16", "G1": "bf16", "DY": "bf16", "Mb": "bf16",
}
INDEX_POINTERS = {"slot_rank", "slot_feature", "cu_ptr", "pair_example", "pair_slot", "pair_feature",
                  "feature_rank", "feature_pair_start", "rank_offsets"}
FLOAT_SCALARS = {"scale_const", "p_drop"}
# TMA descriptor arguments (block shapes of a 128 x 128 x 64 tile, W stored (N, K)).
DESCRIPTORS = {"X2_desc": "tensordesc<bf16[128, 64]>", "W2_desc": "tensordesc<bf16[128, 64]>",
               "Y_desc": "tensordesc<bf16[128, 128]>"}


def _compile(fn, constexprs: dict, arch: int, num_warps: int = 4):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n in DESCRIPTORS:
            sig[n] = DESCRIPTORS[n]
        elif n in POINTER_DTYPES:
            sig[n] = "*" + POINTER_DTYPES[n]
        elif n in INDEX_POINTERS:
            sig[n] = "*i32"
        elif n in FLOAT_SCALARS:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    try:
        src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    except TypeError:  # Triton 3.2 spells it `constants`
        src = ASTSource(fn, sig, constants=constexprs)
    target = GPUTarget("cuda", arch, 32)
    try:
        return triton.compile(src, target=target, options=dict(num_warps=num_warps))
    except RuntimeError as exc:
        if "ptxas" in str(exc) and "not found" in str(exc).lower():
            print(f"no ptxas for an ahead-of-time compile: {exc}")
            sys.exit(77)
        raise


def _report(name, ck):
    print(f"{name}: shared memory {ck.metadata.shared} bytes")


def compile_shrink(arch, packed, dropout, tl):
    for cdt in (tl.bfloat16, tl.float32):
        ck = _compile(_kernels().shrink_kernel, dict(
            IS_PACKED=packed, SEARCH_STEPS=4, HAS_SCALE_TENSOR=True, HAS_DROPOUT=dropout, COMPUTE_DTYPE=cdt,
            PRECISION="ieee", BLOCK_T=64, BLOCK_R=32, BLOCK_K=64), arch)
        _report(f"shrink sm_{arch} packed={packed} dropout={dropout} {cdt}", ck)


def compile_expand(arch, mode, packed, tl):
    for dropout in (False, True):
        ck = _compile(_kernels().expand_kernel, dict(
            MODE=mode, HAS_BIAS=mode == 2, IS_PACKED=packed, SEARCH_STEPS=4, HAS_DROPOUT=dropout,
            COMPUTE_DTYPE=tl.bfloat16, BASE_DTYPE=tl.bfloat16, PRECISION="ieee", BASE_PRECISION="ieee",
            BLOCK_T=64, BLOCK_N=64, BLOCK_R=32, BLOCK_K=64, GROUP_T=8), arch)
        _report(f"expand sm_{arch} mode={mode} packed={packed} dropout={dropout}", ck)


def compile_fused_tma(arch, packed, tl):
    """The persistent TMA fused base GEMM (Hopper and later only)."""
    for dropout in (False, True):
        ck = _compile(_kernels().fused_linear_tma_kernel, dict(
            W_ROWS_ARE_N=True, HAS_BIAS=True, IS_PACKED=packed, SEARCH_STEPS=4, HAS_DROPOUT=dropout,
            COMPUTE_DTYPE=tl.bfloat16, PRECISION="ieee", BASE_PRECISION="ieee", OUT_DTYPE=tl.bfloat16, BLOCK_T=128,
            BLOCK_N=128, BLOCK_R=32, BLOCK_K=64, GROUP_T=8, NUM_PROGRAMS=132), arch, num_warps=8)
        _report(f"fused_linear_tma sm_{arch} packed={packed} dropout={dropout}", ck)


def compile_weight_gradient_kernels(arch, packed, tl):
    for dropout in (False, True):
        common = dict(IS_PACKED=packed, HAS_DROPOUT=dropout, COMPUTE_DTYPE=tl.bfloat16, PRECISION="ieee",
                      BLOCK_T=64, BLOCK_N=64)
        _report(f"rank_grad sm_{arch} packed={packed} dropout={dropout}",
                _compile(_kernels().rank_grad_kernel, dict(common, BLOCK_RK=32), arch))
        _report(f"rank_grad_pair sm_{arch} packed={packed} dropout={dropout}",
                _compile(_kernels().rank_grad_pair_kernel, dict(common, BLOCK_RK=32), arch))
        for slots in (16, 128):
            _report(f"example_outer slots={slots} sm_{arch} packed={packed} dropout={dropout}",
                    _compile(_kernels().example_outer_kernel, dict(common, BLOCK_S=slots), arch))
    for slots, tokens in ((32, 256), (64, 128), (128, 64)):
        _report(f"dy_pass slots={slots} sm_{arch} packed={packed}", _compile(_kernels().dy_pass_kernel, dict(
            IS_PACKED=packed, HAS_SCALE_TENSOR=True, COMPUTE_DTYPE=tl.bfloat16, PRECISION="ieee", BLOCK_T=tokens,
            BLOCK_S=slots, BLOCK_N=64), arch, num_warps=8))
    _report(f"rank_reduce sm_{arch} packed={packed}",
            _compile(_kernels().rank_reduce_kernel, dict(IS_PACKED=packed, BLOCK_RK=32, BLOCK_N=64), arch))


def _kernels():
    """The kernels of every family, by name."""
    import types

    from flix_kernels.triton import common, expand, shrink, weight_grad

    return types.SimpleNamespace(**{n: getattr(m, n) for m in (common, expand, shrink, weight_grad)
                                    for n in dir(m) if n.endswith("_kernel")})


# ---- Hopper instruction and spill check (sm_90 SASS, read with the cuobjdump Triton carries) ----
# Every launch of a headline layer's forward and backward (B = 8 x 1024 tokens, 4096 -> 4096,
# bf16, rank 16, 2 or 4 active features, dropout, cuBLAS and fused base), as the Triton backend
# launches it on an H100/H200 (132 SMs): recorded through the launch door with the launches
# skipped, then compiled for exactly the specialization a launch would get (16-byte aligned
# pointers, integers divisible by 16, integers equal to 1 as constants).
GEMM_KERNELS = {"shrink_kernel", "expand_kernel", "rank_grad_kernel", "rank_grad_pair_kernel", "example_outer_kernel",
                "fused_linear_tma_kernel", "dy_pass_kernel"}
# Kernels that must move their operands with the Tensor Memory Accelerator (UTMALDG loads).
TMA_KERNELS = {"fused_linear_tma_kernel"}
# Variants that fail the check today, each with what it shows; the test also fails when one of
# them starts passing, so the list stays true.
SASS_KNOWN_FAILURES: dict[str, str] = {}
# Shared memory a block may opt into on sm_90 (cudaDevAttrMaxSharedMemoryPerBlockOptin on an H100/H200).
SM90_SHARED_BYTES = 232448


def sass_failures(rows: list[dict], dtype: str) -> list[dict]:
    """The rows that break a rule of :func:`test_gemm_kernels_fit_hopper` (names prefixed ``dtype``)."""
    mma = SASS_DTYPES[dtype][1] != "float32" or SASS_DTYPES[dtype][2]
    return [dict(r, name=f"{dtype} {r['name']}") for r in rows
            if r["spill_stores"] > 0 or r["shared"] > SM90_SHARED_BYTES or (mma and r["hgmma"] == 0)
            or (r["name"].split()[0] in TMA_KERNELS and r["tma_loads"] == 0)]
_TYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32", "torch.int32": "i32",
          "torch.int64": "i64", "torch.int8": "i8"}


def _skip_dense_gemms():
    """A dispatch mode under which dense GEMMs return an empty result of their shape: only the
    launches are recorded, but the cuBLAS half of the path (``F.linear``, ``dy @ W``, ``dy^T x``)
    would still run on the CPU at the headline shape, where torch's bf16 GEMM is a scalar loop
    (over 30 minutes on 2 cores)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class SkipDenseGemms(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                a, b = args[-2], args[-1]
                return torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)
            return func(*args, **(kwargs or {}))

    return SkipDenseGemms()


def headline_launches(active: int, examples: int = 8, seq_len: int = 1024, dtype: str = "bf16"):
    """The :class:`flix_kernels._launch.Launch` list of a headline-width forward+backward (and of
    a backward that needs dA alone), every tensor in ``dtype`` (a key of :data:`SASS_DTYPES`)."""
    import torch

    import flix_kernels as fk
    from flix_kernels import _launch
    from flix_kernels.backends import triton_backend
    from flix_kernels.triton import shrink, weight_grad

    shrink.num_sms = weight_grad.num_sms = lambda device: 132  # an H100/H200, without asking a GPU
    gen = torch.Generator().manual_seed(0)
    per = 64 // active
    space = fk.FeatureSpace({f"g{g}": [f"f{g * per + i}" for i in range(per)] for g in range(active)}, 16)
    ids = torch.stack([torch.randint(g * per, (g + 1) * per, (examples,), generator=gen) for g in range(active)], 1)
    routing = fk.Routing(ids, space)
    meta = routing.layer_metadata(torch.device("cpu"), (examples, seq_len))
    bf, adapter_dtype, tf32 = SASS_DTYPES[dtype]
    bf, adapter_dtype, T = getattr(torch, bf), getattr(torch, adapter_dtype), examples * seq_len
    torch.backends.cuda.matmul.allow_tf32 = tf32  # fp32 dots in tf32 or IEEE fp32
    x, dy = torch.empty(T, 4096, dtype=bf), torch.empty(T, 4096, dtype=bf)
    W = torch.empty(4096, 4096, dtype=bf)
    A = torch.empty(space.total_rank, 4096, dtype=adapter_dtype)
    B = torch.empty(4096, space.total_rank, dtype=adapter_dtype)
    seed = torch.zeros(1, dtype=torch.int64)
    ops = triton_backend.ops
    overrides = triton_backend.launch.OVERRIDES
    with _launch.recording(run=False, keep=True) as rec, _skip_dense_gemms():
        for fuse, tma in ((False, False), (True, False), (True, True)):
            if tma:  # the fused base GEMM as on Hopper: TMA descriptors, one program per SM
                overrides["expand"] = dict(TMA=True, PROGRAMS=132)
            try:
                y, h = ops.forward(x, W, None, A, B, None, seed, meta, 0.5, 0.1, fuse)
                ops.backward(meta, dy, x, W, A, B, h, None, seed, 0.5, 0.1, fuse, True, True, True)
            finally:
                overrides.pop("expand", None)
        ops.backward(meta, dy, x, W, A, B, h, None, seed, 0.5, 0.1, False, True, True, False)
    return rec.launches


def specialization(launch) -> tuple[dict, dict, dict, dict]:
    """``(signature, constexprs, attrs, options)`` of ``launch`` for ``ASTSource`` / ``compile``."""
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.tools.tensor_descriptor import TensorDescriptor

    fn = launch.fn
    names = fn.arg_names
    consts = {p.name for p in fn.params if p.is_constexpr}
    bound = dict(zip(names, launch.args))
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    bound.update({k: v for k, v in launch.kwargs.items() if k not in options})
    sig, constexprs, attrs = {}, {}, {}
    for i, n in enumerate(names):
        v = bound[n]
        if n in consts:
            sig[n], constexprs[(i,)] = "constexpr", v
        elif isinstance(v, TensorDescriptor):  # "tensordesc<dtype[block]>", as the JIT names it
            sig[n] = native_specialize_impl(BaseBackend, v, False, True, True)[0]
        elif torch.is_tensor(v):
            sig[n] = "*" + _TYPES[str(v.dtype)]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[n] = "fp32"
        elif v == 1:
            sig[n], constexprs[(i,)] = "constexpr", 1
        else:
            sig[n] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs, options


def sass_facts(cubin: bytes) -> dict:
    """``{"hgmma": n, "spill_stores": n, "registers": n}`` from a cubin's SASS and resource usage."""
    import re
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        print(f"no cuobjdump in this Triton ({tool})")
        sys.exit(77)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    return {"hgmma": len(re.findall(r"\bHGMMA\b", sass)), "spill_stores": len(re.findall(r"\bSTL\b", sass)),
            "tma_loads": len(re.findall(r"\bUTMALDG\b", sass)),
            "registers": int(regs.group(1)) if regs else -1}


def sass_main(dtype: str) -> int:
    import json

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seen = set()
    # The headline, and decode (8 examples x 8 tokens), where only the weight gradients have
    # 64-row tiles (the shrink and expand take 16-token tiles: memory-bound, no warpgroup MMA).
    # And 128 slots in the one-pass dy kernel (2 examples, so its workspace fits in fp32 too).
    for active, examples, seq_len, kernels in ((2, 8, 1024, GEMM_KERNELS), (4, 8, 1024, GEMM_KERNELS),
                                               (2, 8, 8, {"rank_grad_kernel", "rank_grad_pair_kernel"}),
                                               (8, 2, 1024, {"dy_pass_kernel"})):
        for launch in headline_launches(active, examples, seq_len, dtype):
            if launch.name not in kernels:
                continue
            sig, constexprs, attrs, options = specialization(launch)
            key = (launch.name, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in constexprs.items())),
                   tuple(sorted(attrs)), tuple(sorted(options.items())))
            if key in seen:
                continue
            seen.add(key)
            ck = triton.compile(ASTSource(launch.fn, sig, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32), options=options)
            tags = {k: launch.kwargs[k] for k in ("MODE", "W_ROWS_ARE_N", "HAS_DROPOUT", "BLOCK_R", "BLOCK_S", "BLOCK_RK",
                                                  "BLOCK_T")
                    if k in launch.kwargs}
            name = f"{launch.name} T={examples * seq_len} slots={16 * active} " + " ".join(
                f"{k}={v}" for k, v in tags.items())
            print("SASS " + json.dumps({"name": name, "shared": ck.metadata.shared, **sass_facts(ck.asm["cubin"])}))
    return 0


def main(arch: int, every: bool) -> int:
    """Compile the kernel variants for sm_ARCH: every one (``every``: the long mode), else one
    representative set, the packed layout's (the harder example search), every family and mode."""
    try:
        import triton.language as tl
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        print(f"this Triton has no ahead-of-time compile API: {exc}")
        return 77
    import triton

    print(f"triton {triton.__version__}, sm_{arch}, {'every variant' if every else 'representative variants'}")
    for packed in (False, True) if every else (True,):
        for dropout in (False, True):
            compile_shrink(arch, packed, dropout, tl)
        for mode in (0, 1, 2):
            compile_expand(arch, mode, packed, tl)
        if arch >= 90:
            compile_fused_tma(arch, packed, tl)
        compile_weight_gradient_kernels(arch, packed, tl)
    return 0


if __name__ == "__main__":
    sys.exit(sass_main(sys.argv[2]) if sys.argv[1] == "sass" else main(int(sys.argv[1]), "--every" in sys.argv))
