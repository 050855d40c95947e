"""The launcher of the distributed tests (tests/distributed_launch.py): a rank whose checks pass
exits 0 even when native threads still touch Python at its end, and a rank that fails, dies of
a signal or hangs is reported with what it left (exit code or signal, traceback, output, stacks)
instead of aborting, hiding or hanging the test. The rank functions are at module level: the
spawned ranks import this module to find them."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest
import torch
import torch.distributed as dist

import distributed_launch as launch

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# Process groups kept alive past the rank function, as DTensor and the device mesh keep the
# real tests' groups (so destroy_process_group cannot join gloo's worker threads).
_KEPT_GROUPS: list = []


def _torch_ops_forever() -> None:
    a = torch.ones(256)
    while True:
        a + a  # each op leaves and re-enters the GIL from C++


def native_threads_in_python_at_exit(rank: int, world: int) -> None:
    """What killed ranks with SIGABRT at interpreter exit, made certain: a collective still in
    flight when rank 0 returns (its peer joins late), whose completion runs a Python callback on
    gloo's worker thread; and a daemon thread whose torch ops re-enter the GIL from C++."""
    _KEPT_GROUPS.append(dist.group.WORLD)
    t = torch.ones(64)
    if rank == 0:
        work = dist.all_reduce(t, async_op=True)
        work.get_future().then(lambda fut: fut.value())
        threading.Thread(target=_torch_ops_forever, daemon=True).start()
    else:
        time.sleep(1.0)  # rank 0 has returned by now
        dist.all_reduce(t)
        assert t.eq(world).all()


def test_native_threads_in_python_at_exit_do_not_abort_a_rank(tmp_path):
    launch.run(native_threads_in_python_at_exit, 2, tmp_path)


def _sleep_forever() -> None:
    time.sleep(3600)


def fail_abort_and_hang(rank: int, world: int) -> None:
    """Rank 0 fails a check, rank 1 dies of SIGABRT, rank 2 never returns."""
    if rank == 0:
        raise AssertionError("rank 0 check failed: 42 != 43")
    if rank == 1:
        print("rank 1 about to abort", flush=True)
        os.abort()
    _sleep_forever()


def test_failed_aborted_and_hung_ranks_are_each_reported(tmp_path):
    start = time.monotonic()
    with pytest.raises(AssertionError) as err:
        launch.run(fail_abort_and_hang, 3, tmp_path, grace=3.0)
    msg = str(err.value)
    head = msg.split("\n", 1)[0]
    assert head.startswith("3 of 3 ranks failed, first to last (rank "), head
    assert "rank 0 exit code 1" in head and "rank 1 killed by signal SIGABRT" in head, head
    assert head.endswith(", rank 2 stopped 3 s after another rank failed)"), head  # the stopped rank last
    parts = {int(p.split(":", 1)[0].removeprefix("rank ")): p for p in re.split(r"\n\n(?=rank \d: )", msg)[1:]}
    assert sorted(parts) == [0, 1, 2], msg
    assert "AssertionError: rank 0 check failed: 42 != 43" in parts[0]  # its traceback
    assert "rank 1 about to abort" in parts[1] and "Fatal Python error: Aborted" in parts[1]  # its output, faulthandler
    assert "in fail_abort_and_hang" in parts[1]
    assert "in _sleep_forever" in parts[2]  # the stacks it dumped when asked, before it was stopped
    assert time.monotonic() - start < launch.RUN_TIMEOUT_S


def hang(rank: int, world: int) -> None:
    _sleep_forever()


def test_a_rank_still_running_at_the_deadline_is_stopped_and_reported(tmp_path):
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"^1 of 1 ranks failed \(rank 0 stopped at the run's deadline of 5 s\)"):
        launch.run(hang, 1, tmp_path, timeout=5.0)
    assert time.monotonic() - start < 60
