"""Atomic writes (flix_kernels._io) leave the permissions an ordinary open() would.

Every file the package writes goes through these writers: adapters, PEFT exports, bench and
demo outputs. A new file gets 0o666 less the umask; a replaced file keeps its mode.
commit_staged (the adapters' writer) stages in a locked private folder, and removes the
staging folders of dead writers only.
"""

import errno
import os
import stat
import time

import pytest
import torch

import flix_kernels as fk
from flix_kernels import _io


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


PREFIX = ".test_stage-"


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    saved = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
def test_new_files_get_the_mode_open_would_give(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    _io.atomic_write_text(tmp_path / "atomic.txt", "x")
    _io.atomic_write_json(str(tmp_path / "atomic.json"), {"a": 1})
    _io.atomic_write_files({str(tmp_path / "a.bin"): _io.text_writer("a"), str(tmp_path / "b.bin"): _io.text_writer("b")})
    _io.commit_staged(str(tmp_path), {"c.bin": _io.text_writer("c"), "d.json": _io.json_writer([1])}, prefix=PREFIX)
    expected = 0o666 & ~mask
    assert _mode(tmp_path / "plain.txt") == expected
    for name in ("atomic.txt", "atomic.json", "a.bin", "b.bin", "c.bin", "d.json"):
        assert _mode(tmp_path / name) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "atomic.json", "atomic.txt", "b.bin", "c.bin",
                                                          "d.json", "plain.txt"]


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "kept.txt"
    target.write_text("old")
    target.chmod(0o640)
    _io.atomic_write_text(target, "new")
    assert target.read_text() == "new" and _mode(target) == 0o640
    target.chmod(0o604)
    _io.commit_staged(str(tmp_path), {"kept.txt": _io.text_writer("newer")}, prefix=PREFIX)
    assert target.read_text() == "newer" and _mode(target) == 0o604


def test_adapter_and_peft_files_are_readable_by_others_under_the_usual_umask(tmp_path, umask):
    umask(0o022)
    space = fk.FeatureSpace({"language": ["en", "fr"], "task": ["qa"]}, 2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    fk.inject(model, space, target_modules=["0"])
    fk.save_adapters(model, str(tmp_path / "adapters"))
    fk.export_peft(model, {"language": "en"}, str(tmp_path / "peft"))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 4
    for p in files:
        assert _mode(p) == 0o644, p


def _failing_writer(tmp):
    with open(tmp, "w") as f:
        f.write("partial")
    raise RuntimeError("disk full")


@pytest.mark.parametrize("commit", [
    lambda folder, writers: _io.atomic_write_files({os.path.join(folder, n): w for n, w in writers.items()}),
    lambda folder, writers: _io.commit_staged(folder, writers, prefix=PREFIX)], ids=["atomic_write_files", "commit_staged"])
def test_a_failed_write_leaves_the_old_files_and_nothing_else(tmp_path, commit):
    (tmp_path / "keep.txt").write_text("previous")
    with pytest.raises(RuntimeError, match="disk full"):
        commit(str(tmp_path), {"keep.txt": _io.text_writer("new"), "x.txt": _failing_writer})
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "previous"


# ---------------------------------------------------------------------------------------------
# commit_staged
# ---------------------------------------------------------------------------------------------

def _stagings(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(PREFIX))


def test_commit_staged_writes_everything_inside_its_staging_folder(tmp_path):
    """A writer's own temporary files (safetensors makes one beside the path it is given) land in
    the staging folder: while the files are written, the target folder has nothing new."""
    (tmp_path / "a.bin").write_text("old")
    seen = []

    def writer(text):
        def write(tmp):
            seen.append((os.path.dirname(os.path.dirname(tmp)), os.path.basename(os.path.dirname(tmp)),
                         sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(PREFIX))))
            with open(os.path.join(os.path.dirname(tmp), ".tmp-own"), "w") as f:
                f.write("scratch")
            with open(tmp, "w") as f:
                f.write(text)
            os.unlink(os.path.join(os.path.dirname(tmp), ".tmp-own"))
        return write

    _io.commit_staged(str(tmp_path), {"a.bin": writer("A"), "b.bin": writer("B")}, prefix=PREFIX)
    assert [(d, n.startswith(PREFIX), names) for d, n, names in seen] == [(str(tmp_path), True, ["a.bin"])] * 2
    assert (tmp_path / "a.bin").read_text() == "A" and (tmp_path / "b.bin").read_text() == "B"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]


def test_commit_staged_refuses_paths_and_the_lock_name(tmp_path):
    for names in (["sub/a.txt"], [_io.LOCK_FILE]):
        with pytest.raises(ValueError, match="plain file names"):
            _io.commit_staged(str(tmp_path), {n: _io.text_writer("x") for n in names}, prefix=PREFIX)


def test_a_staging_folder_without_its_lock_file_is_removed(tmp_path):
    """A writer killed between creating its staging folder and its lock file left an empty folder."""
    (tmp_path / (PREFIX + "dead")).mkdir()
    _io.commit_staged(str(tmp_path), {"a.txt": _io.text_writer("a")}, prefix=PREFIX)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_without_fcntl_only_staging_folders_older_than_an_hour_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(_io, "fcntl", None)
    young, old = tmp_path / (PREFIX + "young"), tmp_path / (PREFIX + "old")
    for d in (young, old):
        d.mkdir()
        (d / "part").write_text("x")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    _io.commit_staged(str(tmp_path), {"a.txt": _io.text_writer("a")}, prefix=PREFIX)
    assert _stagings(tmp_path) == [young.name]
    assert (tmp_path / "a.txt").read_text() == "a"


def test_a_filesystem_without_file_locks_falls_back_to_the_age_rule(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    young = tmp_path / (PREFIX + "young")
    young.mkdir()
    monkeypatch.setattr(fcntl, "flock", no_locks)
    _io.commit_staged(str(tmp_path), {"a.txt": _io.text_writer("a")}, prefix=PREFIX)
    assert _stagings(tmp_path) == [young.name]  # maybe a live writer's: kept
    assert (tmp_path / "a.txt").read_text() == "a"


def test_a_staging_folder_taken_by_a_concurrent_cleanup_is_not_used(tmp_path, monkeypatch):
    """A cleanup in another process may remove a new staging folder's lock file between the
    writer's open and its flock: the writer then holds a lock on a file nobody can find, so it
    must make another folder rather than write into one the cleanup is removing."""
    fcntl = pytest.importorskip("fcntl")
    real_flock, calls = fcntl.flock, []

    def flock_after_cleanup(fd, op):
        if not calls:
            staging = [p for p in tmp_path.iterdir() if p.name.startswith(PREFIX)]
            os.unlink(staging[0] / _io.LOCK_FILE)  # what the concurrent cleanup's rmtree does first
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_cleanup)
    _io.commit_staged(str(tmp_path), {"a.txt": _io.text_writer("a")}, prefix=PREFIX)
    assert len(calls) == 2  # a second folder was made and locked
    assert len(_stagings(tmp_path)) == 1  # the first one, the (simulated) cleanup's to finish
    monkeypatch.undo()
    _io.commit_staged(str(tmp_path), {"a.txt": _io.text_writer("b")}, prefix=PREFIX)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
