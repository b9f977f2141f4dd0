"""What every suite gets: the run's settings, a work directory, services and worker pools.

Everything a suite starts comes from here as a context manager, so it is stopped when the
suite ends, fails or is interrupted: services by ``embedded_service`` (which ends with a
process-group kill), workers by ``WorkerPool.close`` (bounded join, then kill).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sessionlane.system.bench._pool import WorkerPool
from sessionlane.system.bench._progress import Progress

__all__ = ["BenchContext"]

_POLL_S = 0.05


@dataclass
class BenchContext:
    """One bench run. ``duration`` is the measured time of each timed run, in seconds."""

    quick: bool
    workdir: Path
    progress: Progress
    duration: float
    memory_merge: bool = False
    """Every service started with ``memory_merge = true`` (``--memory-merge``)."""

    def dir(self, *parts: str) -> Path:
        """A fresh directory under the run's work directory."""
        path = self.workdir.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def service(self, name: str, **overrides: Any) -> Iterator[Any]:
        """An embedded service whose only root is ``<workdir>/<name>``; stopped on exit.

        Yields ``(service, root)``.
        """
        from sessionlane.system.runtime.service import embedded_service

        root = self.dir(name)
        if self.memory_merge:
            overrides = {"memory_merge": True, **overrides}
        self.progress.step("starting the service")
        with embedded_service(
            [str(root)], log_file=self.workdir / f"{name}.service.log", **overrides
        ) as service:
            yield service, root
            self.progress.step("stopping the service")

    def pool(self, size: int) -> WorkerPool:
        """``size`` spawned worker processes (use with ``with``)."""
        self.progress.step(f"spawning {size} worker processes")
        return WorkerPool(size, tick=self.progress.tick)

    def sleep(self, seconds: float) -> None:
        """Sleep while keeping the progress display alive."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.progress.tick()
            time.sleep(min(_POLL_S, left))
