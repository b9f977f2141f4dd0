"""What the Registry keeps: one ``FileEntry`` per path it serves, and its fan-outs.

``FileEntry`` is the Registry's record of one path's SessionFile (its actor, incarnation,
count of forwarded messages, lanes, aliases, recent restarts, messages held until it starts).

A fan-out is a status or drain request sent to every SessionFile, then answered.
``Gathers`` is a part of ``sessionlane.actors.registry.Registry`` with its own state, pure: it
numbers each fan-out, records which children it still waits for and what they answered, and returns
each fan-out once it is complete (every child answered, or is gone, or its timer fired). The
Registry sends the requests, arms the ``GatherTimeout`` and answers with what it returns.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from sessionlane.actors.ahead import BoundAhead
from sessionlane.messages.wire import FileStatus

__all__ = ["FileEntry", "Gather", "Gathers"]

RESTART_WINDOW_MS = 60_000.0
"""Restarts of a path's SessionFile are counted over this window."""


@dataclass
class FileEntry:
    """The Registry's record of the SessionFile of one canonical path."""

    path: str
    address: Any
    """None while the path's previous actor is still exiting (see ``pending``)."""
    incarnation: int
    key: str
    """Stable key of this child actor (see ``Registry.child_key``)."""
    forwarded: int = 0
    lanes: dict[str, Any] = field(default_factory=dict)
    aliases: set[str] = field(default_factory=set)
    """Raw spellings routed here (bounded), so lanes can match requests still unanswered."""
    restarts: deque[float] = field(default_factory=deque)
    pending: list[Any] = field(default_factory=list)
    """Messages for this file held until its actor is started (``address`` is None)."""
    bound: BoundAhead | None = None
    """The channel listener bound ahead of its new actor (``sessionlane.actors.ahead``),
    until the ask that activated the file is answered with it."""

    def died(self, now: float) -> int:
        """Its actor died at ``now``: how many times within the last ``RESTART_WINDOW_MS``."""
        self.restarts.append(now)
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW_MS:
            self.restarts.popleft()
        return len(self.restarts)


@dataclass
class Gather:
    """A fan-out waiting for answers (status or drain)."""

    reply_to: Any
    request_id: Any
    waiting: set[str]
    """Child keys (``Registry.child_key``) not answered yet."""
    answers: list[FileStatus] = field(default_factory=list)
    kind: Literal["status", "drain"] = "status"


class Gathers:
    """The fan-outs in progress, by number."""

    def __init__(self) -> None:
        self.open: dict[int, Gather] = {}
        self.ids = itertools.count(1)

    def start(self, gather: Gather) -> int:
        """Record ``gather``; its number (for the ``GatherTimeout`` and the queries)."""
        qid = next(self.ids)
        self.open[qid] = gather
        return qid

    def status(self, qid: int, key: str | None, status: FileStatus) -> Gather | None:
        """Child ``key`` answered status query ``qid``; the gather if that completed it."""
        gather = self.open.get(qid)
        if gather is None:
            return None
        if key is not None:
            gather.waiting.discard(key)
        gather.answers.append(status)
        return self.finish(qid)

    def drained(self, key: str | None) -> list[Gather]:
        """Child ``key`` drained: the drain gathers that completed."""
        return [
            done
            for qid, gather in list(self.open.items())
            if gather.kind == "drain" and key in gather.waiting
            for done in self._without(qid, key)
        ]

    def gone(self, key: str) -> list[Gather]:
        """Child ``key`` will never answer (it died, or never started): the completed gathers."""
        return [
            done
            for qid, gather in list(self.open.items())
            if key in gather.waiting
            for done in self._without(qid, key)
        ]

    def finish(self, qid: int, *, force: bool = False) -> Gather | None:
        """The gather ``qid`` if it is complete (or ``force``: its timer fired), forgotten."""
        gather = self.open.get(qid)
        if gather is None or (gather.waiting and not force):
            return None
        del self.open[qid]
        return gather

    def _without(self, qid: int, key: str) -> list[Gather]:
        self.open[qid].waiting.discard(key)
        done = self.finish(qid)
        return [done] if done is not None else []
