"""The baseline (OpenClaw's lock file + fence) reproduces the failures the field reports.

Cross-process tests drive real child processes line by line over pipes: each step waits for
the child's answer, so the interleaving is forced by messages, never by sleeps.
"""

from __future__ import annotations

import json
import os
import pickle
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessionlane.actors.openclaw_lock import classify_stale, encode_lock_payload, parse_lock_payload
from sessionlane.system.race._lockfile import LockPolicy, inspect_lock_payload
from sessionlane.system.race.backends import rewrite_file
from sessionlane.system.race.baseline import (
    NOOP_LOCK,
    EmbeddedAttemptSessionFileOwnerTimeoutError,
    EmbeddedAttemptSessionLockController,
    EmbeddedAttemptSessionTakeoverError,
    NoopLock,
    SessionFileOwnerRegistry,
    SessionWriteLockManager,
    SessionWriteLockStaleError,
    SessionWriteLockTimeoutError,
    append_records,
    lock_path_for,
)
from sessionlane.system.race.verify import AckEntry, verify
from sessionlane.system.race.workload import compact_transcript

ROOT = Path(__file__).resolve().parents[1]

# A child holding one controller / one raw lock, driven by commands on stdin; one answer line
# per command ("ok ..." or "error <ExceptionName> <message>").
CHILD = r"""
import json, sys
from sessionlane.system.race._lockfile import LockPolicy, SessionWriteLockManager
from sessionlane.system.race.baseline import EmbeddedAttemptSessionLockController, append_records

path = sys.argv[1]
policy = LockPolicy(timeout_ms=float(sys.argv[2]), retry_delay_ms=1.0)
manager = SessionWriteLockManager(start_watchdog=False)
controller = handle = None
print("ready", flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    try:
        if cmd == "open":
            controller = EmbeddedAttemptSessionLockController(path, policy=policy, manager=manager)
        elif cmd == "write":
            with controller.with_session_write_lock():
                append_records(path, [json.loads(arg)])
        elif cmd == "release":
            controller.release_for_prompt()
        elif cmd == "reacquire":
            controller.reacquire_after_prompt()
        elif cmd == "dispose":
            controller.dispose()
        elif cmd == "lock":
            handle = manager.acquire(path, timeout_ms=policy.timeout_ms)
        elif cmd == "unlock":
            handle.release()
        print("ok", flush=True)
    except Exception as error:
        print("error", type(error).__name__, str(error).replace("\n", " "), flush=True)
"""


