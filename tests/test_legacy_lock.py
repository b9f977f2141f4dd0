"""OpenClaw's ``<file>.lock`` protocol (``sessionlane.actors.openclaw_lock``) and the interop's
client of it (``sessionlane.actors.legacy_lock``), on real files and real processes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sessionlane.actors import openclaw_lock
from sessionlane.actors.legacy_lock import LegacyLock
from sessionlane.actors.openclaw_lock import (
    LockPayload,
    encode_lock_payload,
    format_created_at,
    inspect,
    parse_created_at,
    parse_lock_payload,
    process_starttime,
    reclaimable,
    stale_reasons,
)

REPO = Path(__file__).resolve().parents[1]
OPENCLAW_EXAMPLE = (
    '{"pid": 32504, "createdAt": "2026-05-26T07:22:46.211Z", '
    '"maxHoldMs": 1020000, "starttime": 7204072}'
)
EXAMPLE_MS = int(datetime(2026, 5, 26, 7, 22, 46, 211000, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture
def transcript(tmp_path: Path) -> str:
    return str(tmp_path / "session.jsonl")


def now_ms() -> int:
    return int(time.time() * 1000)


def write_lock(transcript: str, text: str) -> Path:
    path = Path(transcript + ".lock")
    path.write_text(text)
    return path


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    """A live process that is not us (it waits on its stdin until the test ends)."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    yield child.pid
    assert child.stdin is not None
    child.stdin.close()
    child.wait(timeout=30)


# -- payload --------------------------------------------------------------------------------


def test_openclaws_example_payload_parses() -> None:
    assert parse_lock_payload(OPENCLAW_EXAMPLE) == LockPayload(
        pid=32504, created_at_ms=EXAMPLE_MS, starttime=7204072, max_hold_ms=1020000
    )


def test_the_payload_is_written_like_javascripts_json_stringify_with_indent_2() -> None:
    assert encode_lock_payload(32504, EXAMPLE_MS) == (
        '{\n  "pid": 32504,\n  "createdAt": "2026-05-26T07:22:46.211Z"\n}\n'
    )
    text = encode_lock_payload(7, EXAMPLE_MS, starttime=99)
    assert parse_lock_payload(text) == LockPayload(7, EXAMPLE_MS, starttime=99)


@pytest.mark.parametrize("ms", [0, 1, 999, 1000, EXAMPLE_MS, 4102444799999])
def test_created_at_round_trips_with_millisecond_precision(ms: int) -> None:
    text = format_created_at(ms)
    assert text.endswith("Z") and len(text) == 24
    assert parse_created_at(text) == ms


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not json", None),
        ("[1]", None),
        ("", None),
        ('{"pid": "32504", "createdAt": "yesterday"}', LockPayload(None, None)),
        ('{"pid": true, "createdAt": 5}', LockPayload(None, None)),
        ('{"pid": -3, "createdAt": "2026-05-26T07:22:46.211Z"}', LockPayload(None, EXAMPLE_MS)),
        ('{"pid": 1, "createdAt": "2026-05-26T09:22:46.211+02:00"}', LockPayload(1, EXAMPLE_MS)),
    ],
)
def test_invalid_fields_parse_as_missing(text: str, expected: LockPayload | None) -> None:
    assert parse_lock_payload(text) == expected


# -- stale reasons (pure) -------------------------------------------------------------------


def reasons(payload: LockPayload | None, now: int, **probes: object) -> list[str]:
    alive = probes.get("alive", lambda pid: True)
    starttime = probes.get("starttime", lambda pid: None)
    return list(
        stale_reasons(payload, now, stale_ms=1000, alive=alive, starttime=starttime)  # type: ignore[arg-type]
    )


def test_stale_reasons_follow_openclaws_table() -> None:
    assert reasons(LockPayload(5, 100), 500) == []
    assert reasons(None, 500) == ["missing-pid", "invalid-createdAt"]
    assert reasons(LockPayload(None, 100), 500) == ["missing-pid"]
    assert reasons(LockPayload(5, 100), 500, alive=lambda pid: False) == ["dead-pid"]
    assert reasons(LockPayload(5, None), 500) == ["invalid-createdAt"]
    assert reasons(LockPayload(5, 100), 1101) == ["too-old"]
    recycled = LockPayload(5, 100, starttime=42)
    assert reasons(recycled, 500, starttime=lambda pid: 43) == ["recycled-pid"]
    assert reasons(recycled, 500, starttime=lambda pid: 42) == []
    assert reasons(recycled, 500, starttime=lambda pid: None) == []


