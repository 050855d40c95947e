"""A rich progress line for the long CLI commands (plain lines without rich)."""

from __future__ import annotations


class Progress:
    """``with Progress(enabled, total) as p: p.say("pretraining"); p.tick()``.

    With ``total`` a bar with a count and the time remaining, else a spinner counting steps.
    Without rich installed (or ``enabled`` False for quiet runs), ``say`` prints plain lines
    (or nothing).
    """

    def __init__(self, enabled: bool, total: int | None = None):
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self) -> "Progress":
        if self.enabled:
            try:
                from rich import progress as rp
            except ImportError:
                return self
            if self.total is None:
                columns = (rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.TimeElapsedColumn(),
                           rp.TextColumn("{task.completed} steps"))
            else:
                columns = (rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                           rp.TimeElapsedColumn(), rp.TimeRemainingColumn())
            self.bar = rp.Progress(*columns)
            self.bar.start()
            self.task = self.bar.add_task("starting", total=self.total)
        return self

    def say(self, what: str) -> None:
        """Name the step in progress."""
        if self.bar is not None:
            self.bar.update(self.task, description=what)
        elif self.enabled:
            print(f"... {what}", flush=True)

    def tick(self) -> None:
        """One unit of work done."""
        if self.bar is not None:
            self.bar.advance(self.task)

    def step(self, what: str) -> None:
        """Start the next step: name it and count it."""
        self.say(what)
        self.tick()

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.stop()
        return False
