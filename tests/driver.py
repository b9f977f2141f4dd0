"""Driving sessionlane's actors from outside the actor system, with explicit message order.

``ActorDriver`` plays the agent: it starts the Registry, opens Lane actors and exchanges the
wire messages with them through the external endpoint of an ``ActorSystem`` (any base). It is
what the actor-level tests use, and what the gateway-less embedded mode is built on.

thespian's ``ask`` returns whatever message arrives first, so the driver never relies on it:
it ``tell``s, then ``listen``s until the message it waits for arrives, keeping every other
message (events, ``queued`` notes, replies to other requests) in per-lane inboxes.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sessionlane.actors.lane import Lane
from sessionlane.actors.registry import REGISTRY_NAME, Registry
from sessionlane.messages.errors import Unavailable, error_for
from sessionlane.messages.internal import (
    AgentGone,
    Configure,
    Configured,
    Drain,
    Drained,
    FileSettings,
    LaneOutput,
    Opened,
    OpenLane,
    StatusQuery,
)
from sessionlane.messages.wire import Error, Priority, Reply, Status, StatusReply

__all__ = ["ActorDriver", "LaneHandle", "file_settings"]

_FINAL_EXCLUDES = ("queued",)


def file_settings(**overrides: Any) -> FileSettings:
    """Per-file settings with the service defaults, for tests and embedded use."""
    base: dict[str, Any] = {
        "max_hold_ms": 300_000,
        "wait_timeout_ms": 600_000,
        "aging_ms": 10_000,
        "max_queue": 256,
        "idle_ms": 60_000,
        "durability": "fsync",
        "max_record_bytes": 1_048_576,
        "legacy_lock": False,
    }
    base.update(overrides)
    return FileSettings(**base)


@dataclass
class LaneHandle:
    name: str
    uid: str
    address: Any
    inbox: list[Reply] = field(default_factory=list)


class ActorDriver:
    """An agent outside the actor system, talking to Lane actors."""

    def __init__(self, asys: Any, *, timeout: float = 10.0):
        self.asys = asys
        self.timeout = timeout
        self.registry: Any = None
        self.lanes: dict[str, LaneHandle] = {}
        self.other: list[Any] = []
        self._ids = itertools.count(1)

    def start(
        self,
        roots: Sequence[str],
        settings: FileSettings | None = None,
        suffixes: Sequence[str] = (".jsonl",),
    ) -> ActorDriver:
        self.registry = self.asys.createActor(Registry, globalName=REGISTRY_NAME)
        self.asys.tell(
            self.registry,
            Configure(roots=list(roots), suffixes=list(suffixes), file=settings or file_settings()),
        )
        self.wait_for(lambda m: isinstance(m, Configured), "the registry to be configured")
        return self

    def next_id(self) -> int:
        return next(self._ids)

    # Lanes ---------------------------------------------------------------------------------

    def open_lane(self, name: str, priority: Priority = "interactive") -> LaneHandle:
        uid = f"{name}#{uuid.uuid4().hex[:8]}"
        address = self.asys.createActor(Lane)
        handle = LaneHandle(name, uid, address)
        self.lanes[uid] = handle
        self.asys.tell(
            address, OpenLane(name=name, priority=priority, registry=self.registry, uid=uid)
        )
        self.wait_for(lambda m: isinstance(m, Opened) and m.uid == uid, f"lane {name} to open")
        return handle

    def send(self, lane: LaneHandle, request: Any) -> Any:
        """Send a request (its ``id`` is set if missing); returns the id."""
        if getattr(request, "id", None) is None:
            request = request.model_copy(update={"id": self.next_id()})
        self.asys.tell(lane.address, request)
        return request.id

    def call(self, lane: LaneHandle, request: Any, timeout: float | None = None) -> Reply:
        """Send; wait for the final reply (``queued`` notes stay in the inbox)."""
        rid = self.send(lane, request)
        return self.reply_to(lane, rid, timeout)

    def reply_to(self, lane: LaneHandle, rid: Any, timeout: float | None = None) -> Reply:
        return self.expect(
            lane,
            lambda r: r.id == rid and r.type not in _FINAL_EXCLUDES,
            timeout,
            what=f"the reply to request {rid}",
        )

    def expect(
        self,
        lane: LaneHandle,
        match: Callable[[Reply], bool],
        timeout: float | None = None,
        *,
        what: str = "a message",
    ) -> Reply:
        """Take the first message in ``lane``'s inbox matching ``match``, listening as needed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for i, message in enumerate(lane.inbox):
                if match(message):
                    return lane.inbox.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(
                    f"timed out waiting for {what} on lane {lane.name}; "
                    f"inbox: {[m.type for m in lane.inbox]}"
                )
            self._pump(remaining)

    def events(self, lane: LaneHandle, kind: str) -> list[Reply]:
        return [m for m in lane.inbox if m.type == kind]

    def gone(self, lane: LaneHandle, reason: str = "agent gone") -> None:
        self.asys.tell(lane.address, AgentGone(reason=reason))

    # Service-wide --------------------------------------------------------------------------

    def status(self, path: str | None = None) -> StatusReply:
        """Status of ``path`` (any spelling) or of every active file.

        Raises the refusal's ``SessionLaneError`` (e.g. ``PathNotAllowed``) if there is one.
        """
        rid = f"status{self.next_id()}"
        self.asys.tell(self.registry, StatusQuery(request=Status(id=rid, path=path)))
        found = self.wait_for(
            lambda m: isinstance(m, StatusReply | Error) and m.id == rid, "status"
        )
        if isinstance(found, Error):
            raise error_for(found.code, found.detail, found.path)
        assert isinstance(found, StatusReply)
        return found

    def drain(self) -> Drained:
        self.asys.tell(self.registry, Drain())
        found = self.wait_for(lambda m: isinstance(m, Drained), "the drain")
        assert isinstance(found, Drained)
        return found

    def wait_for(
        self, match: Callable[[Any], bool], what: str, timeout: float | None = None
    ) -> Any:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for i, message in enumerate(self.other):
                if match(message):
                    return self.other.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"timed out waiting for {what}")
            self._pump(remaining)

    def pump(self, seconds: float = 0.0) -> None:
        """Deliver what has arrived (on the simple base: run the actors) for ``seconds``."""
        self._pump(seconds)

    def _pump(self, timeout: float) -> None:
        # What has already arrived comes first: on simpleSystemBase, listen(t) fires every
        # wakeup due within t before it hands back a reply that is already waiting, so a timer
        # (max hold, grace) would take effect before the replies that preceded it.
        message = self.asys.listen(0)
        if message is None:
            message = self.asys.listen(min(timeout, 0.5))
        if message is None:
            return
        if isinstance(message, LaneOutput):
            handle = self.lanes.get(message.uid)
            if handle is not None:
                handle.inbox.append(message.message)
                return
        self.other.append(message)
