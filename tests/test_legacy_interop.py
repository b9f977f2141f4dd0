"""Legacy interop: with ``legacy_lock = true`` sessionlane and lock-file writers share one file.

First the SessionFile shell driven by hand (deterministic: a live legacy lock makes writes
wait in order, a stale one is reclaimed, a write whose lease went away meanwhile is refused);
then a real legacy writer process that follows OpenClaw's lock-file protocol exactly, writing
each line in two halves while it holds the lock, against sessionlane lanes on the same file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_durability import Clock, Shell  # the hand-driven SessionFile harness
from thespian.actors import WakeupMessage
from waiting import eventually

from sessionlane.actors import session_file
from sessionlane.actors.openclaw_lock import encode_lock_payload, lock_path, pid_alive
from sessionlane.actors.timers import LegacyRetry
from sessionlane.actors.transcript import quarantine_path
from sessionlane.messages.wire import Abandon, Acquire, Append, Error, Granted
from sessionlane.system.client import connect
from sessionlane.system.runtime.service import embedded_service

# The shell, by hand ------------------------------------------------------------------------


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shell]:
    clock = Clock()
    monkeypatch.setattr(session_file, "monotonic_ms", clock)
    made = Shell(tmp_path / "t.jsonl", clock, legacy_lock=True)
    try:
        yield made
    finally:
        made.close()


def hold_legacy_lock(transcript: str, pid: int) -> Path:
    lock = Path(lock_path(transcript))
    lock.write_text(encode_lock_payload(pid, int(time.time() * 1000)))
    return lock


def legacy_retry(shell: Shell) -> None:
    """Fire the newest pending legacy-lock retry."""
    delay, payload = next(w for w in reversed(shell.wakeups) if isinstance(w[1], LegacyRetry))
    shell.deliver(WakeupMessage(delay, payload), sender=None)


def test_writes_wait_in_order_while_a_live_legacy_writer_holds_the_lock(shell: Shell) -> None:
    lock = hold_legacy_lock(shell.path, os.getpid())  # a live owner
    shell.append("a")
    shell.append("b", n=2)
    assert Path(shell.path).read_bytes() == b""
    assert shell.sent() == [] and shell.actor.status().counters["legacy_lock_waits"] >= 1
    legacy_retry(shell)  # still held: nothing happens, another retry is scheduled
    assert Path(shell.path).read_bytes() == b""
    lock.unlink()
    legacy_retry(shell)
    lines = [json.loads(line) for line in Path(shell.path).read_bytes().splitlines()]
    assert [r["lane"] for r in lines] == ["a", "b", "b"]
    assert not lock.exists()  # taken around the write and released right after
    assert shell.sent() == [("sync", ""), ("lane:a", "appended"), ("lane:b", "appended")]


def test_a_dead_legacy_owners_lock_is_reclaimed_at_once(shell: Shell) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not pid_alive(dead.pid)
    lock = hold_legacy_lock(shell.path, dead.pid)
    shell.append("a")
    assert Path(shell.path).read_bytes().count(b"\n") == 1
    assert not lock.exists()
    assert shell.sent() == [("sync", ""), ("lane:a", "appended")]


def test_a_queued_write_whose_lease_was_abandoned_changes_nothing(shell: Shell) -> None:
    shell.call("a", Acquire(lane="a", path=shell.path, purpose="prompt"))
    granted = shell.events[-1][1]
    assert isinstance(granted, Granted)
    lock = hold_legacy_lock(shell.path, os.getpid())
    shell.call("a", Append(lease=granted.lease, fence=granted.fence, records=[{"x": 1}]))
    shell.call("a", Abandon(lane="a", path=shell.path, reason="test"))
    lock.unlink()
    legacy_retry(shell)
    assert Path(shell.path).read_bytes() == b""
    replies = [m for who, m in shell.events if who == "lane:a"]
    assert any(isinstance(m, Error) and m.code == "stale_fence" for m in replies)


def _half_written(tmp_path: Path) -> tuple[Path, str, str]:
    """A transcript whose last line a legacy writer has written half of (no newline yet)."""
    path = tmp_path / "half.jsonl"
    first = json.dumps({"legacy": 0}) + "\n"
    second = json.dumps({"legacy": 1, "pad": "y" * 64}) + "\n"
    path.write_text(first + second[: len(second) // 2])
    return path, first, second


def test_a_legacy_writers_line_in_progress_at_activation_is_not_cut_in_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(session_file, "monotonic_ms", clock)
    path, first, second = _half_written(tmp_path)
    lock = hold_legacy_lock(str(path), os.getpid())  # the writer holds it while it writes
    shell = Shell(path, clock, legacy_lock=True)
    try:
        assert path.read_text() == first + second[: len(second) // 2], "left alone"
        with path.open("a") as out:  # the legacy writer finishes its line and lets go
            out.write(second[len(second) // 2 :])
        lock.unlink()
        shell.append("a")
        lines = [json.loads(line) for line in path.read_bytes().splitlines()]
        assert lines == [json.loads(first), json.loads(second), {"lane": "a", "n": 0}]
        assert not Path(quarantine_path(str(path))).exists()
    finally:
        shell.close()


def test_a_line_a_dead_legacy_writer_left_unfinished_is_quarantined_before_our_first_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(session_file, "monotonic_ms", clock)
    path, first, second = _half_written(tmp_path)
    lock = hold_legacy_lock(str(path), os.getpid())
    shell = Shell(path, clock, legacy_lock=True)
    try:
        lock.unlink()  # the writer died mid-line; its lock was cleaned up
        shell.append("a")
        lines = [json.loads(line) for line in path.read_bytes().splitlines()]
        assert lines == [json.loads(first), {"lane": "a", "n": 0}]
        torn = Path(quarantine_path(str(path))).read_text()
        assert torn == second[: len(second) // 2] + "\n"
    finally:
        shell.close()


def test_a_torn_line_with_no_legacy_writer_around_is_repaired_at_activation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(session_file, "monotonic_ms", clock)
    path, first, _ = _half_written(tmp_path)
    shell = Shell(path, clock, legacy_lock=True)
    try:
        assert path.read_text() == first
        assert Path(quarantine_path(str(path))).exists()
        assert not Path(lock_path(str(path))).exists(), "the lock was taken and given back"
    finally:
        shell.close()


# A real legacy writer ----------------------------------------------------------------------


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return b""


LEGACY_WRITER = r"""
# OpenClaw's protocol: O_EXCL <file>.lock with its JSON payload, write, fsync, unlink. On
# contention it re-reads the lock: a dead owner's lock is removed if unchanged, a live one is
# waited for (50 ms, as OpenClaw's fs-safe retry). Each line is written in two halves with a
# pause between them, so a writer that ignored the lock would tear it.
import datetime, json, os, sys, time

