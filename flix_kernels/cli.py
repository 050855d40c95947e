"""The ``flix-kernels`` command (also ``python -m flix_kernels``)."""

from __future__ import annotations

import argparse
import platform
import sys


def _info() -> int:
    import torch

    import flix_kernels
    from flix_kernels.backends import BACKENDS, unavailable_reason

    print(f"flix_kernels {flix_kernels.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name})")
    for b in BACKENDS:
        reason = unavailable_reason(b, device)
        print(f"  backend {b:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    from flix_kernels.backends import triton_backend

    if triton_backend.launch is not None:
        launch = triton_backend.launch
        print(f"triton settings: fused base GEMM {'on' if triton_backend.FUSE_BASE else 'off'} (FLIX_FUSE_BASE), "
              f"autotune {'on' if launch.AUTOTUNE else 'off'} (FLIX_TRITON_AUTOTUNE), "
              f"interpreter {'on' if launch.interpreting() else 'off'} (TRITON_INTERPRET)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flix-kernels", description="FLix kernels: tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and which backends are available (and why not)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    return 2


if __name__ == "__main__":
    sys.exit(main())
