"""What this installation has and can do: :func:`info` (printed by ``flix-kernels info``)."""

from __future__ import annotations

import platform


def info() -> dict:
    """Versions, the device, which backends can run here (and why not), how "auto" chooses, the
    CUDA extension's build (status, target archs, CUDA runtime, compiler), the kernel switches
    (:mod:`flix_kernels.settings`) and whether Triton runs in its interpreter."""
    import torch

    import flix_kernels
    from flix_kernels import cuda as cuda_bridge, settings
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
    out["switches"] = {name: s["value"] for name, s in settings.kernel_switches().items()}
    if triton_backend.launch is not None:
        out["triton_interpreter"] = triton_backend.launch.interpreting()
    return out