def test_only_dead_or_recycled_owners_and_old_malformed_locks_are_reclaimable() -> None:
    assert reclaimable(["dead-pid"], 0)
    assert reclaimable(["recycled-pid", "too-old"], 0)
    assert reclaimable(["missing-pid", "too-old"], 0)
    assert not reclaimable([], 10**9)
    assert not reclaimable(["too-old"], 10**9)
    assert not reclaimable(["missing-pid", "invalid-createdAt"], 30_000)
    assert reclaimable(["missing-pid", "invalid-createdAt"], 30_001)
    assert reclaimable(["invalid-createdAt"], 501, stale_ms=500)


def test_our_own_process_start_time_is_readable() -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc")
    first = process_starttime(os.getpid())
    assert isinstance(first, int) and first > 0
    assert process_starttime(os.getpid()) == first


# -- inspect (doctor) -----------------------------------------------------------------------


def test_inspect_names_the_stale_reasons_of_a_lock_file(transcript: str) -> None:
    lock = transcript + ".lock"
    now = time.time()
    assert inspect(lock, now) == []
    write_lock(transcript, encode_lock_payload(os.getpid(), int(now * 1000)))
    assert inspect(lock, now) == []
    assert inspect(lock, now + 3600) == ["too-old"]
    write_lock(transcript, encode_lock_payload(dead_pid(), int(now * 1000)))
    assert inspect(lock, now) == ["dead-pid"]
    write_lock(transcript, '{"createdAt": "nonsense"}')
    assert inspect(lock, now) == ["missing-pid", "invalid-createdAt"]


# -- the lock -------------------------------------------------------------------------------


def test_acquire_creates_the_lock_with_our_pid_and_release_removes_it(transcript: str) -> None:
    lock = LegacyLock(transcript, clock=lambda: EXAMPLE_MS / 1000)
    assert lock.try_acquire()
    assert lock.held
    path = Path(transcript + ".lock")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    payload = json.loads(path.read_text())
    assert payload["pid"] == os.getpid()
    assert payload["createdAt"] == "2026-05-26T07:22:46.211Z"
    assert path.read_text().startswith('{\n  "pid": ')
    assert lock.try_acquire()  # already ours: no nesting, no error
    lock.release()
    assert not lock.held
    assert not path.exists()
    lock.release()  # releasing twice is harmless


def test_a_live_lock_is_not_reclaimed_and_is_left_untouched(transcript: str, live_pid: int) -> None:
    text = encode_lock_payload(live_pid, now_ms())
    path = write_lock(transcript, text)
    lock = LegacyLock(transcript)
    assert not lock.try_acquire()
    assert not lock.held
    assert path.read_text() == text


def with_lease(text: str, lease: str) -> str:
    """A lock payload as the OpenClaw drop-in writes it: OpenClaw's fields and the lease."""
    return json.dumps({**json.loads(text), "sessionlaneLease": lease}, indent=2) + "\n"


def test_a_live_lock_held_for_the_writing_lease_is_borrowed_not_taken(
    transcript: str, live_pid: int
) -> None:
    text = with_lease(encode_lock_payload(live_pid, now_ms()), "L1")
    path = write_lock(transcript, text)
    lock = LegacyLock(transcript)
    assert not lock.try_acquire(), "a write without the lease waits"
    assert not lock.try_acquire(lease="L2"), "another lease's write waits"
    assert lock.try_acquire(lease="L1")
    assert lock.held
    lock.release()
    assert not lock.held
    assert path.read_text() == text, "borrowed: left to its holder"


def test_a_lock_naming_the_lease_but_left_by_a_dead_holder_is_reclaimed(transcript: str) -> None:
    write_lock(transcript, with_lease(encode_lock_payload(dead_pid(), now_ms()), "L1"))
    lock = LegacyLock(transcript)
    assert lock.try_acquire(lease="L1")
    payload = parse_lock_payload(Path(transcript + ".lock").read_bytes())
    assert payload is not None and payload.pid == os.getpid(), "ours now"
    lock.release()
    assert not Path(transcript + ".lock").exists()


