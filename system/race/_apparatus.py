"""Measuring apparatus shared by every backend: unit context, activity board, ack log.

None of this coordinates anything: it records what a unit did (acknowledged records, lock or
lease tenures, waits), simulates model time, and publishes which units are running so the
recovery lane can spot stuck ones. Both systems get exactly the same apparatus.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sessionlane.system.race.verify import AckEntry, Hold, Result, UnitKind, encode_ack

__all__ = [
    "MODEL_POLL_S",
    "AckLog",
    "ActivityBoard",
    "CallResult",
    "RunningUnit",
    "UnitContext",
    "UnitOutcome",
]

CallResult = Literal["done", "aborted", "cutoff"]
MODEL_POLL_S = 0.005
"""How often an interruptible model call checks its abort predicate (wall seconds)."""


@dataclass(frozen=True)
class UnitOutcome:
    """What a backend reports for a unit; the context supplies records, holds and waits."""

    result: Result
    reason: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class RunningUnit:
    """One activity-board entry: a unit that has started its work (holds or held its lock)."""

    unit: str
    lane: str
    session: str
    since: float
    """``time.monotonic()`` when the unit started running."""


class ActivityBoard:
    """Which units are running, one small JSON file each in a shared directory.

    Stands in for the runtime's diagnostic session state (its active-run index, read by the
    stuck-session recovery), which upstream is in-process; the race's lanes are separate
    processes, so it lives on disk, for both systems.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def mark(self, unit: RunningUnit) -> None:
        target = self._directory / f"{unit.unit}.json"
        temp = target.with_suffix(".tmp")
        temp.write_text(json.dumps(unit.__dict__))
        os.replace(temp, target)

    def clear(self, unit: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._directory / f"{unit}.json").unlink()

    def scan(self) -> list[RunningUnit]:
        units = []
        for path in self._directory.glob("*.json"):
            try:
                units.append(RunningUnit(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue  # cleared or half-replaced meanwhile
        return units


class AckLog:
    """A lane's acknowledgement log: one ``O_APPEND`` write per entry, thread-safe."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._mutex = threading.Lock()

    def write(self, entry: AckEntry) -> None:
        line = (encode_ack(entry) + "\n").encode()
        with self._mutex:
            os.write(self._fd, line)

    def close(self) -> None:
        with self._mutex, contextlib.suppress(OSError):
            os.close(self._fd)


class UnitContext:
    """The apparatus one unit runs with: simulated model calls and bookkeeping.

    Backends call ``ack`` after the system acknowledged records, ``add_hold`` for each lock or
    lease tenure, ``add_wait`` for time spent waiting on coordination, and ``running`` /
    ``idle`` around the unit's work. ``model_call`` sleeps the simulated model time, never
    past the run's hard stop.
    """

    def __init__(
        self,
        *,
        kind: UnitKind,
        unit: str,
        lane: str,
        session: str,
        path: Path,
        planned: int,
        hard_stop: float,
        board: ActivityBoard,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.kind: UnitKind = kind
        self.unit = unit
        self.lane = lane
        self.session = session
        self.path = path
        self.planned = planned
        self.hard_stop = hard_stop
        self._board = board
        self._monotonic = monotonic
        self._sleep = sleep
        self._mutex = threading.Lock()
        self._acked: list[int] = []
        self._holds: list[Hold] = []
        self._wait_ms = 0.0
        self.interrupted = False
        self.started = monotonic()
        self._marked = False

    def now(self) -> float:
        return self._monotonic()

    def remaining_s(self) -> float:
        """Wall seconds left before the run's hard stop."""
        return max(0.0, self.hard_stop - self._monotonic())

    def ack(self, seqs: Iterable[int]) -> None:
        with self._mutex:
            self._acked.extend(seqs)

    def add_hold(self, acquired_at: float, released_at: float | None, waited_ms: float) -> None:
        with self._mutex:
            self._holds.append(Hold(acquired_at, released_at, waited_ms))

    def add_wait(self, ms: float) -> None:
        with self._mutex:
            self._wait_ms += ms

    def running(self) -> None:
        """Publish the unit on the activity board (once)."""
        if not self._marked:
            self._marked = True
            self._board.mark(RunningUnit(self.unit, self.lane, self.session, self._monotonic()))

    def idle(self) -> None:
        if self._marked:
            self._board.clear(self.unit)

    def model_call(self, seconds: float, abort: Callable[[], bool] | None = None) -> CallResult:
        """Simulate a model call of ``seconds``; stop early if ``abort()`` turns true."""
        end = self._monotonic() + seconds
        stop = min(end, self.hard_stop)
        while True:
            if abort is not None and abort():
                return "aborted"
            left = stop - self._monotonic()
            if left <= 0:
                return "cutoff" if end > self.hard_stop else "done"
            self._sleep(left if abort is None else min(left, MODEL_POLL_S))

    def entry(self, outcome: UnitOutcome) -> AckEntry:
        """The log entry for this unit with ``outcome`` (a snapshot: safe from any thread)."""
        with self._mutex:
            return AckEntry(
                kind=self.kind,
                unit=self.unit,
                lane=self.lane,
                session=self.session,
                result=outcome.result,
                reason=outcome.reason,
                records=tuple(self._acked),
                planned=self.planned,
                wait_ms=round(self._wait_ms, 3),
                holds=tuple(self._holds),
                started=self.started,
                ended=self._monotonic(),
                interrupted=self.interrupted,
                detail=outcome.detail[:500],
            )
