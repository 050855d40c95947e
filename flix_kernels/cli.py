"""The ``flix-kernels`` command (also ``python -m flix_kernels``) and :func:`info`."""

from __future__ import annotations

import argparse
import platform
import sys


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
    args = parser.parse_args(argv)
    if args.command == "info":
        return _print_info()
    return 2


if __name__ == "__main__":
    sys.exit(main())
