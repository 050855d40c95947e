"""``flix-kernels bench``: how much faster than what you would otherwise write, and how close to
the hardware's limit, measured side by side in one run on the device at hand.

Layout: :mod:`.cases` (shapes, routings, inputs), :mod:`.variants` (the implementations
compared), :mod:`.suite` (check against float64, then time), :mod:`.e2e` (a training step of a
small Llama), :mod:`.timing` (timers, measured peaks, provenance), :mod:`.report` (JSON,
markdown, plots, console tables, targets).
"""

from __future__ import annotations

from pathlib import Path

from .._io import atomic_write_text
from .._progress import Progress
from .cases import SHAPE_SETS, Case
from .suite import Config, parts, run

__all__ = ["Case", "Config", "SHAPE_SETS", "bench", "run"]


def bench(cfg: Config, out_dir: Path, *, show_progress: bool = True, case_lines: bool = False) -> dict:
    """Run the suite, write ``results.json``, ``results.md`` and the plots to ``out_dir``, print
    the tables; returns the record (``record["failures"]`` lists anything wrong). ``case_lines``
    (for a log; the command sets it when stdout is not a terminal): no progress line, one line
    per finished case instead (see :class:`~flix_kernels._progress.Progress`)."""
    from . import report

    out_dir.mkdir(parents=True, exist_ok=True)
    with Progress(show_progress, total=parts(cfg), unit="cases", lines=case_lines) as progress:
        record = run(cfg, progress=progress, checkpoint=lambda rec: report.write_json(out_dir / "results.json", rec))
    report.annotate(record)
    report.write_json(out_dir / "results.json", record)
    md = out_dir / "results.md"
    atomic_write_text(md, report.markdown(record))
    record["plots"] = [str(p) for p in report.plots(record, out_dir)]
    report.console(record)
    print(f"wrote {out_dir / 'results.json'}, {md}" + "".join(f", {p}" for p in record["plots"]))
    return record
