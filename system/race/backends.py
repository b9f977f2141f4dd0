"""The two systems the race drives, behind one interface.

A ``Backend`` is built in the parent, described by a JSON ``spec()`` and rebuilt with
``backend_from_spec`` inside each lane process, where ``open_lane`` returns the ``LaneRunner``
that executes that lane's units. A runner reports an outcome per unit; records, tenures and
waits go through the ``UnitContext`` so both systems are measured by the same code.

``BaselineBackend`` runs OpenClaw's protocol (``sessionlane.system.race.baseline``). The sessionlane
backend lives in ``sessionlane.system.race.sessionlane_backend`` (its client is imported lazily).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sessionlane.system.race._apparatus import UnitContext, UnitOutcome
from sessionlane.system.race.baseline import (
    EmbeddedAttemptSessionFileOwnerTimeoutError,
    EmbeddedAttemptSessionLockController,
    EmbeddedAttemptSessionTakeoverError,
    SessionFileOwnerRegistry,
    SessionWriteLockError,
    SessionWriteLockManager,
    SessionWriteLockStaleError,
    SessionWriteLockTimeoutError,
    append_records,
    default_manager,
    default_owner_registry,
    lock_path_for,
    register_cleanup_handlers,
)
from sessionlane.system.race.workload import (
    CompactionPlan,
    LaneKind,
    Plan,
    TurnPlan,
    compact_transcript,
)

__all__ = [
    "Backend",
    "BaselineBackend",
    "LaneRunner",
    "backend_from_spec",
    "rewrite_file",
]


class LaneRunner(Protocol):
    """Executes one lane's units inside a lane process; methods may run on many threads."""

    def run_turn(self, turn: TurnPlan, ctx: UnitContext) -> UnitOutcome:
        """Run a planned turn: prompt record, model calls, records after each call."""
        ...

    def run_compaction(self, compaction: CompactionPlan, ctx: UnitContext) -> UnitOutcome:
        """Read the transcript, summarise (model time), rewrite it with the summary."""
        ...

    def run_recovery(self, turn: TurnPlan, ctx: UnitContext, stuck_unit: str) -> UnitOutcome:
        """Recover a session whose ``stuck_unit`` ran past the threshold, running ``turn``."""
        ...

    def close(self) -> None:
        """Release whatever the lane process holds (connections, locks)."""
        ...


class Backend(Protocol):
    """A system under test."""

    name: str

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description that ``backend_from_spec`` turns back into self."""
        ...

    def open_lane(self, lane: LaneKind, plan: Plan) -> LaneRunner:
        """Called once in the lane process, on its main thread, before the run starts."""
        ...


def backend_from_spec(spec: dict[str, Any]) -> Backend:
    """Rebuild a backend in a lane process."""
    name = spec.get("name")
    if name == "baseline":
        return BaselineBackend()
    if name == "sessionlane":
        from sessionlane.system.race.sessionlane_backend import SessionlaneBackend

        return SessionlaneBackend(str(spec["address"]), token=spec.get("token"))
    raise ValueError(f"unknown backend {name!r}")


def rewrite_file(path: Path, records: list[dict[str, object]]) -> None:
    """Replace ``path`` by a temp file + rename: a new inode, as Pi's rewrite (#84583).

    No fsync, like upstream's transcript writes.
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_bytes(b"".join(_line(record) for record in records))
    os.replace(temp, path)


