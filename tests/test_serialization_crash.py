"""A save_adapters stopped at any moment leaves the old adapters or the new ones, complete.

Three ways in: every step of a save made to raise in turn (an exception and Ctrl-C), kill -9
of a process saving in a loop at random moments, and a concurrent save whose staging folder
a cleanup must not take. After each, the folder loads exactly one of the two versions (bit
for bit), and the next successful save leaves nothing but the two files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import select
import shutil
import signal
import time
import warnings

import pytest
import torch

import flix_kernels as fk
import flix_kernels.serialization as ser
from flix_kernels.serialization import CONFIG_FILE, TENSORS_FILE
from _models import adapter_state, make_space, randomize_adapters, tiny_mlp

fcntl = pytest.importorskip("fcntl")

# The design's staging folder name, spelled out here so the tests check the behaviour, not a constant.
STAGING = ".flix_save-"


def trained_mlp(seed, alpha):
    model = tiny_mlp(seed)
    fk.inject(model, make_space(), target_modules="all-linear", alpha=alpha)
    randomize_adapters(model, torch.Generator().manual_seed(seed + 1))
    return model


def versions(seed):
    """Two saves that differ in every tensor and in alpha."""
    old, new = trained_mlp(seed, alpha=8.0), trained_mlp(seed + 100, alpha=2.0)
    return (old, adapter_state(old), 8.0), (new, adapter_state(new), 2.0)


def loaded(folder, seed):
    """(adapters, alpha) of a fresh model loaded from ``folder``; a stale JSON copy may warn."""
    model = tiny_mlp(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fk.load_adapters(model, str(folder))
    alphas = {layer.alpha for _, layer in fk.flix_layers(model)}
    assert len(alphas) == 1
    return adapter_state(model), alphas.pop()


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def which_version(folder, seed, *candidates) -> int:
    """The index of the candidate ``(model, state, alpha)`` the folder loads as; fails on anything else."""
    state, alpha = loaded(folder, seed)
    for i, (_, expected, expected_alpha) in enumerate(candidates):
        if same(state, expected) and alpha == expected_alpha:
            return i
    pytest.fail(f"{folder} loads neither version: alpha {alpha}, contents {sorted(os.listdir(folder))}")


def assert_clean(folder):
    assert sorted(os.listdir(folder)) == sorted([CONFIG_FILE, TENSORS_FILE])


def assert_nothing_outside_staging(folder):
    """Whatever a stopped save left is inside a staging folder, never beside the two files."""
    stray = [n for n in os.listdir(folder) if n not in (CONFIG_FILE, TENSORS_FILE) and not n.startswith(STAGING)]
    assert not stray, stray


def plant_stale_staging(folder) -> str:
    """What a save killed while writing leaves: its staging folder with a lock file nobody holds,
    a partial tensors file and one of safetensors' own temporary files."""
    stale = os.path.join(folder, STAGING + "0" * 32)
    os.makedirs(stale)
    open(os.path.join(stale, ".lock"), "w").close()
    with open(os.path.join(stale, TENSORS_FILE), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{partial")
    with open(os.path.join(stale, ".tmpAbC123"), "wb") as f:
        f.write(b"\x00" * 4096)
    return stale


# ---------------------------------------------------------------------------------------------
# (a) every step of a save made to fail, in turn
# ---------------------------------------------------------------------------------------------

# Every call a save makes to the file system, and its two writers: the i-th call of each is
# made to raise in turn. Stopping the stale-folder cleanup is covered too (a stale folder is
# planted before each save).
STEPS = [(ser, "save_file"), (json, "dump"), (os, "replace"), (os, "fsync"), (os, "mkdir"), (os, "open"),
         (os, "chmod"), (os, "scandir"), (os, "unlink"), (os, "rmdir"), (os, "stat"), (os, "fstat"),
         (fcntl, "flock"), (shutil, "rmtree")]


class Interrupter:
    """Wraps every step in STEPS; counts the calls and makes call ``fail_at = (step, i)`` raise."""

    def __init__(self, fail_at=None, exc=None):
        self.calls = {}
        self.fail_at, self.exc, self.fired = fail_at, exc, False

    @contextlib.contextmanager
    def installed(self):
        with pytest.MonkeyPatch.context() as mp:
            for module, name in STEPS:
                mp.setattr(module, name, self._wrap((module.__name__, name), getattr(module, name)))
            yield self

    def _wrap(self, step, real):
        def wrapper(*args, **kwargs):
            i = self.calls.get(step, 0)
            self.calls[step] = i + 1
            if (step, i) == self.fail_at:
                self.fired = True
                raise self.exc
            return real(*args, **kwargs)
        return wrapper


def test_a_save_stopped_at_any_step_leaves_old_or_new_and_the_next_save_cleans_up(seed, tmp_path):
    old, new = versions(seed)
    dry = tmp_path / "dry"
    fk.save_adapters(old[0], str(dry))
    plant_stale_staging(dry)
    with Interrupter().installed() as counter:
        fk.save_adapters(new[0], str(dry))
    steps = [(step, i) for step, n in counter.calls.items() for i in range(n)]
    assert {s for s, _ in steps} >= {("flix_kernels.serialization", "save_file"), ("json", "dump"), ("os", "replace"),
                                     ("os", "fsync")}
    outcomes = {0: 0, 1: 0}
    for k, (step, i) in enumerate(steps):
        for exc in (OSError(errno.EIO, f"injected at {step} #{i}"), KeyboardInterrupt()):
            folder = tmp_path / f"{k}-{type(exc).__name__}"
            fk.save_adapters(old[0], str(folder))
            plant_stale_staging(folder)
            interrupter = Interrupter((step, i), exc)
            raised = None
            with interrupter.installed(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    fk.save_adapters(new[0], str(folder))
                except BaseException as e:  # noqa: B036 (Ctrl-C is one of the injected failures)
                    raised = e
            assert interrupter.fired, (step, i)
            if isinstance(exc, KeyboardInterrupt):  # never swallowed, wherever it lands
                assert raised is exc, (step, i, raised)
            assert_nothing_outside_staging(folder)
            version = which_version(folder, seed, old, new)
            outcomes[version] += 1
            # Only best-effort cleanup may swallow an error (a failed removal of the save's own staging
            # folder says so): a save that did not raise is complete.
            if raised is None:
                assert version == 1, (step, i)
                assert step in {("os", "scandir"), ("os", "unlink"), ("os", "rmdir"), ("os", "open"), ("os", "stat"),
                                ("os", "fstat"), ("fcntl", "flock"), ("shutil", "rmtree"), ("os", "mkdir")}, step
            assert all("the next save removes it" in str(w.message) for w in caught), [str(w.message) for w in caught]
            fk.save_adapters(new[0], str(folder))
            assert_clean(folder)
            assert which_version(folder, seed, old, new) == 1
    assert outcomes[0] and outcomes[1]  # the steps before the commit and after it were both reached


def test_a_save_stopped_after_the_commit_loads_the_new_adapters_and_warns(seed, tmp_path):
    """The tensors file renamed into place, the JSON copy not: the new save, with a warning naming both ids."""
    old, new = versions(seed)
    fk.save_adapters(old[0], str(tmp_path))
    with open(tmp_path / CONFIG_FILE) as f:
        old_id = json.load(f)["save_id"]
    interrupter = Interrupter((("os", "replace"), 1), KeyboardInterrupt())
    with interrupter.installed(), pytest.raises(KeyboardInterrupt):
        fk.save_adapters(new[0], str(tmp_path))
    with open(tmp_path / CONFIG_FILE) as f:
        assert json.load(f)["save_id"] == old_id  # the JSON copy is the old one
    model = tiny_mlp(seed)
    with pytest.warns(UserWarning, match=rf"save_id '{old_id}'.*save_id '[0-9a-f]{{32}}'.*using the config of {TENSORS_FILE}"):
        fk.load_adapters(model, str(tmp_path))
    assert same(adapter_state(model), new[1])


# ---------------------------------------------------------------------------------------------
# (b) kill -9 of a process saving in a loop
# ---------------------------------------------------------------------------------------------

def _fork_saver(folder, models, first):
    """A forked child saving ``models`` in turn into ``folder`` until killed; it writes b"s" to the
    returned pipe when it starts and b"d" after each completed save. Forked (torch already
    imported), so a kill costs milliseconds, not an interpreter start."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            os.write(w, b"s")
            i = first
            while True:
                fk.save_adapters(models[i % len(models)], folder)
                os.write(w, b"d")
                i += 1
        finally:
            os._exit(1)
    os.close(w)
    return pid, r


def _read_byte(fd, timeout=20.0) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, f"the saving child wrote nothing in {timeout} s (hung?)"
    return os.read(fd, 1)


def _kill(pid) -> None:
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_9_at_random_moments_leaves_one_complete_version(seed, tmp_path):
    old, new = versions(seed)
    models = (old[0], new[0])
    folder = str(tmp_path / "adapters")
    fk.save_adapters(old[0], folder)
    # How long a save takes in a forked child, now (the machine is shared): the kills' time scale.
    pid, r = _fork_saver(folder, models, 0)
    assert _read_byte(r) == b"s"
    start = time.perf_counter()
    for _ in range(5):
        assert _read_byte(r) == b"d"
    per_save = (time.perf_counter() - start) / 5
    _kill(pid)
    os.close(r)
    rng = random.Random(seed)
    kills, stopped_mid_save = 24, 0
    for k in range(kills):
        pid, r = _fork_saver(folder, models, k)
        assert _read_byte(r) == b"s"
        time.sleep(rng.uniform(0, 3 * per_save))  # a random moment of its first few saves
        _kill(pid)
        os.close(r)
        stopped_mid_save += any(n.startswith(STAGING) for n in os.listdir(folder))
        assert_nothing_outside_staging(folder)
        which_version(folder, seed, old, new)  # one of the two, complete
        fk.save_adapters(models[k % 2], folder)  # the next save removes what the killed one left
        assert_clean(folder)
        assert which_version(folder, seed, old, new) == k % 2
    assert stopped_mid_save >= 1  # the kills did land inside saves, leaving a staging folder


# ---------------------------------------------------------------------------------------------
# (c) a concurrent save's staging folder is left alone
# ---------------------------------------------------------------------------------------------

def test_cleanup_leaves_the_staging_folder_of_a_live_save(seed, tmp_path):
    old, new = versions(seed)
    fk.save_adapters(old[0], str(tmp_path))
    live = os.path.join(tmp_path, STAGING + "1" * 32)
    os.mkdir(live)
    with open(os.path.join(live, TENSORS_FILE), "wb") as f:
        f.write(b"half-written by another process")
    fd = os.open(os.path.join(live, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the other (live) save holds it
        dead = plant_stale_staging(tmp_path)
        fk.save_adapters(new[0], str(tmp_path))
        assert sorted(os.listdir(live)) == [".lock", TENSORS_FILE]  # untouched
        assert not os.path.exists(dead)  # the dead one's lock was free: removed
        assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_FILE, TENSORS_FILE, os.path.basename(live)])
        assert which_version(tmp_path, seed, old, new) == 1  # loading ignores staging folders
    finally:
        os.close(fd)  # the live save ends (or dies): its lock is free
    fk.save_adapters(old[0], str(tmp_path))
    assert_clean(tmp_path)
    assert which_version(tmp_path, seed, old, new) == 0