class Child:
    """One driven child process."""

    def __init__(self, path: Path, timeout_ms: float = 5_000.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(timeout_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert self._read() == "ready"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self, timeout_s: float = 20.0) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            assert selector.select(timeout_s), "child did not answer"
        return self.proc.stdout.readline().strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()


@pytest.fixture
def transcript(tmp_path: Path) -> Path:
    path = tmp_path / "session.jsonl"
    path.touch()
    return path


def record(turn: str, seq: int) -> str:
    return json.dumps({"turn": turn, "seq": seq})


# ---------------------------------------------------------------------------------------------
# Cross-process behaviour


def test_a_write_during_the_released_prompt_window_makes_the_reacquire_fail_with_takeover(
    transcript: Path, children: list[Child]
) -> None:
    lane_a, lane_b = Child(transcript), Child(transcript)
    children += [lane_a, lane_b]
    assert lane_a.ask("open") == "ok"
    assert lane_a.ask("write " + record("a", 0)) == "ok"
    assert lane_a.ask("release") == "ok"  # A streams its model call without the lock
    assert lane_b.ask("open") == "ok"  # so B gets the lock at once
    assert lane_b.ask("write " + record("b", 0)) == "ok"
    assert lane_b.ask("dispose") == "ok"
    answer = lane_a.ask("reacquire")
    assert answer.startswith("error EmbeddedAttemptSessionTakeoverError")
    assert "session file changed while embedded prompt lock was released" in answer
    # Sticky: the reply A would write now is refused too; the user never gets it.
    assert lane_a.ask("write " + record("a", 1)).startswith(
        "error EmbeddedAttemptSessionTakeoverError"
    )
    assert [json.loads(line)["turn"] for line in transcript.read_text().splitlines()] == ["a", "b"]
    assert not os.path.exists(lock_path_for(transcript))  # the failed reacquire let go


def test_without_a_foreign_write_the_reacquire_passes_the_fence(
    transcript: Path, children: list[Child]
) -> None:
    lane_a, lane_b = Child(transcript), Child(transcript)
    children += [lane_a, lane_b]
    assert lane_a.ask("open") == "ok"
    assert lane_a.ask("release") == "ok"
    assert lane_b.ask("open") == "ok"  # B takes and gives back the lock, writing nothing
    assert lane_b.ask("dispose") == "ok"
    assert lane_a.ask("reacquire") == "ok"
    assert lane_a.ask("write " + record("a", 1)) == "ok"
    assert lane_a.ask("release") == "ok"  # its own write moved the fence with it
    assert lane_a.ask("reacquire") == "ok"
    assert lane_a.ask("dispose") == "ok"


def test_a_lock_left_by_a_dead_process_is_reclaimed(
    transcript: Path, children: list[Child]
) -> None:
    holder = Child(transcript)
    children.append(holder)
    assert holder.ask("lock") == "ok"
    payload = json.loads(Path(lock_path_for(transcript)).read_text())
    assert payload["pid"] == holder.pid
    holder.kill()  # SIGKILL: no exit handler runs, the lock file stays behind
    assert os.path.exists(lock_path_for(transcript))
    manager = SessionWriteLockManager(start_watchdog=False)
    started = time.monotonic()
    handle = manager.acquire(transcript, timeout_ms=5_000)
    assert time.monotonic() - started < 1.0  # reclaimed (dead-pid), not waited out
    assert json.loads(Path(lock_path_for(transcript)).read_text())["pid"] == os.getpid()
    handle.release()
    assert not os.path.exists(lock_path_for(transcript))


def test_a_waiter_whose_budget_is_shorter_than_the_hold_times_out(
    transcript: Path, children: list[Child]
) -> None:
    holder = Child(transcript)
    children.append(holder)
    assert holder.ask("lock") == "ok"
    manager = SessionWriteLockManager(start_watchdog=False)
    started = time.monotonic()
    with pytest.raises(SessionWriteLockTimeoutError) as caught:
        manager.acquire(transcript, timeout_ms=150, retry_delay_ms=50)
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 1.0  # one budget across all the 50 ms retries
    assert str(caught.value).startswith(
        f"session file locked (timeout 150ms): pid={holder.pid} alive=true ageMs="
    )
    assert caught.value.code == "OPENCLAW_SESSION_WRITE_LOCK_TIMEOUT"
    assert holder.ask("unlock") == "ok"
    manager.acquire(transcript, timeout_ms=150).release()


def test_a_compaction_rename_trips_the_fence_even_with_identical_content(
    transcript: Path, children: list[Child]
) -> None:
    lane_a = Child(transcript)
    children.append(lane_a)
    assert lane_a.ask("open") == "ok"
    assert lane_a.ask("write " + record("a", 0)) == "ok"
    assert lane_a.ask("release") == "ok"
    copy = transcript.with_suffix(".tmp")
    copy.write_bytes(transcript.read_bytes())
    os.replace(copy, transcript)  # new inode (#84583)
    assert lane_a.ask("reacquire").startswith("error EmbeddedAttemptSessionTakeoverError")


# ---------------------------------------------------------------------------------------------
# In-process rules


def test_an_appended_delivery_mirror_is_a_benign_advance_but_a_message_is_not(
    transcript: Path,
) -> None:
    manager = SessionWriteLockManager(start_watchdog=False)
    controller = EmbeddedAttemptSessionLockController(transcript, manager=manager)
    controller.release_for_prompt()
    mirror: dict[str, object] = {
        "message": {"role": "assistant", "provider": "openclaw", "model": "delivery-mirror"}
    }
    append_records(transcript, [mirror])
    controller.reacquire_after_prompt()  # benign: transcript-only assistant line
    controller.release_for_prompt()
    append_records(transcript, [{"message": {"role": "user", "content": "hi"}}])
    with pytest.raises(EmbeddedAttemptSessionTakeoverError):
        controller.reacquire_after_prompt()
    assert controller.has_session_takeover()
    with pytest.raises(EmbeddedAttemptSessionTakeoverError), controller.with_session_write_lock():
        pass
    controller.dispose()
    assert manager.held_paths() == []


def test_cleanup_gets_the_real_lock_unless_a_takeover_happened(transcript: Path) -> None:
    manager = SessionWriteLockManager(start_watchdog=False)
    clean = EmbeddedAttemptSessionLockController(transcript, manager=manager)
    clean.release_for_prompt()
    lock = clean.acquire_for_cleanup()
    assert not isinstance(lock, NoopLock) and manager.held_paths()
    lock.release()
    clean.dispose()
    taken = EmbeddedAttemptSessionLockController(transcript, manager=manager)
    taken.release_for_prompt()
    append_records(transcript, [{"turn": "other", "seq": 0}])
    assert taken.acquire_for_cleanup() is NOOP_LOCK  # the fence failed: nothing to release
    assert taken.has_session_takeover() and manager.held_paths() == []
    assert taken.acquire_for_cleanup() is NOOP_LOCK
    taken.dispose()


def test_the_watchdog_silently_force_releases_a_lock_held_past_max_hold(transcript: Path) -> None:
    clock = [1_000_000.0]
    logged: list[str] = []
    manager = SessionWriteLockManager(
        start_watchdog=False, wall_ms=lambda: clock[0], log=logged.append
    )
    handle = manager.acquire(transcript, max_hold_ms=300)
    assert manager.run_watchdog_check() == []
    clock[0] += 301
    assert manager.run_watchdog_check() == [lock_path_for(transcript)]
    assert not os.path.exists(lock_path_for(transcript))
    assert handle.force_released and handle.released
    assert logged and logged[0].startswith("[session-write-lock] releasing lock held for 301ms")
    other = manager.acquire(transcript)  # someone else takes it...
    handle.release()  # ...and the stale handle of the first holder is a no-op
    assert os.path.exists(lock_path_for(transcript))
    other.release()


def test_a_live_holder_past_stale_ms_is_reported_not_removed(transcript: Path) -> None:
    lock = Path(lock_path_for(transcript))
    lock.write_text(encode_lock_payload(os.getppid(), 0, max_hold_ms=1))
    manager = SessionWriteLockManager(start_watchdog=False)
    with pytest.raises(SessionWriteLockStaleError) as caught:
        manager.acquire(transcript, timeout_ms=1_000)
    assert set(caught.value.reasons) == {"too-old", "hold-exceeded"}
    assert lock.exists()


def test_stale_reasons_follow_upstream() -> None:
    live, dead, me = 100, 200, 300

    def inspect(payload: dict[str, object] | None, **extra: bool) -> list[str]:
        return list(
            inspect_lock_payload(
                None if payload is None else parse_lock_payload(json.dumps(payload)),
                now_ms=10_000.0,
                stale_ms=5_000.0,
                respect_max_hold=extra.get("respect", True),
                held_by_this_process=extra.get("held", False),
                own_pid=me,
                own_starttime=7,
                alive=lambda pid: pid != dead,
                start_time_of=lambda pid: 7,
            )
        )

    created = "1970-01-01T00:00:09.000Z"  # 1 s old
    assert inspect({"pid": live, "createdAt": created}) == []
    assert inspect({"pid": dead, "createdAt": created}) == ["dead-pid"]
    assert inspect({"pid": live, "createdAt": created, "starttime": 6}) == ["recycled-pid"]
    assert inspect({"pid": live, "createdAt": "1970-01-01T00:00:01.000Z"}) == ["too-old"]
    assert inspect({"pid": live, "createdAt": created, "maxHoldMs": 500}) == ["hold-exceeded"]
    assert inspect({"pid": live, "createdAt": created, "maxHoldMs": 500}, respect=False) == []
    assert inspect({"pid": me, "createdAt": created, "starttime": 7}) == ["orphan-self-pid"]
    assert inspect(None) == ["missing-pid", "invalid-createdAt"]
    assert inspect({"pid": dead}, held=True) == []  # our own lock is never stale
    # Malformed-only locks wait out the mtime grace; report-only ones are never removed.
    malformed = ["missing-pid", "invalid-createdAt"]
    assert classify_stale(malformed, mtime_age_ms=100, stale_ms=9e9, grace_ms=5_000) == "not-stale"
    assert classify_stale(malformed, mtime_age_ms=6_000, stale_ms=9e9, grace_ms=5_000) == "remove"
    assert classify_stale(["too-old"], mtime_age_ms=9e9, stale_ms=1, grace_ms=1) == "report-only"
    assert classify_stale(["dead-pid", "too-old"], mtime_age_ms=0, stale_ms=1, grace_ms=1) == (
        "remove"
    )


def test_the_lock_payload_is_upstreams_json() -> None:
    raw = encode_lock_payload(32504, 1_779_780_166_211, max_hold_ms=1_020_000)
    assert raw.endswith("}\n") and '\n  "pid": 32504' in raw
    assert json.loads(raw) == {
        "pid": 32504,
        "createdAt": "2026-05-26T07:22:46.211Z",
        "maxHoldMs": 1020000,
    }


def test_a_second_acquire_from_the_same_process_contends_unless_reentrant(transcript: Path) -> None:
    manager = SessionWriteLockManager(start_watchdog=False)
    first = manager.acquire(transcript)
    with pytest.raises(SessionWriteLockTimeoutError):
        manager.acquire(transcript, timeout_ms=20, retry_delay_ms=5)
    nested = manager.acquire(transcript, allow_reentrant=True)
    first.release()
    assert os.path.exists(lock_path_for(transcript))  # refcount still 1
    nested.release()
    assert not os.path.exists(lock_path_for(transcript))


def test_the_owner_registry_serializes_attempts_within_a_process(transcript: Path) -> None:
    registry = SessionFileOwnerRegistry()
    owner = registry.acquire(transcript, timeout_ms=1_000)
    assert registry.is_owned(transcript)
    with pytest.raises(EmbeddedAttemptSessionFileOwnerTimeoutError):
        registry.acquire(transcript, timeout_ms=10)
    owner.release()
    owner.release()
    registry.acquire(transcript, timeout_ms=10).release()


def test_errors_survive_pickling() -> None:
    errors: list[Exception] = [
        EmbeddedAttemptSessionTakeoverError("/x.jsonl"),
        SessionWriteLockTimeoutError(
            timeout_ms=5, lock_path="/x.jsonl.lock", owner="owner=unknown"
        ),
        SessionWriteLockStaleError(lock_path="/x.jsonl.lock", owner="pid=1", reasons=["too-old"]),
        EmbeddedAttemptSessionFileOwnerTimeoutError("/x.jsonl", 5.0),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)


def test_scaled_policy_keeps_a_one_millisecond_retry_floor() -> None:
    assert LockPolicy().scaled(100).retry_delay_ms == 1.0
    with pytest.raises(ValueError):
        LockPolicy().scaled(0)


def test_a_compaction_outliving_its_max_hold_silently_loses_a_later_acknowledged_write(
    transcript: Path,
) -> None:
    clock = [5_000_000.0]
    compactor_side = SessionWriteLockManager(start_watchdog=False, wall_ms=lambda: clock[0])
    writer_side = SessionWriteLockManager(start_watchdog=False)  # stands for another process
    append_records(transcript, [{"turn": "t0", "seq": 0}])
    compaction = EmbeddedAttemptSessionLockController(
        transcript, policy=LockPolicy(max_hold_ms=300_000), manager=compactor_side
    )
    with compaction.with_session_write_lock():
        data = transcript.read_bytes()  # summarising takes longer than the max hold...
        clock[0] += 300_001
        assert compactor_side.run_watchdog_check() == [lock_path_for(transcript)]
        writer = EmbeddedAttemptSessionLockController(transcript, manager=writer_side)
        with writer.with_session_write_lock():  # ...so a waiting lane gets the lock
            append_records(transcript, [{"turn": "t1", "seq": 0}])
        writer.dispose()
        compacted = compact_transcript(data, unit="c", session="s", keep_last=0)
        rewrite_file(transcript, compacted)  # the compaction never learnt it lost the lock
    compaction.dispose()
    acked = [
        AckEntry(kind="turn", unit=u, lane="x", session="s", result="completed", records=(0,))
        for u in ("t0", "t1")
    ]
    report = verify({"s": transcript.read_bytes()}, acked)
    assert report.records_lost == 1 and report.lost == (("s", "t1", 0),)
