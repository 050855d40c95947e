"""The ``flix-kernels`` command (also ``python -m flix_kernels``)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ._info import info
from .bench.variants import COMPARED_VARIANTS
from .demo import VARIABLE as DEMO_VARIABLE
from .demo.experiment import DATA as DEMO_DATA, LABELS as DEMO_METHODS, METHODS as DEFAULT_DEMO_METHODS


def _print_info() -> int:
    d = info()
    print(f"flix_kernels {d['flix_kernels']}")
    print(f"python {d['python']}, torch {d['torch']} (CUDA {d['torch_cuda']}), triton {d['triton'] or 'not installed'}")
    print(f"device: {d['device']} ({d['device_name']})")
    for b, reason in d["backends"].items():
        print(f"  backend {b:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    print("auto on CUDA: " + ", ".join(f"{cls} -> {' > '.join(order)}" for cls, order in d["auto"].items()))
    ext = d["cuda_extension"]
    if ext["loaded"]:
        b = ext["build"]
        print(f"CUDA extension: loaded; archs {b.get('archs')}, CUDA runtime {b.get('cuda_runtime')} (static), "
              f"{b.get('compiler')} ({b.get('flags')}), driver {b.get('driver') or 'none'}")
    else:
        print(f"CUDA extension: not loaded: {ext['error']}")
    print("switches: " + ", ".join(f"{k}={int(v)}" for k, v in d["switches"].items())
          + " (the README's 'Environment variables' says what each does)")
    if "triton_interpreter" in d:
        print(f"triton interpreter (TRITON_INTERPRET): {'on' if d['triton_interpreter'] else 'off'}")
    return 0


INFO = ("show versions, the device, which backends can run here (and why not), how backend 'auto' chooses, "
        "the CUDA extension's build and the FLIX_* kernel switches")
BENCH = ("time FLix layers against base F.linear, the per-feature loop, PEFT LoRA and more, each checked against "
         "float64 first; writes results.json, results.md and plots (CPU timings are smoke tests, not results)")
DEMO = ("zero-shot composition experiment: FLix vs LoRA on held-out (language, task) pairs of real languages' "
        "number words (or a synthetic benchmark), over seeds; writes results.json, results.md and curves.png")
BENCH_QUICK = "1 to 2 min on 2 CPU cores"
DEMO_QUICK = "about 1.5 min on 2 CPU cores"


def device_arg(spec: str):
    """argparse type: cpu, cuda or cuda:N that can run here."""
    from flix_kernels.bench.timing import resolve_device

    try:
        return resolve_device(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_arg(kind):
    """argparse type: a positive finite ``kind`` (int or float)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive {'integer' if kind is int else 'number'}, "
                                             f"got {text!r}")
        return value

    return parse


def _writable_folder(path: Path) -> str | None:
    """None when ``path`` is a folder this process can write files into (created if missing),
    else why not. Checked before a long run, so it cannot fail at the end for want of a folder."""
    if path.exists() and not path.is_dir():
        return "exists and is not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot be created ({e.strerror or e})"
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".flix-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"is not writable ({e.strerror or e})"
    return None


def check_out_folder(parser: argparse.ArgumentParser, path: Path) -> None:
    """``parser.error`` (exit 2) unless ``path`` is a folder the run can write its outputs into."""
    why = _writable_folder(path)
    if why:
        parser.error(f"argument --out: {str(path)!r} {why}; give a folder that can be created and written")