transcript, count, stop_file, result_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
lock = transcript + ".lock"


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


written = waits = 0
while (written < count or not os.path.exists(stop_file)) and written < count * 4:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        waits += 1
        try:
            with open(lock) as f:
                raw = f.read()
            pid = json.loads(raw).get("pid")
        except (OSError, ValueError):
            time.sleep(0.05)
            continue
        if isinstance(pid, int) and not alive(pid):
            try:
                with open(lock) as f:
                    if f.read() == raw:
                        os.unlink(lock)
            except OSError:
                pass
            continue
        time.sleep(0.05)
        continue
    now = datetime.datetime.now(datetime.timezone.utc)
    payload = {"pid": os.getpid(), "createdAt": now.isoformat(timespec="milliseconds")}
    try:
        os.write(fd, (json.dumps(payload, indent=2) + "\n").encode())
    finally:
        os.close(fd)
    line = (json.dumps({"legacy": written, "pad": "y" * 200}) + "\n").encode()
    out = os.open(transcript, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(out, line[: len(line) // 2])
        time.sleep(0.0005)
        os.write(out, line[len(line) // 2 :])
        os.fsync(out)
    finally:
        os.close(out)
    os.unlink(lock)
    written += 1
    time.sleep(0.002)  # a runtime writes per model message, not in a tight loop
with open(result_file, "w") as f:
    json.dump({"written": written, "waits": waits}, f)
"""


@pytest.mark.tcp
@pytest.mark.slow
def test_a_legacy_writer_and_sessionlane_lanes_share_one_file_without_tearing(
    root: Path, tmp_path: Path
) -> None:
    path = str(root / "shared.jsonl")
    stop_file, result_file = str(tmp_path / "stop"), str(tmp_path / "legacy.json")
    lanes, appends_per_lane, records_per_append = 3, 80, 5
    with embedded_service([str(root)], log_file=tmp_path / "svc.log", legacy_lock=True) as svc:
        legacy = subprocess.Popen(
            [sys.executable, "-c", LEGACY_WRITER, path, "1200", stop_file, result_file]
        )
        acked: list[tuple[int, int]] = []
        errors: list[BaseException] = []

        def lane_writer(n: int) -> None:
            try:
                with connect(svc.address) as sl:
                    lane = sl.lane(f"lane-{n}")
                    for i in range(appends_per_lane):
                        batch = [
                            {"lane": n, "i": i, "k": k, "pad": "z" * 100}
                            for k in range(records_per_append)
                        ]
                        if i % 2:
                            lane.append(path, *batch)
                        else:
                            with lane.lease(path, purpose="write") as lease:
                                assert lease is not None
                                lease.append(*batch)
                        acked.append((n, i))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=lane_writer, args=(n,)) for n in range(lanes)]
        try:
            # The lanes start once the legacy writer writes: lanes that finish their appends
            # before its interpreter is up never meet its lock (the waits asserted below).
            eventually(lambda: b'"legacy"' in _read(path), "the legacy writer's first line")
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=240)
        finally:
            Path(stop_file).touch()
            try:
                legacy.wait(timeout=120)
            finally:
                if legacy.poll() is None:  # pragma: no cover - never leave it running
                    legacy.kill()
                    legacy.wait()
        assert not errors, errors
        assert legacy.returncode == 0
        with connect(svc.address) as sl:
            (status,) = sl.status(path).files
    written = json.loads(Path(result_file).read_text())["written"]
    data = Path(path).read_bytes()
    assert data.endswith(b"\n")
    records = [json.loads(line) for line in data.splitlines()]  # no torn or interleaved line
    legacy_seen = [r["legacy"] for r in records if "legacy" in r]
    lane_seen = [(r["lane"], r["i"], r["k"]) for r in records if "lane" in r]
    assert legacy_seen == list(range(written))
    assert len(lane_seen) == len(set(lane_seen))
    assert set(lane_seen) == {(n, i, k) for n, i in acked for k in range(records_per_append)}
    assert len(records) == written + len(acked) * records_per_append >= 2000
    # Each sessionlane append is contiguous in the file: written under one lock hold.
    where = {(r["lane"], r["i"], r["k"]): at for at, r in enumerate(records) if "lane" in r}
    for n, i in acked:
        at = where[(n, i, 0)]
        assert [where[(n, i, k)] for k in range(records_per_append)] == list(
            range(at, at + records_per_append)
        )
    assert status.counters["legacy_lock_waits"] > 0, status.counters
    assert not Path(lock_path(path)).exists()
