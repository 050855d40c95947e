"""Result files of the benchmark scripts: every file written under a temporary name first, then
all renamed, so a run stopped while writing leaves the previous results or the new ones."""

from __future__ import annotations

import json
import os


def write_results(out_dir: str, files: dict[str, object]) -> None:
    """Write ``name -> content`` under ``out_dir``: a ``str`` as text, anything else as JSON."""
    staged = {}
    try:
        for name, content in files.items():
            tmp = os.path.join(out_dir, f".{name}.partial")
            with open(tmp, "w") as f:
                f.write(content if isinstance(content, str) else json.dumps(content, indent=2) + "\n")
            staged[tmp] = os.path.join(out_dir, name)
        for tmp, path in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
