"""Atomic writes (flix_kernels._io) leave the permissions an ordinary open() would.

Every file the package writes goes through these writers: adapters, PEFT exports, bench and
demo outputs. A new file gets 0o666 less the umask; a replaced file keeps its mode.
"""

import os
import stat

import pytest
import torch

import flix_kernels as fk
from flix_kernels import _io


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


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
    expected = 0o666 & ~mask
    assert _mode(tmp_path / "plain.txt") == expected
    for name in ("atomic.txt", "atomic.json", "a.bin", "b.bin"):
        assert _mode(tmp_path / name) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "atomic.json", "atomic.txt", "b.bin", "plain.txt"]


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "kept.txt"
    target.write_text("old")
    target.chmod(0o640)
    _io.atomic_write_text(target, "new")
    assert target.read_text() == "new" and _mode(target) == 0o640


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


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("disk full")

    (tmp_path / "keep.txt").write_text("previous")
    with pytest.raises(RuntimeError, match="disk full"):
        _io.atomic_write_files({str(tmp_path / "keep.txt"): _io.text_writer("new"), str(tmp_path / "x.txt"): boom})
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "previous"
