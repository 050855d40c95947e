"""The README's integration snippets (blocks after a ``<!-- readme-test: NAME -->`` line) run as
written, each in a fresh interpreter (Liger patches transformers' module globals)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\n```python\n(.*?)```", re.S)
SNIPPETS = dict(_BLOCK.findall(README.read_text()))
NEEDS = {"quantized": ["transformers", "bitsandbytes", "peft"], "compile": ["transformers"],
         "liger": ["transformers", "liger_kernel"]}


def test_the_readme_has_its_snippets():
    assert set(SNIPPETS) == set(NEEDS)


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_readme_snippet_runs_as_written(name, tmp_path):
    for module in NEEDS[name]:
        pytest.importorskip(module)
    script = tmp_path / f"{name}.py"
    script.write_text(SNIPPETS[name])
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # Liger's kernels on CPU tensors
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
