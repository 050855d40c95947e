"""Atomic file writes: write to temporary files in the same folder, fsync, then rename.

A set of files written together (tensors + config) is staged completely before the first
rename, so a failure while writing any of them leaves the previous set untouched. A written
file gets the permissions a plain ``open(path, "w")`` would give it: those of the file it
replaces, or ``0o666`` less the process umask for a new file (``tempfile.mkstemp`` alone
would leave every file ``0o600``).

:func:`commit_staged` writes a set of files of which one is the commit point (the adapters:
the tensors file, which carries the whole config): every file is staged in a private folder
inside the target folder, then renamed into place in order. A crash at any moment leaves the
old or the new commit-point file complete, and the next call removes what a crashed call left.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
import time
import uuid
import warnings
from typing import Callable, Mapping

try:
    import fcntl
except ImportError:  # Windows: stale staging folders are recognised by their age instead
    fcntl = None


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: str) -> int:
    """The permission bits ``open(path, "w")`` would leave on ``path``."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _stage(path: str, write: Callable[[str], None]) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        # After the write: some writers (safetensors' save_file) replace the file they are given.
        os.chmod(tmp, _mode_for(path))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def atomic_write_files(writers: Mapping[str, Callable[[str], None]]) -> None:
    """Write every ``path -> write(tmp_path)`` to a temporary file, then rename them all."""
    staged: dict[str, str] = {}
    try:
        for path, write in writers.items():
            staged[path] = _stage(path, write)
        for path, tmp in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    atomic_write_files({path: write})


# -- staged commits ------------------------------------------------------------------------------

LOCK_FILE = ".lock"
# Without fcntl no lock tells a live save from a dead one: only folders this old are removed.
STALE_AGE_S = 3600.0


# flock errors of filesystems without locks (some NFS mounts): fall back to the age rule.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _try_lock(staging: str):
    """An fd holding ``LOCK_EX`` on ``staging``'s lock file (created if absent), or None when a
    live process holds it or the folder is gone. The kernel drops a lock when its holder dies,
    kill -9 included."""
    lock = os.path.join(staging, LOCK_FILE)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:  # the folder was removed meanwhile
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # A cleanup may have removed the folder between our open and our lock: then the lock
        # guards a file no other process can find, and the folder is not ours.
        a, b = os.fstat(fd), os.stat(lock)
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _is_old(path: str) -> bool:
    return time.time() - os.stat(path, follow_symlinks=False).st_mtime >= STALE_AGE_S


def remove_stale_staging(folder: str, prefix: str) -> list[str]:
    """Remove the staging folders ``folder/<prefix>*`` no live process uses: their lock is free
    (without fcntl or file locks: they are older than an hour). Best effort: a folder that
    cannot be removed now is left for the next call. Returns the removed paths."""
    removed = []
    try:
        entries = [e.path for e in os.scandir(folder) if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return removed
    for staging in entries:
        try:
            fd = None
            if fcntl is not None:
                try:
                    fd = _try_lock(staging)
                    if fd is None:  # a live save's, or gone
                        continue
                except OSError as e:
                    if e.errno not in _NO_LOCKS:
                        raise
            if fd is None and not _is_old(staging):
                continue
            try:
                shutil.rmtree(staging)
            finally:
                if fd is not None:
                    os.close(fd)
            removed.append(staging)
        except OSError:
            pass
    return removed


def _make_staging(folder: str, prefix: str) -> tuple[str, int | None]:
    """A new staging folder ``folder/<prefix><uuid>`` and the fd holding its lock (None where
    there are no file locks)."""
    for _ in range(8):
        staging = os.path.join(folder, prefix + uuid.uuid4().hex)
        os.mkdir(staging)
        if fcntl is None:
            return staging, None
        try:
            fd = _try_lock(staging)
        except OSError as e:
            if e.errno in _NO_LOCKS:
                return staging, None
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if fd is not None:
            return staging, fd
        # A concurrent cleanup took the folder between our mkdir and our lock; it removes it.
    raise RuntimeError(f"could not lock a staging folder in {folder!r}: concurrent cleanups kept taking it")


def _fsync_dir(folder: str) -> None:
    """Make the renames into ``folder`` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its renames need no folder fsync
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # filesystems that cannot fsync a folder
            raise
    finally:
        os.close(fd)


def _write_staged(staging: str, final: str, write: Callable[[str], None]) -> str:
    tmp = os.path.join(staging, os.path.basename(final))
    write(tmp)
    # After the write: some writers (safetensors' save_file) replace the file they are given.
    os.chmod(tmp, _mode_for(final))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    return tmp


def commit_staged(folder: str, writers: Mapping[str, Callable[[str], None]], *, prefix: str) -> None:
    """Write the files ``folder/<name>`` (``name -> write(tmp_path)``), the first one the commit point.

    Every file is written completely and fsynced in a private staging folder
    ``folder/<prefix><uuid>/`` (writers' own temporary files land there too), locked for the whole
    call; then they are renamed into ``folder`` in the order given, ``folder`` is fsynced and the
    staging folder removed. Until the first rename ``folder`` holds the previous files; a crash
    after it leaves the new first file beside older other files, which a reader of the first file
    must tolerate. A failure removes the staging folder; one left by a crash (kill -9, power loss)
    is removed by the next call, which never removes the folder of a call still running.
    """
    names = list(writers)
    if LOCK_FILE in names or any(os.path.basename(n) != n for n in names):
        raise ValueError(f"commit_staged writes plain file names other than {LOCK_FILE!r}, got {names}")
    os.makedirs(folder, exist_ok=True)
    remove_stale_staging(folder, prefix)
    staging, lock_fd = _make_staging(folder, prefix)
    done = False
    try:
        staged = [(_write_staged(staging, os.path.join(folder, n), w), os.path.join(folder, n)) for n, w in writers.items()]
        for tmp, final in staged:
            os.replace(tmp, final)
        _fsync_dir(folder)
        done = True
    finally:
        try:
            if done:
                try:
                    shutil.rmtree(staging)
                except OSError as e:  # the files are in place: the save succeeded
                    warnings.warn(f"could not remove the staging folder {staging} ({e}); the next save removes it",
                                  stacklevel=3)
            else:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)


def text_writer(text: str) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return write


def atomic_write_text(path, text: str) -> None:
    atomic_write(os.fspath(path), text_writer(text))


def json_writer(obj) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    return write


def atomic_write_json(path: str, obj) -> None:
    atomic_write(path, json_writer(obj))


def read_json(path: str):
    """Parse a JSON file; invalid JSON raises ValueError naming the file (never unpickles anything)."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
