"""Cases and launch-plan controls shared by the kernel-backend tests (test_kernel_backends.py
runs them for "triton" and "cuda"; test_triton_backend.py and test_cuda_backend.py reuse them)."""

import contextlib

import torch

import flix_kernels as fk
from conftest import DEVICE, random_adapters, random_feature_ids
from flix_kernels.backends import cuda_backend, kernel_ops, torch_backend, triton_backend

# Launch plans that exercise every path on tiny shapes: small tiles (token tiles straddling
# examples), K split over several blocks, weight gradients split over token chunks.
SMALL_PATHS = {
    "triton": {
        "shrink": dict(BLOCK_T=16, BLOCK_R=16, BLOCK_K=16, splits=3),
        "expand": dict(BLOCK_T=16, BLOCK_N=16, BLOCK_R=16, BLOCK_K=16, GROUP_T=3),  # partial tile groups
        "weight_grad": dict(BLOCK_T=16, BLOCK_N=16, BLOCK_S_MAX=16, target_programs=10**6, force_split=True),
        "dy_pass": dict(BLOCK_T=16, BLOCK_N=16, target_programs=10**6, min_tokens=0),  # g and dB in one pass
    },
    "cuda": {"tile": 0, "splits": 3, "grad_path": "split", "chunk": 16},
}
# The fused base GEMM through TMA descriptors on a persistent grid of 5 programs (fewer than
# the tiles, so each walks several), with SMALL_PATHS' other plans.
FUSED_TMA_PATHS = {**SMALL_PATHS["triton"], "expand": dict(SMALL_PATHS["triton"]["expand"], TMA=True, PROGRAMS=5)}
# Each weight-gradient path, forced ("owner" and "split" for dB too: the one-pass path off).
GRAD_PATHS = {
    "triton": {"owner": {"weight_grad": dict(BLOCK_T=16, BLOCK_N=16, force_owner=True), "dy_pass": dict(off=True)},
               "split": {"weight_grad": dict(BLOCK_T=16, BLOCK_N=16, BLOCK_S_MAX=16, target_programs=10**6,
                                            force_split=True), "dy_pass": dict(off=True)},
               # g and dB from one read of dy, with one column split and with several
               "dy_pass": {"dy_pass": dict(BLOCK_T=16, BLOCK_N=16, target_programs=1, min_tokens=0)},
               "dy_pass_splits": {"dy_pass": dict(BLOCK_T=16, BLOCK_N=16, target_programs=10**6, min_tokens=0)}},
    "cuda": {"owner": {"grad_path": "owner"}, "split": {"grad_path": "split", "chunk": 16}},
}


def _overrides(backend: str) -> dict:
    if backend == "triton":
        return triton_backend.launch.OVERRIDES
    return cuda_backend.launch.OVERRIDES


@contextlib.contextmanager
def forced_paths(backend: str, overrides=None, fuse_base=None):
    """Force launch plans of ``backend`` (default: :data:`SMALL_PATHS`); ``{}`` keeps the defaults.
    ``fuse_base`` (Triton only) turns the fused base GEMM on or off."""
    table = _overrides(backend)
    old = dict(table), triton_backend.FUSE_BASE
    table.clear()
    table.update(SMALL_PATHS[backend] if overrides is None else overrides)
    if fuse_base is not None:
        triton_backend.FUSE_BASE = fuse_base
    try:
        yield
    finally:
        table.clear()
        table.update(old[0])
        triton_backend.FUSE_BASE = old[1]


def keep_mask(backend: str, seed: int, T: int, K: int, p: float) -> torch.Tensor:
    """The (T, K) dropout keep-mask ``backend`` uses when the ops get the generator
    ``torch.Generator(DEVICE).manual_seed(seed)``, computed by that backend's own code (the
    kernels turn one drawn seed into Philox bits; "torch" draws the mask from the generator)."""
    gen = torch.Generator(DEVICE).manual_seed(seed)
    if backend == "torch":
        return torch_backend.dropout_mask((T, K), p, gen, DEVICE)
    seed_t = kernel_ops.draw_seed(DEVICE, gen)
    if backend == "triton":
        return triton_backend.launch.keep_mask(seed_t, T, K, p)
    return cuda_backend.launch.keep_mask(int(seed_t), T, K, p).to(DEVICE)


def _case(gen, space, B, token_shape, in_f, out_f, dtype, *, p_absent=0.25, cu=None, ids=None, lora_dtype=None):
    """A routing and random inputs on DEVICE: ``(routing, ids, x, lora_A, lora_B)``."""
    ids = random_feature_ids(space, B, gen, p_absent) if ids is None else torch.as_tensor(ids)
    A, Bm = random_adapters(space, in_f, out_f, gen, lora_dtype or dtype)
    x = torch.randn(*token_shape, in_f, generator=gen, dtype=torch.float64).to(dtype)
    routing = fk.Routing(ids, space, cu_seqlens=cu)
    return routing, ids, x.to(DEVICE), A.to(DEVICE), Bm.to(DEVICE)


def _base(gen, in_f, out_f, dtype, trainable=False):
    """A random base weight and bias on DEVICE."""
    W = (torch.randn(out_f, in_f, generator=gen, dtype=torch.float64) / in_f**0.5).to(dtype).to(DEVICE)
    b = torch.randn(out_f, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    return W.requires_grad_(trainable), b.requires_grad_(trainable)


def _space():
    return fk.FeatureSpace({"language": ["en", "fr", "sw", "yo", "hi"], "task": ["qa", "mt", "sum"]},
                           {"language": 5, "task": 3})
