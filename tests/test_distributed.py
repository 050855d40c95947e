"""FLix under torch.distributed on CPU (gloo), 2 and 4 processes: DDP, FSDP2 (fully_shard) and
tensor parallelism (flix_kernels.distributed) against single-process runs. The checks run in
the spawned ranks (tests/distributed_workers.py, launched by tests/distributed_launch.py); a
failing rank fails the test with its exit code or signal, traceback and output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distributed_launch as launch
import distributed_workers as workers

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_and_fsdp2_match_single_process(world, tmp_path, seed):
    launch.run(workers.data_parallel, world, tmp_path, seed, str(tmp_path))


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_matches_unsharded(world, tmp_path, seed):
    launch.run(workers.tensor_parallel, world, tmp_path, seed, str(tmp_path))


def test_torchrun_example(tmp_path):
    """The README's torchrun command (examples/distributed_train.py) in each mode, 2 processes."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for mode in ("ddp", "fsdp", "tp"):
        out = tmp_path / mode
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(root / "examples" / "distributed_train.py"), "--mode", mode, "--steps", "3", "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, f"{mode}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        assert (out / "flix_adapters.safetensors").is_file() and "loss" in proc.stdout


def test_batch_without_features_still_gives_zero_gradients(backend):
    """DDP reduces every trainable parameter each step: a rank whose batch routes no feature
    must still produce (zero) adapter gradients, on every backend."""
    from conftest import DEVICE

    import flix_kernels as fk

    space = fk.FeatureSpace({"language": ["en", "fr"], "task": ["a"]}, 2)
    layer = fk.FLixLinear(6, 5, space, backend=backend).to(DEVICE)
    routing = fk.Routing([[-1, -1], [-1, -1]], space)
    layer(torch.randn(2, 3, 6, device=DEVICE), routing=routing).sum().backward()
    for p in (layer.lora_A, layer.lora_B):
        assert p.grad is not None and p.grad.abs().sum() == 0
