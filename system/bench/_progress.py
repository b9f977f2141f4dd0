"""The progress display on stderr: a live rich display on a terminal, plain lines otherwise.

Refreshing is manual (``auto_refresh=False``): rich's refresh thread would be running while the
bench forks thespian's admin, and a thread holding stderr's lock at fork time can deadlock the
child. The bench calls :meth:`Progress.tick` from its wait loops instead.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichProgress

__all__ = ["Progress"]

_REFRESH_S = 0.1


class Progress:
    """Which suite runs, which step it is on, how many suites are done."""

    def __init__(self, total: int, *, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self._rich: RichProgress | None = None
        self._overall: TaskID | None = None
        self._step: TaskID | None = None
        self._total = total
        self._suite = ""
        self._last = 0.0

    def __enter__(self) -> Self:
        if self.live:
            self._rich = RichProgress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                auto_refresh=False,
                transient=True,
            )
            self._rich.start()
            self._overall = self._rich.add_task("sessionlane bench", total=self._total)
            self._step = self._rich.add_task("", total=None)
            self._rich.refresh()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def suite(self, name: str) -> None:
        """A suite starts."""
        self._suite = name
        self.step("starting")

    def suite_done(self) -> None:
        if self._rich is not None and self._overall is not None:
            self._rich.advance(self._overall)
            self._rich.refresh()

    def step(self, text: str) -> None:
        """The current suite moves on to ``text``."""
        line = f"{self._suite}: {text}"
        if self._rich is not None and self._step is not None:
            self._rich.update(self._step, description=line)
            self._rich.refresh()
            self._last = time.monotonic()
        else:
            print(f"bench {line}", file=sys.stderr, flush=True)

    def tick(self) -> None:
        """Called from wait loops: keeps the spinner and the clock moving."""
        if self._rich is not None and time.monotonic() - self._last >= _REFRESH_S:
            self._rich.refresh()
            self._last = time.monotonic()
