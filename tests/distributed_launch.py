"""Run a test function on N gloo ranks (spawned processes) and report how every rank ended.

``run(fn, world, tmp_path, *args)`` starts ``world`` processes; each sets up a gloo process
group through a rendezvous file of its own under ``tmp_path``, calls ``fn(rank, world, *args)``
and tears down. The parent waits for all of them with a deadline and raises one AssertionError
naming each rank that failed: its exit code or signal, its traceback and the end of its output
(stdout and stderr, C++ included, with faulthandler's Python stacks of every thread when a
rank dies of a signal or has to be stopped). A rank that fails stops the others after a grace
period, and a rank still running at the deadline is stopped: nothing hangs.

Why each rank ends with ``os._exit`` and not a normal interpreter exit: gloo runs collectives
on C++ worker threads (``pt_gloo_runloop``), which take the GIL after a collective completes:
to drop its tensors (torch holds a reference to a tensor's Python object while C++ code holds
the tensor) and to run Python future callbacks. The rank's main thread is already on its way
as soon as the collective is marked complete; on a busy machine the worker can be descheduled
until the interpreter finalizes. CPython before 3.14 then ends the thread with
``pthread_exit``, whose forced unwind through a ``noexcept`` C++ destructor calls
``std::terminate`` ("terminate called without an active exception"): the rank dies of SIGABRT
although every check passed (pytorch/pytorch#38228, #190489; python/cpython gh-87135). From
3.14 the thread blocks forever instead, which hangs the exit if the process group's destructor
joins it. ``destroy_process_group`` does not join these threads: DTensor and the device mesh
keep the group alive until finalization. So each rank waits for every rank to finish all its
collectives (a barrier), destroys its process groups, flushes its output and leaves with
``os._exit``: its interpreter is never finalized while native threads run.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = 120  # gloo's own timeout: a rank whose peer is gone raises after this
RUN_TIMEOUT_S = 900.0  # the whole run, all ranks
GRACE_S = 20.0  # after one rank failed, how long the others get to end on their own
OUTPUT_TAIL = 6000  # characters of each failed rank's output in the report


def _rank_main(fn, rank: int, world: int, rendezvous: str, log_path: str, error_path: str, args: tuple) -> None:
    """One rank: output to its log, process group up, ``fn``, barrier, teardown, ``os._exit``."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    faulthandler.enable(all_threads=True)  # Python stacks of all threads on SIGABRT, SIGSEGV, ...
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent's request before it stops a rank
    status = 1
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        fn(rank, world, *args)
        dist.barrier()  # no rank tears down while another still runs a collective with it
        dist.destroy_process_group()
        status = 0
    except BaseException:  # noqa: BLE001 - every way out is reported to the parent
        text = traceback.format_exc()
        with open(error_path, "w") as f:
            f.write(text)
        sys.stderr.write(text)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _describe(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _tail(path: Path, n: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text if len(text) <= n else "[...]\n" + text[-n:]


def run(fn, world: int, tmp_path: Path, *args, timeout: float = RUN_TIMEOUT_S, grace: float = GRACE_S) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; raise AssertionError unless every
    rank returned and exited 0. ``fn`` must be importable (module level) for the spawned ranks,
    and leaves the default process group to the launcher (it neither creates nor destroys it).
    The report lists the failed ranks in the order they ended, the first one first."""
    run_dir = Path(tempfile.mkdtemp(prefix="ranks-", dir=tmp_path))  # a fresh rendezvous file per run
    ctx = multiprocessing.get_context("spawn")
    procs, logs, errors = [], [], []
    ended: dict[int, float] = {}  # rank -> when it was seen to end
    stopped: dict[int, str] = {}  # rank -> why the launcher stopped it
    try:
        for rank in range(world):
            logs.append(run_dir / f"rank{rank}.log")
            errors.append(run_dir / f"rank{rank}.error")
            p = ctx.Process(target=_rank_main, name=f"rank{rank}",
                            args=(fn, rank, world, str(run_dir / "rendezvous"), str(logs[rank]), str(errors[rank]), args))
            p.start()
            procs.append(p)
        deadline = time.monotonic() + timeout
        while len(ended) < world:
            now = time.monotonic()
            for r, p in enumerate(procs):
                if r not in ended and p.exitcode is not None:
                    ended[r] = now
            failed = [ended[r] for r in ended if procs[r].exitcode != 0]
            end = min(deadline, min(failed) + grace) if failed else deadline
            alive = [r for r in range(world) if r not in ended]
            if alive and now >= end:
                why = (f"stopped {grace:.0f} s after another rank failed" if failed
                       else f"stopped at the run's deadline of {timeout:.0f} s")
                stopped.update({r: why for r in alive})
                break
            if alive:
                multiprocessing.connection.wait([procs[r].sentinel for r in alive], timeout=end - now)
    finally:
        _stop([p for p in procs if p.exitcode is None])
    bad = sorted((r for r in range(world) if procs[r].exitcode != 0 or r in stopped),
                 key=lambda r: (r in stopped, ended.get(r, 0.0), r))
    if not bad:
        return

    def state(r: int) -> str:
        return stopped[r] if r in stopped else _describe(procs[r].exitcode)

    parts = []
    for r in bad:
        err, out = _tail(errors[r], OUTPUT_TAIL), _tail(logs[r], OUTPUT_TAIL)
        parts.append(f"rank {r}: {state(r)}" + (" (its stacks are in its output)" if r in stopped else "")
                     + (f"\n--- traceback\n{err}" if err and err.strip() not in out else "")
                     + f"\n--- output ({logs[r]})\n"
                     + (out or "(none: the rank ended before its output was redirected; see the test's captured stderr)"))
    summary = ", ".join(f"rank {r} {state(r)}" for r in bad)
    order = ", first to last" if len(bad) > 1 else ""
    raise AssertionError(f"{len(bad)} of {world} ranks failed{order} ({summary})\n\n" + "\n\n".join(parts))


def _stop(procs) -> None:
    """Ask each rank for its Python stacks (faulthandler, into its log), then kill it."""
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    if procs:
        time.sleep(1.0)
    for p in procs:
        p.kill()
        p.join()
