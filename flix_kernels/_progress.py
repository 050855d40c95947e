"""A progress line for the long CLI commands: done/total, time elapsed and, once something is
done, the time left (rich when installed, plain lines otherwise, nothing when disabled); for a
log (stdout not a terminal), one line per finished case instead."""

from __future__ import annotations

import time
from typing import Callable


def duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """``with Progress(enabled, total, unit="cases") as p: p.say("headline"); p.tick()``.

    :meth:`text` is the line shown: ``"3/8 cases, 1 min 05 s elapsed, about 1 min 48 s left:
    headline"``. The time left is the mean time per unit done so far times the units left, less
    the time since the last unit was done: it appears once one unit is done and counts down.
    Without ``total`` the line counts units. ``clock`` (seconds) is replaceable for tests;
    ``use_rich=False`` prints plain lines even where rich is installed.

    ``lines=True`` is for output to a file or pipe, where a live line shows nothing until the
    end (rich draws it only on a terminal): no progress line at all, ``enabled`` or not, but
    :meth:`finished` prints one flushed line per finished case (its name, time and result).
    The commands set it when stdout is not a terminal.
    """

    def __init__(self, enabled: bool, total: int | None = None, *, unit: str = "steps",
                 clock: Callable[[], float] = time.monotonic, use_rich: bool | None = None, lines: bool = False):
        self.enabled, self.total, self.unit, self.clock = enabled and not lines, total, unit, clock
        self.use_rich, self.lines = use_rich, lines
        self.done, self.what, self.bar = 0, "starting", None
        self.start = self.last_tick = clock()

    def __enter__(self) -> "Progress":
        self.start = self.last_tick = self.clock()
        if self.enabled and self.use_rich is not False:
            try:
                from rich import progress as rp
            except ImportError:
                return self
            from rich.text import Text

            status = self

            class Status(rp.ProgressColumn):  # rendered on every refresh, so the times stay live
                def render(self, task):
                    return Text(status.text())

            columns = [rp.SpinnerColumn()] + ([rp.BarColumn()] if self.total else []) + [Status()]
            self.bar = rp.Progress(*columns)
            self.bar.start()
            self.task = self.bar.add_task("", total=self.total)
        return self

    def text(self) -> str:
        """The status line: done[/total] unit, elapsed, time left (after the first unit), the step."""
        elapsed = self.clock() - self.start
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        parts = [f"{count} {self.unit}", f"{duration(elapsed)} elapsed"]
        if self.total and 0 < self.done < self.total:
            per_unit = (self.last_tick - self.start) / self.done
            left = per_unit * (self.total - self.done) - (self.clock() - self.last_tick)  # counts down between ticks
            parts.append(f"about {duration(max(left, 0.0))} left")
        return ", ".join(parts) + f": {self.what}"

    def say(self, what: str) -> None:
        """Name the step in progress."""
        self.what = what
        if self.bar is None and self.enabled:
            print(f"... {self.text()}", flush=True)

    def finished(self, name: str, seconds: float, result: str) -> None:
        """Case ``name`` finished in ``seconds`` with ``result`` (its key number): one line, with
        ``lines`` (a log), flushed at once so that a log shows it while the run goes on."""
        if self.lines:
            took = f"{seconds:.1f} s" if seconds < 60 else duration(seconds)
            print(f"done {name} in {took}: {result}", flush=True)

    def tick(self, n: int = 1) -> None:
        """``n`` units of work done."""
        self.done += n
        self.last_tick = self.clock()
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.stop()
        return False
