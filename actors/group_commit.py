"""Group commit for the SessionFile actor: which acknowledgements wait, and until when. Pure.

``Outbox`` holds a file actor's messages to its lanes, in order per lane, behind the
acknowledgements that an fdatasync has not covered yet. ``CommitPolicy`` decides, at the end
of each transport pass, whether the held batch is synced now, gets one more pass, or waits for
an expected sibling writer. Neither does I/O nor reads a clock: the actor passes the time in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from sessionlane.messages.internal import FileReply

__all__ = ["CommitPolicy", "Decision", "Outbox", "Outgoing"]

MAX_BATCH_MS = 50.0
"""A batch is synced at the latest this long after its first append was written."""
MAX_BATCH_WRITES = 256
"""... or once it covers this many appends."""
MIN_WAIT_MS = 1.0
MAX_WAIT_MS = 25.0
"""Bounds of how long a batch waits for an expected sibling's append (see ``CommitPolicy``)."""
SIBLING_MS = 100.0
"""A lane that appended within this long is expected to append again (see ``CommitPolicy``)."""


@dataclass
class Outgoing:
    """A message to a lane, possibly held until the next sync."""

    lane: str
    address: Any
    message: FileReply
    needs_sync: bool
    """It acknowledges an fsync append: never sent before the fdatasync covering it."""
    key: Any = None
    """The de-duplication key of the append it acknowledges, if any."""


class Outbox:
    """Messages to lanes, in order per lane, held back by unsynced acknowledgements. Pure.

    A message goes out at once unless it must wait for a sync or its lane already has a held
    message (then it queues behind, so a lane never sees a later reply before an earlier one).
    Everything held is released by ``take_all`` after the sync.
    """

    def __init__(self) -> None:
        self._lanes: dict[str, deque[Outgoing]] = {}
        self.held = 0
        self.acks: set[Any] = set()
        """The de-duplication keys of the held acknowledgements (``Outgoing.key``)."""

    def __bool__(self) -> bool:
        return self.held > 0

    def put(self, out: Outgoing) -> bool:
        """Hold ``out`` if it has to wait; True when it may be sent now (then it is not held)."""
        queue = self._lanes.get(out.lane)
        if queue is None and not out.needs_sync:
            return True
        self._lanes.setdefault(out.lane, deque()).append(out)
        self.held += 1
        if out.key is not None:
            self.acks.add(out.key)
        return False

    def take_all(self) -> list[Outgoing]:
        """Everything held, each lane's messages in order."""
        taken = [out for queue in self._lanes.values() for out in queue]
        self._lanes.clear()
        self.held = 0
        self.acks.clear()
        return taken


Decision = Literal["sync", "pass", "wait"]


class CommitPolicy:
    """When a batch of held acknowledgements is synced (group commit). Pure: times are inputs.

    A batch opens with its first fsync append. At the end of each transport pass it is:

    * synced once it is ``max_batch_ms`` old or covers ``max_writes`` appends;
    * given one more pass if this pass brought more appends (a burst is still arriving);
    * kept waiting while a *sibling* is expected: a lane that appended within ``sibling_ms``
      but has no append in this batch, when other lanes may write at all (the path is free or
      held by a short write). The wait ends with the next append (which re-decides), once
      every sibling has joined, or when no append came for ``wait_ms()``: twice the usual
      gap between appends (an EWMA), within ``[min_wait_ms, max_wait_ms]``, and never longer
      than an fdatasync usually takes (an EWMA of the measured ones): waiting longer than a
      sync costs more than the sync it saves, so on a disk that syncs in under
      ``min_wait_ms`` a batch never waits (it still gathers whatever one pass brings);
    * otherwise synced at once: a lone writer never waits.

    This is PostgreSQL's ``commit_delay`` with ``commit_siblings``, with the delay scaled to
    how fast appends actually arrive: the wait is paid only while other writers are active.
    """

    def __init__(
        self,
        *,
        max_batch_ms: float = MAX_BATCH_MS,
        min_wait_ms: float = MIN_WAIT_MS,
        max_wait_ms: float = MAX_WAIT_MS,
        sibling_ms: float = SIBLING_MS,
        max_writes: int = MAX_BATCH_WRITES,
    ):
        self.max_batch_ms = max_batch_ms
        self.min_wait_ms = min_wait_ms
        self.max_wait_ms = max_wait_ms
        self.sibling_ms = sibling_ms
        self.max_writes = max_writes
        self.started: float | None = None
        self.writes = 0
        self.lanes: set[Any] = set()
        self.recent: dict[Any, float] = {}  # lane -> when it last appended
        self.last: float | None = None  # when the last append (of any lane) was written
        self.gap_ms = min_wait_ms  # EWMA of the time between appends while writers are active
        self.sync_ms = max_wait_ms  # EWMA of fdatasync durations (until measured: assume slow)
        self.mark = 0  # ``writes`` when the current pass began

    def wrote(self, lane: Any, now: float) -> None:
        """An fsync append of ``lane`` was written and its acknowledgement is held."""
        if self.last is not None and now - self.last < self.sibling_ms:
            self.gap_ms += 0.25 * (now - self.last - self.gap_ms)
        self.last = now
        if self.started is None:
            self.started = now
        self.writes += 1
        self.lanes.add(lane)
        self.recent[lane] = now

    def synced(self, duration_ms: float) -> None:
        """An fdatasync took ``duration_ms``."""
        self.sync_ms += 0.25 * (duration_ms - self.sync_ms)

    def begin_pass(self) -> None:
        self.mark = self.writes

    def grew(self) -> bool:
        """Appends were written since ``begin_pass``."""
        return self.writes > self.mark

    def wait_ms(self) -> float:
        return min(max(2.0 * self.gap_ms, self.min_wait_ms), self.max_wait_ms, self.sync_ms)

    def deadline(self) -> float:
        """When a waiting batch is synced if nothing else happens."""
        if self.started is None or self.last is None:
            return 0.0
        return min(self.started + self.max_batch_ms, self.last + self.wait_ms())

    def decide(self, now: float, *, others_may_write: bool) -> Decision:
        if self.started is None:
            return "sync"
        if now - self.started >= self.max_batch_ms or self.writes >= self.max_writes:
            return "sync"
        if self.grew():
            return "pass"
        worth_it = self.sync_ms >= self.min_wait_ms
        if others_may_write and worth_it and now < self.deadline() and self.siblings(now):
            return "wait"
        return "sync"

    def siblings(self, now: float) -> bool:
        """Is a recently active lane missing from this batch? (Forgets inactive lanes.)"""
        for lane, when in list(self.recent.items()):
            if now - when >= self.sibling_ms:
                del self.recent[lane]
        return any(lane not in self.lanes for lane in self.recent)

    def committed(self) -> None:
        self.started = None
        self.writes = 0
        self.mark = 0
        self.lanes.clear()
