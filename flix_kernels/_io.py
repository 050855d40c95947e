"""Atomic file writes: write to temporary files in the same folder, fsync, then rename.

A set of files written together (tensors + config) is staged completely before the first
rename, so a failure while writing any of them leaves the previous set untouched. A written
file gets the permissions a plain ``open(path, "w")`` would give it: those of the file it
replaces, or ``0o666`` less the process umask for a new file (``tempfile.mkstemp`` alone
would leave every file ``0o600``).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from typing import Callable, Mapping


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
