"""The FLIX_* environment variables: each declared once in flix_kernels.settings, each in the
README's table, and a malformed kernel switch refused by name."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from flix_kernels import settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_flix_variable_the_repository_reads_is_declared():
    files = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in (".py", ".sh", ".toml")
             and not any(part.startswith(".") or part in ("build", "results") or part.endswith(".egg-info")
                         for part in p.relative_to(ROOT).parts[:-1])]
    # (CMakeLists.txt's FLIX_* are CMake variables, not the environment)
    files += [ROOT / ".ci" / "run", ROOT / "Makefile"]
    used = set()
    for p in files:
        try:
            used |= set(re.findall(r"\bFLIX_[A-Z0-9_]*[A-Z0-9]\b", p.read_text(errors="ignore")))
        except (OSError, UnicodeDecodeError):
            continue
    assert used, "found no FLIX_ variable anywhere: the scan is broken"
    assert used - set(settings.SWITCHES) == set(), f"undeclared: {sorted(used - set(settings.SWITCHES))}"


def test_the_readme_lists_every_variable():
    text = (ROOT / "README.md").read_text()
    for name, switch in settings.SWITCHES.items():
        assert re.search(rf"^\| {name} \| [^|]+ \| {re.escape(switch.does)} \|", text, re.M), name


@pytest.mark.parametrize("raw,expected", [("", None), ("0", False), ("1", True)])
def test_a_kernel_switch_reads_0_1_or_its_default(monkeypatch, raw, expected):
    for name, switch in settings.SWITCHES.items():
        if switch.scope == "kernels":
            monkeypatch.setenv(name, raw)
            assert settings.value(name) is (switch.default if expected is None else expected)


@pytest.mark.parametrize("raw", ["yes", "true", " 1", "2"])
def test_a_malformed_switch_is_refused_by_name(monkeypatch, raw):
    monkeypatch.setenv("FLIX_CUDA_DECODE", raw)
    with pytest.raises(ValueError, match=f"FLIX_CUDA_DECODE={raw!r}: use 0 or 1"):
        settings.value("FLIX_CUDA_DECODE")
    with pytest.raises(KeyError, match="not a kernel switch"):
        settings.value("FLIX_CUDA")


def test_importing_the_package_with_a_malformed_switch_fails_naming_it():
    proc = subprocess.run([sys.executable, "-c", "import flix_kernels"], capture_output=True, text=True,
                          env={"FLIX_TRITON_TMA": "on", "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "FLIX_TRITON_TMA='on': use 0 or 1" in proc.stderr
