"""The race's sessionlane backend, in-process against a fake of the public client API.

The real client and service are tested elsewhere; this pins the backend's own logic: one
lease per turn, skip for heartbeats, error codes mapped to failure reasons, recovery
interrupting the holder.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sessionlane.messages.errors import LeaseTimeout
from sessionlane.system.race._apparatus import ActivityBoard, UnitContext
from sessionlane.system.race.backends import rewrite_file
from sessionlane.system.race.baseline import append_records
from sessionlane.system.race.sessionlane_backend import _SessionlaneLane
from sessionlane.system.race.verify import scan_transcript
from sessionlane.system.race.workload import TurnPlan, Window, make_plan


class FakeLease:
    def __init__(self, service: FakeService, path: str) -> None:
        self.service, self.path = service, path
        self.abort_requested = self.revoked = False

    def append(self, *records: dict[str, object]) -> None:
        append_records(self.path, list(records))

    def rewrite(self, records: list[dict[str, object]]) -> None:
        rewrite_file(Path(self.path), records)

    def release(self, *, quiet: bool = False) -> None:
        self.service.release(self)


class FakeService:
    """One holder per path, FIFO-ish waiting on a condition; recover aborts the holder."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.holders: dict[str, FakeLease] = {}

    def grant(self, path: str, timeout: float, skip: bool) -> FakeLease | None:
        with self.cond:
            if skip and path in self.holders:
                return None
            if not self.cond.wait_for(lambda: path not in self.holders, timeout):
                raise LeaseTimeout("not granted in time", path=path)
            lease = self.holders[path] = FakeLease(self, path)
            return lease

    def release(self, lease: FakeLease) -> None:
        with self.cond:
            if self.holders.get(lease.path) is lease:
                del self.holders[lease.path]
                self.cond.notify_all()

    def recover(self, path: str, reason: str, grace: float) -> FakeLease:
        with self.cond:
            holder = self.holders.get(path)
            if holder is not None:
                holder.abort_requested = True
        lease = self.grant(path, grace * 100, skip=False)
        assert lease is not None
        return lease


def fake_client(service: FakeService) -> Any:
    class Lane:
        @contextlib.contextmanager
        def lease(
            self, path: str, *, purpose: str, wait_timeout: float, on_contention: str
        ) -> Iterator[FakeLease | None]:
            lease = service.grant(path, wait_timeout, skip=on_contention == "skip")
            try:
                yield lease
            finally:
                if lease is not None:
                    lease.release()

    class Connection:
        def __enter__(self) -> Connection:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def lane(self, name: str, priority: str) -> Lane:
            return Lane()

        def recover(self, path: str, *, reason: str, grace: float) -> FakeLease:
            return service.recover(path, reason, grace)

    return SimpleNamespace(connect=lambda address, token=None: Connection())


@pytest.fixture
def service() -> FakeService:
    return FakeService()


def context(tmp_path: Path, unit: str, planned: int, hard_stop_s: float = 10.0) -> UnitContext:
    path = tmp_path / "session-00.jsonl"
    path.touch()
    return UnitContext(
        kind="turn",
        unit=unit,
        lane="channel",
        session="session-00",
        path=path,
        planned=planned,
        hard_stop=time.monotonic() + hard_stop_s,
        board=ActivityBoard(tmp_path / "activity"),
    )


def turn(name: str, lane: str, model_s: float) -> TurnPlan:
    return TurnPlan(
        turn=name,
        lane=lane,  # type: ignore[arg-type]
        session="session-00",
        start_s=0.0,
        windows=(Window(model_s, 1), Window(0.0, 2)),
        sizes=(10, 10, 10, 10),
    )


def test_a_turn_holds_one_lease_across_its_model_calls(
    tmp_path: Path, service: FakeService
) -> None:
    plan = make_plan(1, 1, 5.0, 20.0)
    lane = _SessionlaneLane(fake_client(service), "tcp://x", None, "channel", plan)
    ctx = context(tmp_path, "t1", 4)
    outcome = lane.run_turn(turn("t1", "channel", 0.01), ctx)
    entry = ctx.entry(outcome)
    assert (entry.result, entry.records, len(entry.holds)) == ("completed", (0, 1, 2, 3), 1)
    assert scan_transcript(ctx.path.read_bytes()).refs == tuple(("t1", s) for s in range(4))
    lane.close()


def test_a_heartbeat_skips_a_held_session_and_a_waiter_times_out(
    tmp_path: Path, service: FakeService
) -> None:
    plan = make_plan(1, 1, 5.0, 20.0)
    ctx = context(tmp_path, "hb", 2)
    blocker = service.grant(str(ctx.path), 1.0, skip=False)
    assert blocker is not None
    heartbeat = _SessionlaneLane(fake_client(service), "tcp://x", None, "heartbeat", plan)
    assert heartbeat.run_turn(turn("hb", "heartbeat", 0.0), ctx).result == "skipped"
    channel = _SessionlaneLane(fake_client(service), "tcp://x", None, "channel", plan)
    channel._wait_timeout_s = 0.05
    outcome = channel.run_turn(turn("t2", "channel", 0.0), context(tmp_path, "t2", 4))
    assert (outcome.result, outcome.reason) == ("failed", "lock_timeout")
    blocker.release()


def test_recovery_makes_the_holder_wrap_up_and_then_runs_its_turn(
    tmp_path: Path, service: FakeService
) -> None:
    plan = make_plan(1, 1, 5.0, 20.0)
    channel = _SessionlaneLane(fake_client(service), "tcp://x", None, "channel", plan)
    recovery = _SessionlaneLane(fake_client(service), "tcp://x", None, "recovery", plan)
    stuck_ctx = context(tmp_path, "stuck", 4)
    results: dict[str, Any] = {}

    def run_stuck() -> None:
        results["stuck"] = channel.run_turn(turn("stuck", "channel", 30.0), stuck_ctx)

    thread = threading.Thread(target=run_stuck)
    thread.start()
    with service.cond:
        assert service.cond.wait_for(lambda: str(stuck_ctx.path) in service.holders, 5.0)
    rescue_ctx = context(tmp_path, "rescue", 4)
    outcome = recovery.run_recovery(turn("rescue", "recovery", 0.0), rescue_ctx, "stuck")
    thread.join(5.0)
    assert outcome.result == "completed"
    assert results["stuck"].result == "completed" and stuck_ctx.interrupted
    refs = scan_transcript(stuck_ctx.path.read_bytes()).refs
    assert [turn for turn, _ in refs] == ["stuck"] * 4 + ["rescue"] * 4  # never interleaved