def build_parser() -> argparse.ArgumentParser:
    """The ``flix-kernels`` parser: ``info``, ``bench`` and ``demo``, every option described."""
    parser = argparse.ArgumentParser(prog="flix-kernels", description="FLix kernels: inspect the install (info), "
                                     "benchmark the layers (bench), run the zero-shot composition experiment (demo)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,bench,demo}")
    i = sub.add_parser("info", help=INFO, description=INFO[0].upper() + INFO[1:] + ".")
    i.set_defaults(handler=lambda args: _print_info(), parser=i)

    b = sub.add_parser("bench", help=BENCH, description=BENCH[0].upper() + BENCH[1:] + ".")
    b.set_defaults(handler=_bench, parser=b)
    b.add_argument("--quick", action="store_true",
                   help=f"fewer shapes and shorter timings ({BENCH_QUICK}; a smoke test on a CPU)")
    b.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)")
    b.add_argument("--shapes", choices=("headline", "decode", "sweep", "all"), nargs="+", default=None,
                   help="shape sets to time (default: all; headline and decode with --quick)")
    b.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output folder, created if missing and checked writable before the run "
                        "(default: ./flix-bench-<device>)")
    b.add_argument("--compile", dest="compile_torch", action="store_true", default=None,
                   help="also time torch.compile of the torch backend (default on CUDA)")
    b.add_argument("--no-compile", dest="compile_torch", action="store_false",
                   help="do not time torch.compile (default on a CPU)")
    b.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end training step")
    b.add_argument("--overhead", action="store_true",
                   help="the host-overhead mode alone (host time and launches per layer call at tiny shapes, "
                        "kernel launches recorded and skipped, and a host-bound training step; part of --quick)")
    b.add_argument("--serving", action="store_true",
                   help="the serving mode alone (a decode step of a stack of FLix layers for 1 to 64 requests, each "
                        "with its own feature set, against the base layers and PEFT's mixed-adapter inference; "
                        "part of --quick)")
    b.add_argument("--quantized", action="store_true",
                   help="the quantized-base mode alone (a training step over a bitsandbytes NF4 base against the "
                        "full-precision base and PEFT LoRA over NF4: step time, stored bytes, peak GPU memory; needs "
                        "the quant extra; part of --quick)")
    b.add_argument("--e2e-only", action="store_true",
                   help="the end-to-end training steps alone (the 110M Llama; on a GPU also the GPU-bound slice)")
    b.add_argument("--compare", nargs="*", choices=tuple(COMPARED_VARIANTS), default=None, metavar="VARIANT",
                   help="the variants to time beside base F.linear and ours: "
                        f"{', '.join(COMPARED_VARIANTS)} (default: all; none after --compare: base and ours alone)")
    b.add_argument("--backends", nargs="+", choices=("torch", "triton", "cuda"), default=None,
                   help="our backends to time (default: every one available on the device)")
    b.add_argument("--rep-ms", type=positive_arg(float), default=None, metavar="MS",
                   help="milliseconds each timing runs, > 0 (default: GPU 200, CPU 400; --quick: 60 / 100)")
    b.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress line (for logs and CI); when stdout is not a terminal there is none anyway, "
                        "and one line per finished case is printed")

    d = sub.add_parser("demo", help=DEMO, description=DEMO[0].upper() + DEMO[1:] + ".")
    d.set_defaults(handler=_demo, parser=d)
    preset = d.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help=f"a short, undertrained smoke run of the pipeline: 2 seeds, fewer steps ({DEMO_QUICK}); "
                             "its accuracies are not the experiment's result")
    preset.add_argument("--smoke", action="store_true",
                        help="seconds; a tiny model and a few steps (CI), numbers mean nothing")
    d.add_argument("--seeds", type=positive_arg(int), default=None, metavar="N",
                   help="number of seeds 0..N-1, at least 1 (default: 4, --quick 2, --smoke 1)")
    d.add_argument("--data", choices=tuple(DEMO_DATA), default="numbers",
                   help="the benchmark: numbers (default; real languages: numbers 0..99 and their words from "
                        "num2words in en, de, fr, es, pl, id; tasks spell / read / next / ordinal) or synthetic "
                        "(four isomorphic made-up languages, sequence tasks)")
    d.add_argument("--methods", nargs="+", choices=tuple(DEMO_METHODS), default=None, metavar="METHOD",
                   help="the methods to train (default: " + " ".join(DEFAULT_DEMO_METHODS) + "; also flix_fair, FLix "
                        "with flix_kernels.per_feature_optimizer); choices: " + ", ".join(DEMO_METHODS))
    d.add_argument("--vary", action="append", default=[], metavar="[METHOD:]FIELD=VALUE[,FIELD=VALUE...]",
                   help="also run every method (or only METHOD, which need not be in --methods) with these fields "
                        "changed, on the same frozen bases (repeat for more variants; a list of languages is written "
                        "a+b; e.g. flix:lora_scale=1, lr=0.001, flix_fair:rare_languages=pl+id); fields: "
                        + ", ".join(DEMO_VARIABLE))
    d.add_argument("--seen-only", action="store_true",
                   help="evaluate seen pairs only (held-out pairs are neither evaluated nor stored): for choosing "
                        "hyper-parameters before any held-out number is looked at")
    d.add_argument("--out", type=Path, default=Path("flix-demo"), metavar="DIR",
                   help="output folder, created if missing and checked writable before the run (default: ./flix-demo)")
    d.add_argument("--device", type=device_arg, default=None, help="cpu (default), cuda or cuda:N")
    d.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (for logs and CI); when stdout is not a terminal there is none anyway, "
                        "and one line per finished pretraining or run is printed")
    return parser