def test_a_live_owner_past_stale_ms_is_reported_but_not_reclaimed(
    transcript: str, live_pid: int
) -> None:
    text = encode_lock_payload(live_pid, now_ms() - 3_600_000)
    path = write_lock(transcript, text)
    assert inspect(str(path), time.time()) == ["too-old"]
    assert not LegacyLock(transcript).try_acquire()
    assert path.read_text() == text


def test_a_dead_owners_lock_is_reclaimed(transcript: str) -> None:
    path = write_lock(transcript, encode_lock_payload(dead_pid(), now_ms()))
    lock = LegacyLock(transcript)
    assert lock.try_acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_a_recycled_pid_is_reclaimed(transcript: str, live_pid: int) -> None:
    real = process_starttime(live_pid)
    if real is None:
        pytest.skip("no /proc/<pid>/stat")
    write_lock(transcript, encode_lock_payload(live_pid, now_ms(), starttime=real + 1))
    assert LegacyLock(transcript).try_acquire()


def test_a_fresh_lock_without_payload_is_respected_until_its_mtime_is_old(
    transcript: str,
) -> None:
    # An owner between its O_EXCL create and its payload write leaves an empty file.
    path = write_lock(transcript, "")
    lock = LegacyLock(transcript)
    assert not lock.try_acquire()
    assert path.read_text() == ""
    old = time.time() - 31
    os.utime(path, (old, old))
    assert lock.try_acquire()


def test_a_stale_lock_that_changes_before_removal_is_left_alone(
    transcript: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_lock(transcript, encode_lock_payload(dead_pid(), now_ms()))
    fresh = encode_lock_payload(os.getpid(), now_ms())
    real_snapshot = openclaw_lock.read_snapshot

    def snapshot_with_takeover(p: str, dir_fd: int | None = None) -> object:
        # The protocol's re-read just before the unlink: someone took over since the verdict.
        replacement = path.with_name("takeover")
        replacement.write_text(fresh)
        os.replace(replacement, path)
        return real_snapshot(p, dir_fd)

    monkeypatch.setattr(openclaw_lock, "read_snapshot", snapshot_with_takeover)
    lock = LegacyLock(transcript)
    assert not lock.try_acquire()
    assert path.read_text() == fresh


def test_release_leaves_a_lock_that_is_no_longer_ours(transcript: str) -> None:
    lock = LegacyLock(transcript)
    assert lock.try_acquire()
    path = Path(transcript + ".lock")
    theirs = encode_lock_payload(os.getpid() + 1, now_ms())
    replacement = path.with_name("theirs")
    replacement.write_text(theirs)
    os.replace(replacement, path)  # another process judged ours stale and took it
    lock.release()
    assert not lock.held
    assert path.read_text() == theirs


def test_release_leaves_a_lock_rewritten_in_place(transcript: str) -> None:
    lock = LegacyLock(transcript)
    assert lock.try_acquire()
    path = Path(transcript + ".lock")
    path.write_text(encode_lock_payload(os.getpid(), now_ms() + 5))
    lock.release()
    assert path.exists()


_HOLDER = r"""
import sys
from sessionlane.actors.legacy_lock import LegacyLock

lock = LegacyLock(sys.argv[1])
print("acquired" if lock.try_acquire() else "busy", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""


class Holder:
    """Another process that tries the lock once, then releases when told."""

    def __init__(self, transcript: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, transcript],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert self.process.stdout is not None
        self.outcome = self.process.stdout.readline().strip()

    def finish(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "released"
        self.process.wait(timeout=30)
        self.process.stdin.close()
        self.process.stdout.close()


def test_the_lock_is_exclusive_between_processes(transcript: str) -> None:
    first = Holder(transcript)
    assert first.outcome == "acquired"
    ours = LegacyLock(transcript)
    assert not ours.try_acquire()
    second = Holder(transcript)
    assert second.outcome == "busy"
    second.finish()
    first.finish()
    assert ours.try_acquire()
    third = Holder(transcript)
    assert third.outcome == "busy"
    third.finish()
    ours.release()
    assert not Path(transcript + ".lock").exists()
