"""Progress for every long stage: a rich bar on a terminal, plain timed lines in a log.

On a terminal the bar redraws in place. When stderr is a file or a pipe (a batch job, ``nohup``,
CI), a bar would be lost or fill the log with control codes, so a line like
``training: 120/800 (15%) 2m05s elapsed, eta 11m48s  loss 1.234`` is written at most every
``MRISEG_PROGRESS_EVERY`` seconds (default 30) and once at the end. ``quiet`` silences both.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _fmt_metrics(metrics: dict) -> str:
    return "  ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
    )


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class LineProgress:
    """The same callable as :class:`StageProgress`, printing a plain line now and then."""

    def __init__(
        self, description: str, total: int | None, every_s: float, stream: Any = None
    ) -> None:
        self.description, self.total, self.every_s = description, total, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.start = self.last = time.monotonic()
        self.state: tuple[int, str] | None = None  # (done, info) of the last update
        self.printed: tuple[int, str] | None = None
        # (time, done) of the first update: the rate for the eta starts there, so that time spent
        # before the stage's first unit of work (loading, a previous stage) does not count
        self.first: tuple[float, int] | None = None

    def __call__(
        self, done: int, total: int | None = None, metrics: dict | None = None, **more: Any
    ) -> None:
        if total is not None:
            self.total = total
        self.state = (done, _fmt_metrics({**(metrics or {}), **more}))
        now = time.monotonic()
        if self.first is None:
            self.first = (now, done)
        if now - self.last >= self.every_s:
            self.last = now
            self._print(now)

    def close(self) -> None:
        """The final line (only when something happened since the last one)."""
        if self.state is not None and self.state != self.printed:
            self._print(time.monotonic())

    def _print(self, now: float) -> None:
        assert self.state is not None
        done, info = self.state
        elapsed = now - self.start
        where = f"{done}"
        if self.total:
            where = f"{done}/{self.total} ({100 * done / self.total:.0f}%)"
        line = f"{self.description}: {where} {_fmt_seconds(elapsed)} elapsed"
        t0, done0 = self.first if self.first is not None else (self.start, 0)
        if self.total and done0 < done < self.total:
            line += f", eta {_fmt_seconds((now - t0) * (self.total - done) / (done - done0))}"
        if info:
            line += f"  {info}"
        print(line, file=self.stream, flush=True)
        self.printed = self.state


class StageProgress:
    """A callable ``progress(done, total=None, metrics=None, **more)`` bound to one rich task.

    Library code receives it as a plain callable so it never imports rich itself.
    """

    def __init__(self, bar: Progress | None, task: Any) -> None:
        self._bar, self._task = bar, task

    def __call__(
        self, done: int, total: int | None = None, metrics: dict | None = None, **more: Any
    ) -> None:
        if self._bar is None:
            return
        info = _fmt_metrics({**(metrics or {}), **more})
        self._bar.update(self._task, completed=done, total=total, info=info)


@contextlib.contextmanager
def task_progress(
    description: str, total: int | None, quiet: bool = False
) -> Iterator[StageProgress | LineProgress]:
    """Progress on stderr for one stage: a bar on a terminal, timed lines otherwise."""
    if quiet:
        yield StageProgress(None, None)
        return
    console = Console(stderr=True)
    if not console.is_terminal or not sys.stderr.isatty():
        lines = LineProgress(description, total, _every_seconds())
        yield lines
        lines.close()  # on success only: a failed stage ends with its error line
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )
    with bar:
        task = bar.add_task(description, total=total, info="")
        yield StageProgress(bar, task)


def _every_seconds() -> float:
    raw = os.environ.get("MRISEG_PROGRESS_EVERY", "30")
    try:
        return max(0.0, float(raw))
    except ValueError:
        return 30.0