def _line(record: dict[str, object]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


# ---------------------------------------------------------------------------------------------
# The baseline


class BaselineBackend:
    """OpenClaw's lock file + fence, one ``EmbeddedAttemptSessionLockController`` per unit."""

    name = "baseline"

    def spec(self) -> dict[str, Any]:
        return {"name": self.name}

    def open_lane(self, lane: LaneKind, plan: Plan) -> LaneRunner:
        manager = default_manager(plan.lock_policy.watchdog_interval_ms)
        register_cleanup_handlers(manager)  # exit/signal release, as upstream
        return _BaselineLane(plan, manager, default_owner_registry())


class _BaselineLane:
    """Runs units the way an OpenClaw gateway process would, one attempt per unit.

    Each attempt takes the in-process session-file owner (#87159, timeout = maxHoldMs), then a
    controller that acquires the file lock eagerly. Turns release it around every model call
    and reacquire it with the fence; compaction holds it throughout (``session.compact`` is
    always locked, as upstream) and rewrites the file by rename.

    Simplification in the baseline's favour: upstream keeps the lock while tools execute
    between two model calls (``beforeToolCall`` is always locked); here tool time is part of
    the released model window, so lock holds are shorter than upstream's.
    """

    def __init__(
        self, plan: Plan, manager: SessionWriteLockManager, owners: SessionFileOwnerRegistry
    ) -> None:
        self._plan = plan
        self._policy = plan.lock_policy
        self._manager = manager
        self._owners = owners

    def run_turn(self, turn: TurnPlan, ctx: UnitContext) -> UnitOutcome:
        if turn.on_contention == "skip" and self._session_busy(ctx.path):
            # Heartbeat runner: "requests-in-flight" when the session is busy (PR #40526).
            return UnitOutcome("skipped", "busy")
        return self._attempt(turn, ctx)

    def run_recovery(self, turn: TurnPlan, ctx: UnitContext, stuck_unit: str) -> UnitOutcome:
        # The runtime aborts the stuck run and re-fires a new one on the same file. The abort
        # is in-process only and often not observed by a hung stream (#86816), so here the
        # stuck unit keeps running and the re-fired run races it (the #85913 seed trace).
        return self._attempt(turn, ctx)

    def run_compaction(self, compaction: CompactionPlan, ctx: UnitContext) -> UnitOutcome:
        def body(controller: EmbeddedAttemptSessionLockController) -> UnitOutcome:
            with controller.with_session_write_lock():
                data = ctx.path.read_bytes()
                if ctx.model_call(compaction.summarise_s) == "cutoff":
                    return UnitOutcome("cutoff")
                if not compaction.completes:
                    return UnitOutcome("failed", "compaction_timeout")
                # If the watchdog force-released the lock meanwhile (held past maxHoldMs), we
                # are not told and this rename drops whatever was appended since: upstream too.
                records = compact_transcript(
                    data,
                    unit=compaction.unit,
                    session=compaction.session,
                    keep_last=compaction.keep_last,
                )
                rewrite_file(ctx.path, records)
            return UnitOutcome("completed")

        return self._with_controller(ctx, body)

    def close(self) -> None:
        self._manager.release_all()

    # -- internals ----------------------------------------------------------------------------

    def _session_busy(self, path: Path) -> bool:
        # Upstream asks its in-process lane state; across processes the lock file is the only
        # visible sign of activity (and it is absent while a run streams its prompt).
        return self._owners.is_owned(path) or os.path.exists(lock_path_for(path))

    def _attempt(self, turn: TurnPlan, ctx: UnitContext) -> UnitOutcome:
        def body(controller: EmbeddedAttemptSessionLockController) -> UnitOutcome:
            with controller.with_session_write_lock():
                append_records(ctx.path, [turn.record(0)])
            ctx.ack([0])
            for window, seqs in turn.window_seqs():
                controller.release_for_prompt()
                if ctx.model_call(window.model_s) == "cutoff":
                    return UnitOutcome("cutoff")
                controller.reacquire_after_prompt()
                with controller.with_session_write_lock():
                    append_records(ctx.path, [turn.record(seq) for seq in seqs])
                ctx.ack(seqs)
            return UnitOutcome("completed")

        return self._with_controller(ctx, body)

    def _with_controller(
        self, ctx: UnitContext, body: Callable[[EmbeddedAttemptSessionLockController], UnitOutcome]
    ) -> UnitOutcome:
        """Owner, then controller (eager lock), then ``body``; maps errors to outcomes."""
        started = time.monotonic()
        try:
            owner = self._owners.acquire(ctx.path, self._policy.max_hold_ms)
        except EmbeddedAttemptSessionFileOwnerTimeoutError as error:
            ctx.add_wait((time.monotonic() - started) * 1000.0)
            return UnitOutcome("failed", "owner_timeout", str(error))
        ctx.add_wait(owner.waited_ms)
        controller: EmbeddedAttemptSessionLockController | None = None
        try:
            started = time.monotonic()
            try:
                controller = EmbeddedAttemptSessionLockController(
                    ctx.path, policy=self._policy, manager=self._manager
                )
            except SessionWriteLockError:
                ctx.add_wait((time.monotonic() - started) * 1000.0)
                raise
            ctx.running()
            return body(controller)
        except EmbeddedAttemptSessionTakeoverError as error:
            return UnitOutcome("failed", "takeover_error", str(error))
        except SessionWriteLockTimeoutError as error:
            return UnitOutcome("failed", "lock_timeout", str(error))
        except SessionWriteLockStaleError as error:
            return UnitOutcome("failed", "lock_stale", str(error))
        finally:
            if controller is not None:
                controller.dispose()
                ctx.add_wait(controller.wait_ms)
                for hold in controller.holds:
                    ctx.add_hold(hold.acquired_at, hold.released_at, hold.waited_ms)
            owner.release()
            ctx.idle()
