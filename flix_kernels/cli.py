"""The ``flix-kernels`` command (also ``python -m flix_kernels``) and :func:`info`."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path


def info() -> dict:
    """Versions, the device, which backends can run here (and why not), how "auto" chooses, the
    CUDA extension's build (status, target archs, CUDA runtime, compiler) and the Triton settings."""
    import torch

    import flix_kernels
    from flix_kernels import cuda as cuda_bridge
    from flix_kernels.backends import AUTO_TABLE, BACKENDS, triton_backend, unavailable_reason

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {
        "flix_kernels": flix_kernels.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        "backends": {b: unavailable_reason(b, device) for b in BACKENDS},
        "auto": {cls: list(order) for cls, order in AUTO_TABLE.items()},
        "cuda_extension": {
            "loaded": cuda_bridge._C is not None,
            "error": cuda_bridge.extension_error(),
            "install": cuda_bridge.build_status(),
            "build": cuda_bridge.build_info(),
        },
    }
    if triton_backend.launch is not None:
        launch = triton_backend.launch
        out["triton_settings"] = {"fuse_base (FLIX_FUSE_BASE)": triton_backend.FUSE_BASE,
                                  "autotune (FLIX_TRITON_AUTOTUNE)": launch.AUTOTUNE,
                                  "interpreter (TRITON_INTERPRET)": launch.interpreting()}
    return out


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
    if "triton_settings" in d:
        print("triton settings: " + ", ".join(f"{k} {'on' if v else 'off'}" for k, v in d["triton_settings"].items()))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flix-kernels", description="FLix kernels: tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, which backends are available (and why not), CUDA build")
    b = sub.add_parser("bench", help="time FLix layers against base F.linear, plain PyTorch, PEFT LoRA and more")
    b.add_argument("--quick", action="store_true", help="short runs and fewer shapes (under two minutes on a CPU)")
    b.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    b.add_argument("--shapes", choices=("headline", "decode", "sweep", "all"), nargs="+", default=None,
                   help="shape sets (default: all; headline and decode with --quick)")
    b.add_argument("--out", type=Path, default=None, help="output folder (default: ./flix-bench-<device>)")
    b.add_argument("--compile", dest="compile_torch", action="store_true", default=None,
                   help="also time torch.compile of the torch backend (default on CUDA)")
    b.add_argument("--no-compile", dest="compile_torch", action="store_false")
    b.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end training step")
    b.add_argument("--backends", nargs="+", choices=("torch", "triton", "cuda"), default=None,
                   help="our backends to time (default: every available one)")
    b.add_argument("--rep-ms", type=float, default=None,
                   help="milliseconds each timing runs (default: GPU 200, CPU 400; --quick: 60 / 100)")
    b.add_argument("--no-progress", dest="progress", action="store_false")
    d = sub.add_parser("demo", help="zero-shot composition experiment: FLix vs LoRA on held-out (language, task) pairs")
    d.add_argument("--quick", action="store_true", help="2 seeds, shorter training (under 5 minutes on 2 CPU cores)")
    d.add_argument("--smoke", action="store_true", help="seconds; a tiny model and a few steps (CI), numbers mean nothing")
    d.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default: 4, --quick 2, --smoke 1)")
    d.add_argument("--out", type=Path, default=Path("flix-demo"), help="output folder (default: ./flix-demo)")
    d.add_argument("--device", default=None, help="cpu (default) or cuda")
    d.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _print_info()
    if args.command == "bench":
        return _bench(args)
    if args.command == "demo":
        return _demo(args)
    return 2


def _bench(args) -> int:
    import torch

    from flix_kernels.backends import unavailable_reason
    from flix_kernels.bench import SHAPE_SETS, Config, bench

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("flix-kernels bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device.type == "cpu":
        why = {b: unavailable_reason(b, "cpu") for b in ("triton", "cuda")}
        print("CPU run: timing the torch backend and the plain-PyTorch/PEFT variants; "
              + "; ".join(f"{b} is not timed ({r})" for b, r in why.items() if r))
    shapes = args.shapes or (["headline", "decode"] if args.quick else ["all"])
    shapes = SHAPE_SETS if "all" in shapes else tuple(shapes)
    backends = args.backends
    if backends:
        bad = {b: unavailable_reason(b, device) for b in backends if unavailable_reason(b, device)}
        if bad:
            print("flix-kernels bench: " + "; ".join(f"backend {b} is unavailable: {r}" for b, r in bad.items()),
                  file=sys.stderr)
            return 2
    out = args.out or Path(f"flix-bench-{device.type}")
    cfg = Config(device=device, shapes=shapes, quick=args.quick, compile_torch=args.compile_torch, e2e=args.e2e,
                 backends=backends, rep_ms=args.rep_ms)
    record = bench(cfg, out, show_progress=args.progress)
    if record["failures"]:
        print(f"flix-kernels bench: {len(record['failures'])} failure(s), see above", file=sys.stderr)
        return 1
    return 0


def _demo(args) -> int:
    import torch

    try:
        import transformers  # noqa: F401
    except ImportError:
        print("flix-kernels demo needs transformers (pip install transformers)", file=sys.stderr)
        return 2
    from flix_kernels.demo import DemoConfig, run

    if args.quick and args.smoke:
        print("flix-kernels demo: choose one of --quick and --smoke", file=sys.stderr)
        return 2
    device = args.device or "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("flix-kernels demo: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    cfg = DemoConfig.smoke() if args.smoke else DemoConfig.quick() if args.quick else DemoConfig.default()
    cfg.device = device
    if args.seeds is not None:
        if args.seeds < 1:
            print("flix-kernels demo: --seeds must be at least 1", file=sys.stderr)
            return 2
        cfg = cfg.with_seeds(args.seeds)
    run(cfg, args.out, show_progress=args.progress, console=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
