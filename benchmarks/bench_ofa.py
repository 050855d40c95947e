"""OFA's factorized embedding (``flix_kernels.ofa``) against what a user would otherwise run.

Lookup ``out = P[ids] Q`` (P: V x k coordinates, Q: k x D primitive), forward and
forward+backward, on the same ids and tables:
  embedding    ``F.embedding(ids, E)`` on the materialised V x D table (the unfactorised model:
               its gradient is a dense V x D tensor);
  materialize  ``F.embedding(ids, P @ Q)``: factorised parameters, table rebuilt every step;
  torch        ``F.embedding(ids, P) @ Q`` (backend "torch": a T x k intermediate in memory);
  triton       the fused kernel (backend "triton");
  torch, checked ids   the default call (backend "auto" = torch, ``check_ids=True``): the cost
               of the id range check, a host sync per call.
torch and triton run with ``check_ids=False``, as ``F.embedding`` does no host-side check.
Tied output head ``hidden E^T`` against ``(hidden Q^T) P^T`` (``tied_logits``).

Every variant is checked against the same computation in float64 (output and every gradient,
relative Frobenius error) before it is timed. Ids follow a Zipf law over the vocabulary (as
token frequencies do; many repeats, so long runs in the deterministic dP sum) or are uniform.
Each timing is reported against its floor: max(FLOPs / measured matmul rate, bytes / measured
copy bandwidth), the bytes being the tensors that must be read or written at least once.

    python benchmarks/bench_ofa.py [--smoke] [--out DIR]      # GPU: DIR/ofa.json + ofa.md
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.results_files import write_results  # noqa: E402
from flix_kernels.backends import unavailable_reason  # noqa: E402
from flix_kernels.bench.timing import Timer, floor_ms, measured_peaks, peak_memory_mib, provenance  # noqa: E402
from flix_kernels.ofa.kernel import factorized_embedding, tied_logits  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    V: int  # vocabulary
    D: int  # hidden size
    k: int  # latent (coordinate) size
    T: int  # tokens
    ids: str = "zipf"  # "zipf" | "uniform"


# XLM-R large extended to OFA's 401k-subword vocabulary (the paper's setting: D 1024, k 100..400),
# and a Llama-3-sized table (128k x 4096).
GPU_CASES = [
    Case("ofa-xlmr k100", 401_145, 1024, 100, 16384),
    Case("ofa-xlmr k400", 401_145, 1024, 400, 16384),
    Case("ofa-xlmr k400 uniform", 401_145, 1024, 400, 16384, "uniform"),
    Case("llama3 k256", 128_256, 4096, 256, 16384),
    Case("llama3 k1024", 128_256, 4096, 1024, 16384),
]
GPU_HEAD_CASES = [Case("head ofa-xlmr k400", 401_145, 1024, 400, 4096), Case("head llama3 k1024", 128_256, 4096, 1024, 4096)]
SMOKE_CASES = [Case("smoke", 300, 48, 8, 97)]
SMOKE_HEAD_CASES = [Case("head smoke", 300, 48, 8, 33)]
LOOKUP_VARIANTS = ("embedding", "materialize", "torch", "triton", "torch, checked ids")
HEAD_VARIANTS = ("dense", "factorized")
MAX_REL_ERR = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def make_ids(case: Case, device, gen: torch.Generator) -> torch.Tensor:
    if case.ids == "uniform":
        return torch.randint(0, case.V, (case.T,), generator=gen).to(device)
    weights = torch.arange(1, case.V + 1, dtype=torch.float64) ** -1.1
    ranks = torch.multinomial(weights, case.T, replacement=True, generator=gen)
    return torch.randperm(case.V, generator=gen)[ranks].to(device)  # frequent ids spread over the table


def make_tables(case: Case, device, gen: torch.Generator):
    """float64 P (V x k), Q (k x D) with O(1) table entries, on ``device``."""
    P = torch.randn(case.V, case.k, generator=gen, dtype=torch.float64)
    Q = torch.randn(case.k, case.D, generator=gen, dtype=torch.float64) / case.k ** 0.5
    return P.to(device), Q.to(device)


def lookup_fn(variant: str, ids, high_precision: bool = False):
    """``fn(*leaves) -> out`` and how to build the leaves from (P, Q)."""
    if variant == "embedding":
        return (lambda E: F.embedding(ids, E)), (lambda P, Q: (P @ Q,))
    if variant == "materialize":
        return (lambda P, Q: F.embedding(ids, P @ Q)), (lambda P, Q: (P, Q))
    if variant == "torch, checked ids":
        return (lambda P, Q: factorized_embedding(ids, P, Q)), (lambda P, Q: (P, Q))
    backend = "torch" if high_precision else variant
    return (lambda P, Q: factorized_embedding(ids, P, Q, backend=backend, check_ids=False)), (lambda P, Q: (P, Q))


def head_fn(variant: str):
    if variant == "dense":
        return (lambda h, E: h @ E.t()), (lambda h, P, Q: (h, P @ Q))
    return (lambda h, P, Q: tied_logits(h, P, Q)), (lambda h, P, Q: (h, P, Q))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def check(fn, oracle_fn, leaves, leaves64, gout, dtype) -> dict:
    """Output and all gradients of ``fn`` against ``oracle_fn`` in float64; raises if off."""
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    leaves64 = [t.detach().requires_grad_(True) for t in leaves64]
    out = fn(*leaves)
    got = [out, *torch.autograd.grad(out, leaves, gout.to(dtype))]
    ref = oracle_fn(*leaves64)
    want = [ref, *torch.autograd.grad(ref, leaves64, gout)]
    errs = {name: rel_err(g, w) for name, g, w in zip(["out"] + [f"grad{i}" for i in range(len(leaves))], got, want)}
    if not all(e <= MAX_REL_ERR[dtype] for e in errs.values()):  # a NaN fails too
        raise AssertionError(f"wrong result: relative errors {errs} exceed {MAX_REL_ERR[dtype]:g}")
    return errs


def time_modes(fn, leaves, gout, timer: Timer, device) -> dict:
    leaves = [t.detach().requires_grad_(True) for t in leaves]

    def forward():
        with torch.no_grad():
            return fn(*leaves)

    def forward_backward():
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, gout)

    return {"forward": timer.time(forward), "forward+backward": timer.time(forward_backward),
            "peak_MiB_forward+backward": peak_memory_mib(forward_backward, device)}


def lookup_floors(c: Case, variant: str, esize: int, peaks: dict) -> dict:
    """Floors (ms) of one variant: the FLOPs it must do at least, the bytes any lookup must move."""
    out_bytes = c.T * c.D * esize
    if variant == "embedding":  # read rows + write out; backward: read dout, write the dense V x D grad
        fwd = (0.0, 2 * out_bytes)
        bwd = (0.0, out_bytes + c.V * c.D * esize)
    else:  # factorised: write out (gathered rows and Q are small next to it); backward: read dout, write dP
        fwd = (2 * c.T * c.k * c.D, out_bytes + c.T * c.k * esize + c.k * c.D * esize)
        bwd = (4 * c.T * c.k * c.D, out_bytes + c.V * c.k * esize + c.k * c.D * esize)
        if variant == "materialize":  # and E = P Q: 2 V k D FLOPs each way, V x D written and read
            fwd = (fwd[0] + 2 * c.V * c.k * c.D, fwd[1] + c.V * c.D * esize)
            bwd = (bwd[0] + 4 * c.V * c.k * c.D, bwd[1] + 2 * c.V * c.D * esize)
    return {"forward": floor_ms(fwd[0], fwd[1], peaks),
            "forward+backward": floor_ms(fwd[0] + bwd[0], fwd[1] + bwd[1], peaks)}


def head_floors(c: Case, variant: str, esize: int, peaks: dict) -> dict:
    logits = c.T * c.V * esize
    if variant == "dense":
        fwd_flops = 2 * c.T * c.D * c.V
        bwd_bytes = logits + c.V * c.D * esize
    else:
        fwd_flops = 2 * c.T * c.k * (c.D + c.V)
        bwd_bytes = logits + c.V * c.k * esize
    return {"forward": floor_ms(fwd_flops, logits, peaks),
            "forward+backward": floor_ms(3 * fwd_flops, 2 * logits + bwd_bytes, peaks)}


def run(cases, head_cases, device, dtype, rep_ms: float, seed: int) -> dict:
    timer = Timer(device, rep_ms)
    peaks = measured_peaks(device, dtype, timer)
    esize = torch.finfo(dtype).bits // 8
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for c in cases:
        ids = make_ids(c, device, gen)
        P64, Q64 = make_tables(c, device, gen)
        gout = torch.randn(c.T, c.D, generator=gen, dtype=torch.float64).to(device)
        P, Q = P64.to(dtype), Q64.to(dtype)
        distinct = int(torch.unique(ids).numel())
        for v in LOOKUP_VARIANTS:
            if v == "triton" and unavailable_reason("triton", device) is not None:
                continue
            fn, leaves_of = lookup_fn(v, ids)
            oracle, _ = lookup_fn(v, ids, high_precision=True)
            # the oracle of every variant starts from the rounded tables the variant itself gets
            errs = check(fn, oracle, leaves_of(P, Q), leaves_of(P.double(), Q.double()), gout, dtype)
            timing = time_modes(fn, leaves_of(P, Q), gout.to(dtype), timer, device)
            rows.append({"problem": "lookup", "case": asdict(c), "distinct_ids": distinct, "variant": v,
                         "rel_err": errs, "floor_ms": lookup_floors(c, v, esize, peaks), **timing})
        del P64, Q64, P, Q, gout
    for c in head_cases:
        P64, Q64 = make_tables(c, device, gen)
        h64 = torch.randn(c.T, c.D, generator=gen, dtype=torch.float64).to(device)
        P, Q, h = P64.to(dtype), Q64.to(dtype), h64.to(dtype)
        n_check = min(c.T, 256)  # float64 logits of all T rows would not fit; the same GEMMs on fewer rows
        gcheck = torch.randn(n_check, c.V, generator=gen, dtype=torch.float64).to(device)
        gout = torch.randn(c.T, c.V, generator=gen, dtype=torch.float32).to(device).to(dtype)
        for v in HEAD_VARIANTS:
            fn, leaves_of = head_fn(v)
            errs = check(fn, fn, leaves_of(h[:n_check], P, Q), leaves_of(h[:n_check].double(), P.double(), Q.double()),
                         gcheck, dtype)
            timing = time_modes(fn, leaves_of(h, P, Q), gout, timer, device)
            rows.append({"problem": "tied head", "case": asdict(c), "variant": v, "rel_err": errs,
                         "checked_rows": n_check, "floor_ms": head_floors(c, v, esize, peaks), **timing})
        del gout
    return {**provenance(device), "dtype": str(dtype).replace("torch.", ""), "seed": seed, "peaks": peaks,
            "rows": rows}


def markdown(record: dict) -> str:
    p = record["peaks"]
    lines = [f"# OFA factorized embedding: {record['device']['name']}, {record['dtype']}", "",
             f"commit `{record['commit']}`, torch {record['versions']['torch']}, triton {record['versions']['triton']}, "
             f"{record['date']}. Measured peaks: matmul {p['matmul_tflops']:.0f} TFLOP/s ({p['matmul_dtype']}), "
             f"copy {p['copy_GBps']:.0f} GB/s. Median of "
             f"{'`triton.testing.do_bench` (L2 flushed)' if record['device']['type'] == 'cuda' else 'a host clock'}; "
             "x floor = time / floor. Every row passed a float64 check first (worst relative error shown).", ""]
    for problem in ("lookup", "tied head"):
        rows = [r for r in record["rows"] if r["problem"] == problem]
        if not rows:
            continue
        lines += [f"## {problem}", "",
                  "| case | V | D | k | T | ids | variant | fwd ms | x floor | fwd+bwd ms | x floor | peak MiB | rel err |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            c = r["case"]
            f, fb = r["forward"]["median_ms"], r["forward+backward"]["median_ms"]
            peak = r["peak_MiB_forward+backward"]
            lines.append(
                f"| {c['name']} | {c['V']} | {c['D']} | {c['k']} | {c['T']} | {c['ids'] if problem == 'lookup' else '-'} "
                f"| {r['variant']} | {f:.3f} | {f / r['floor_ms']['forward']:.1f} | {fb:.3f} "
                f"| {fb / r['floor_ms']['forward+backward']:.1f} | {'-' if peak is None else f'{peak:.0f}'} "
                f"| {max(r['rel_err'].values()):.1e} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, interpreter): checks that the script runs")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for ofa.json and ofa.md")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    dtype = getattr(torch, args.dtype) if not (smoke and device.type != "cuda") else torch.float32
    record = run(SMOKE_CASES if smoke else GPU_CASES, SMOKE_HEAD_CASES if smoke else GPU_HEAD_CASES, device, dtype,
                 5.0 if smoke else args.rep_ms, args.seed)
    md = markdown(record)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_results(args.out, {"ofa.json": record, "ofa.md": md})
    return record


if __name__ == "__main__":
    main()
