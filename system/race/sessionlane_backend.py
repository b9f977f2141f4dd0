"""The race's sessionlane backend, written against the public client (docs/contract.md).

``sessionlane.system.client`` is imported lazily, inside the lane process, so the rest of the race
(and its tests) work without it. A turn is one ``prompt`` lease held across its model calls: no
release window, hence no fence to trip; contention becomes a queue (its cost shows up in
``wait_ms``). Heartbeats use ``on_contention="skip"``; compaction rewrites under a
``compaction`` lease; recovery goes through ``sl.recover``, which asks the holder to abort and
revokes it after the grace.

Assumptions about the client, to check when it lands (the lead finishes this backend):

* ``connect(address, token=...)`` is a context manager; one connection per (lane, session)
  here, so nothing assumes a connection is thread-safe;
* ``lane.lease(...)`` is a context manager yielding a lease or None when skipped;
  ``lease.append(*records)``, ``lease.rewrite(records)``, ``lease.abort_requested`` and
  ``lease.revoked`` behave as documented;
* ``sl.recover(path, reason=..., grace=...)`` returns a granted lease with
  ``release(quiet=True)``;
* errors carry the wire ``code`` (``sessionlane.messages.errors``): ``lease_timeout``,
  ``contended``, ``stale_fence`` (revoked or stale), others.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import time
from collections.abc import Callable
from typing import Any

from sessionlane.system.race._apparatus import UnitContext, UnitOutcome
from sessionlane.system.race.workload import (
    LANE_PRIORITY,
    CompactionPlan,
    LaneKind,
    Plan,
    TurnPlan,
    compact_transcript,
)

__all__ = ["SessionlaneBackend"]

_REASON_BY_CODE = {
    "lease_timeout": "lock_timeout",
    "contended": "contended",
    "stale_fence": "revoked",
    "queue_full": "contended",
}


class SessionlaneBackend:
    """sessionlane through its Python client at ``address``."""

    name = "sessionlane"

    def __init__(self, address: str, token: str | None = None) -> None:
        self.address = address
        self.token = token

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "token": self.token}

    def open_lane(self, lane: LaneKind, plan: Plan) -> _SessionlaneLane:
        client = importlib.import_module("sessionlane.system.client")
        return _SessionlaneLane(client, self.address, self.token, lane, plan)


class _SessionlaneLane:
    """One lane kind in one process: a connection and a lane per session, opened lazily."""

    def __init__(
        self, client: Any, address: str, token: str | None, lane: LaneKind, plan: Plan
    ) -> None:
        self._client = client
        self._address = address
        self._token = token
        self._kind = lane
        self._plan = plan
        self._stack = contextlib.ExitStack()
        self._mutex = threading.Lock()
        self._conns: dict[str, Any] = {}
        self._lanes: dict[str, Any] = {}
        # OpenClaw's lanes are serial command queues: one turn per (lane, session) at a time.
        # It also keeps the same lane from re-entering its own lease (reentrancy is by lane).
        self._serial: dict[str, threading.Lock] = {s: threading.Lock() for s in plan.sessions}
        # sessionlane's own guidance: never wait less than a max hold (docs/contract.md, Config).
        self._wait_timeout_s = (plan.lock_policy.max_hold_ms / 1000.0) + plan.recovery.grace_s

    # -- units --------------------------------------------------------------------------------

    def run_turn(self, turn: TurnPlan, ctx: UnitContext) -> UnitOutcome:
        serial = self._serial[turn.session]
        if turn.on_contention == "skip" and serial.locked():
            return UnitOutcome("skipped", "busy")
        return self._serialized(
            ctx,
            serial,
            lambda: self._lane(turn.session).lease(
                str(ctx.path),
                purpose="prompt",
                wait_timeout=self._wait(ctx),
                on_contention=turn.on_contention,
            ),
            lambda lease: self._write_turn(turn, lease, ctx),
        )

    def run_compaction(self, compaction: CompactionPlan, ctx: UnitContext) -> UnitOutcome:
        def body(lease: Any) -> UnitOutcome:
            data = ctx.path.read_bytes()
            call = ctx.model_call(compaction.summarise_s, abort=lambda: _aborting(lease))
            if call == "cutoff":
                return UnitOutcome("cutoff")
            if call == "aborted":
                return UnitOutcome("failed", "aborted", "compaction yielded to recovery")
            if not compaction.completes:
                return UnitOutcome("failed", "compaction_timeout")
            lease.rewrite(
                compact_transcript(
                    data,
                    unit=compaction.unit,
                    session=compaction.session,
                    keep_last=compaction.keep_last,
                )
            )
            return UnitOutcome("completed")

        return self._serialized(
            ctx,
            self._serial[compaction.session],
            lambda: self._lane(compaction.session).lease(
                str(ctx.path),
                purpose="compaction",
                wait_timeout=self._wait(ctx),
                on_contention="wait",
            ),
            body,
        )

    def run_recovery(self, turn: TurnPlan, ctx: UnitContext, stuck_unit: str) -> UnitOutcome:
        @contextlib.contextmanager
        def recover() -> Any:
            lease = self._conn(turn.session).recover(
                str(ctx.path), reason=f"stuck: {stuck_unit}", grace=self._plan.recovery.grace_s
            )
            try:
                yield lease
            finally:
                lease.release(quiet=True)  # a lease revoked meanwhile is not an error here

        return self._serialized(
            ctx,
            self._serial[turn.session],
            recover,
            lambda lease: self._write_turn(turn, lease, ctx),
        )

    def close(self) -> None:
        with self._mutex:
            self._stack.close()

    # -- internals ----------------------------------------------------------------------------

    def _wait(self, ctx: UnitContext) -> float:
        return max(0.001, min(self._wait_timeout_s, ctx.remaining_s()))

    def _serialized(
        self,
        ctx: UnitContext,
        serial: threading.Lock,
        open_lease: Callable[[], Any],
        body: Callable[[Any], UnitOutcome],
    ) -> UnitOutcome:
        """In-process lane queue, then the lease; errors become outcomes by wire code."""
        started = time.monotonic()
        if not serial.acquire(timeout=max(0.001, ctx.remaining_s())):
            ctx.add_wait((time.monotonic() - started) * 1000.0)
            return UnitOutcome("cutoff")
        ctx.add_wait((time.monotonic() - started) * 1000.0)
        try:
            requested = time.monotonic()
            acquired: float | None = None
            try:
                with open_lease() as lease:
                    acquired = time.monotonic()
                    waited_ms = (acquired - requested) * 1000.0
                    ctx.add_wait(waited_ms)
                    if lease is None:
                        return UnitOutcome("skipped", "busy")
                    ctx.running()
                    try:
                        return body(lease)
                    finally:
                        ctx.add_hold(acquired, time.monotonic(), waited_ms)
            except Exception as error:
                if acquired is None:
                    ctx.add_wait((time.monotonic() - requested) * 1000.0)
                code = str(getattr(error, "code", "internal"))
                if code == "lease_timeout" and ctx.remaining_s() <= 0.01:
                    return UnitOutcome("cutoff", None, str(error))
                return UnitOutcome("failed", _REASON_BY_CODE.get(code, "error"), f"{code}: {error}")
        finally:
            serial.release()
            ctx.idle()

    def _write_turn(self, turn: TurnPlan, lease: Any, ctx: UnitContext) -> UnitOutcome:
        lease.append(turn.record(0))
        ctx.ack([0])
        for window, seqs in turn.window_seqs():
            if not ctx.interrupted:
                call = ctx.model_call(window.model_s, abort=lambda: _aborting(lease))
                if call == "cutoff":
                    return UnitOutcome("cutoff")
                # Recovery asked us to stop: wrap up now (write what is left, skip the model
                # time) so the recovery gets the file within its grace.
                ctx.interrupted = call == "aborted"
            lease.append(*[turn.record(seq) for seq in seqs])
            ctx.ack(seqs)
        return UnitOutcome("completed")

    def _conn(self, session: str) -> Any:
        with self._mutex:
            if session not in self._conns:
                self._conns[session] = self._stack.enter_context(
                    self._client.connect(self._address, token=self._token)
                )
            return self._conns[session]

    def _lane(self, session: str) -> Any:
        conn = self._conn(session)
        with self._mutex:
            if session not in self._lanes:
                name = f"agent:main:{self._kind}:{session}"
                self._lanes[session] = conn.lane(name, priority=LANE_PRIORITY[self._kind])
            return self._lanes[session]


def _aborting(lease: Any) -> bool:
    return bool(getattr(lease, "abort_requested", False) or getattr(lease, "revoked", False))