def main(argv=None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code: 0, 1 for
    a run that found failures, 2 for bad arguments (one ``error:`` line naming the value)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.handler(args)
    except SystemExit as e:  # argparse's errors (2) and --help (0), returned like every other outcome
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BrokenPipeError:  # the reader went away (`flix-kernels info | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 1


def _on_terminal() -> bool:
    """Whether stdout is a terminal (else a file or a pipe: a log)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def _bench(args) -> int:
    import torch

    from flix_kernels.backends import available_backends, unavailable_reason
    from flix_kernels.bench import SHAPE_SETS, Config, bench
    from flix_kernels.bench.report import CPU_CAVEAT

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = args.backends
    for name in backends or ():
        why = unavailable_reason(name, device)
        if why:
            args.parser.error(f"argument --backends: backend {name!r} is unavailable on {device}: {why}; "
                              f"available here: {', '.join(available_backends(device))}")
    out = args.out or Path(f"flix-bench-{device.type}")
    check_out_folder(args.parser, out)
    only_modes = (args.overhead or args.serving or args.quantized or args.e2e_only) and not args.quick \
        and args.shapes is None
    if device.type == "cpu" and not only_modes:
        why = {b: unavailable_reason(b, "cpu") for b in ("triton", "cuda")}
        print("CPU run: timing the torch backend and the plain-PyTorch/PEFT variants; "
              + "; ".join(f"{b} is not timed ({r})" for b, r in why.items() if r) + ". " + CPU_CAVEAT)
    shapes = args.shapes or ([] if only_modes else ["headline", "decode"] if args.quick else ["all"])
    shapes = SHAPE_SETS if "all" in shapes else tuple(shapes)
    compare = None if args.compare is None else tuple(args.compare)
    cfg = Config(device=device, shapes=shapes, quick=args.quick, compile_torch=args.compile_torch,
                 e2e=args.e2e_only or (args.e2e and not only_modes), compare=compare,
                 overhead=args.overhead or args.quick, serving=args.serving or args.quick,
                 quantized=args.quantized or args.quick, backends=backends, rep_ms=args.rep_ms)
    # A live progress line shows nothing in a file until the end: a log gets a line per case.
    record = bench(cfg, out, show_progress=args.progress, case_lines=not _on_terminal())
    if record["failures"]:
        print(f"flix-kernels bench: {len(record['failures'])} failure(s), see above", file=sys.stderr)
        return 1
    return 0


def _demo(args) -> int:
    try:
        import transformers  # noqa: F401
    except ImportError:
        args.parser.error("the demo needs transformers (pip install transformers)")
    if args.data == "numbers":
        try:
            import num2words  # noqa: F401
        except ImportError:
            args.parser.error("--data numbers (the default) needs num2words: pip install 'flix_kernels[demo]' "
                              "(or run --data synthetic)")
    from flix_kernels.demo import DemoConfig, check_variants, run

    preset = DemoConfig.smoke if args.smoke else DemoConfig.quick if args.quick else DemoConfig.default
    cfg = preset(data=args.data)
    cfg.device = str(args.device or "cpu")
    if args.seeds is not None:
        cfg = cfg.with_seeds(args.seeds)
    if args.methods:
        cfg.methods = tuple(dict.fromkeys(args.methods))
    cfg.vary, cfg.held_out_eval = tuple(dict.fromkeys(args.vary)), not args.seen_only
    try:
        check_variants(cfg)
    except ValueError as e:
        args.parser.error(f"argument --vary: {e}")
    check_out_folder(args.parser, args.out)
    run(cfg, args.out, show_progress=args.progress, console=True, case_lines=not _on_terminal())
    return 0


if __name__ == "__main__":
    sys.exit(main())
