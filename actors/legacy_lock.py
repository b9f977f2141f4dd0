"""Interop with OpenClaw's ``<file>.lock`` protocol (its ``src/agents/session-write-lock.ts``).

With ``legacy_lock = true`` the SessionFile actor takes the runtime's own lock file around each
write, so processes that still use the lock-file protocol interleave with sessionlane at write
granularity. This module never waits: ``try_acquire`` answers at once and the actor retries
later with a wakeup.

The lock is ``<transcript>.lock``, created with O_CREAT|O_EXCL and holding
``JSON.stringify({pid, createdAt}, null, 2) + "\\n"``. A lock is *stale* for the reasons of
``stale_reasons``; whether a stale lock may be removed follows OpenClaw:

* a dead (or recycled) owner pid: removable;
* a malformed payload only (``missing-pid`` / ``invalid-createdAt``): removable once the lock
  file's mtime is older than ``min(stale_ms, 30 s)``, because an owner writes its payload
  just after the exclusive create and may be paused in between;
* ``too-old`` alone (a live owner past ``stale_ms``): reported, never removed, as OpenClaw
  does; a live holder keeps its lock.

Removal is "remove-if-unchanged": the raw text and inode are read again just before the
unlink, and a lock that changed in between is left alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from actors.confined import ConfinedDir

__all__ = [
    "DEFAULT_STALE_MS",
    "MALFORMED_GRACE_MS",
    "LegacyLock",
    "LockPayload",
    "StaleReason",
    "encode_lock_payload",
    "format_created_at",
    "inspect",
    "lock_path",
    "parse_created_at",
    "parse_lock_payload",
    "pid_alive",
    "process_starttime",
    "reclaimable",
    "stale_reasons",
]

_log = logging.getLogger(__name__)

DEFAULT_STALE_MS = 1_800_000
MALFORMED_GRACE_MS = 30_000

StaleReason = Literal["missing-pid", "dead-pid", "recycled-pid", "invalid-createdAt", "too-old"]
_MALFORMED: frozenset[StaleReason] = frozenset({"missing-pid", "invalid-createdAt"})
_REPORT_ONLY: frozenset[StaleReason] = frozenset({"too-old"})


def lock_path(transcript_path: str) -> str:
    """The legacy lock file of ``transcript_path``."""
    return transcript_path + ".lock"


# -- payload ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LockPayload:
    """The fields of a lock file that matter here; invalid fields parse as None."""

    pid: int | None
    """Owner process id (a positive integer), or None when missing or invalid."""
    created_at_ms: int | None
    """``createdAt`` as Unix milliseconds, or None when missing or unparseable."""
    starttime: int | None = None
    """Owner start time in clock ticks (``/proc/<pid>/stat`` field 22), when recorded."""
    max_hold_ms: int | None = None
    """The owner's own hold budget, when recorded (informational)."""


def format_created_at(created_at_ms: int) -> str:
    """Unix milliseconds as JavaScript's ``Date.prototype.toISOString`` writes them."""
    seconds, millis = divmod(created_at_ms, 1000)
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{millis:03d}Z"


def parse_created_at(text: object) -> int | None:
    """Unix milliseconds of an ISO-8601 timestamp (``Z`` or offset; naive means UTC)."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def encode_lock_payload(pid: int, created_at_ms: int, *, starttime: int | None = None) -> str:
    """The lock file text OpenClaw writes: 2-space-indented JSON and a newline."""
    payload: dict[str, object] = {"pid": pid, "createdAt": format_created_at(created_at_ms)}
    if starttime is not None:
        payload["starttime"] = starttime
    return json.dumps(payload, indent=2) + "\n"


def parse_lock_payload(text: str) -> LockPayload | None:
    """Parse a lock file's text; None when it is not a JSON object at all."""
    try:
        payload = json.loads(text)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    return LockPayload(
        pid=_positive_int(payload.get("pid")),
        created_at_ms=parse_created_at(payload.get("createdAt")),
        starttime=_positive_int(payload.get("starttime")),
        max_hold_ms=_positive_int(payload.get("maxHoldMs")),
    )


def _positive_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


# -- staleness --------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a pid owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def process_starttime(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks (Linux ``/proc/<pid>/stat`` field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        # The command name (field 2) is in parentheses and may contain spaces.
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def stale_reasons(
    payload: LockPayload | None,
    now_ms: int,
    *,
    stale_ms: int = DEFAULT_STALE_MS,
    alive: Callable[[int], bool] = pid_alive,
    starttime: Callable[[int], int | None] = process_starttime,
) -> list[StaleReason]:
    """Why a lock with this payload is stale at ``now_ms``; empty when it is live.

    Pure apart from the two process probes, which tests replace.
    """
    reasons: list[StaleReason] = []
    pid = payload.pid if payload else None
    created = payload.created_at_ms if payload else None
    if pid is None:
        reasons.append("missing-pid")
    elif not alive(pid):
        reasons.append("dead-pid")
    elif payload and payload.starttime is not None:
        current = starttime(pid)
        if current is not None and current != payload.starttime:
            reasons.append("recycled-pid")
    if created is None:
        reasons.append("invalid-createdAt")
    elif now_ms - created > stale_ms:
        reasons.append("too-old")
    return reasons


def reclaimable(
    reasons: list[StaleReason], file_age_ms: float, *, stale_ms: int = DEFAULT_STALE_MS
) -> bool:
    """Whether a lock with these stale reasons may be removed (see the module docstring).

    ``file_age_ms`` is the lock file's age by mtime, used only for malformed payloads.
    """
    found = set(reasons)
    if not found or found <= _REPORT_ONLY:
        return False
    if found <= _MALFORMED:
        return file_age_ms > min(stale_ms, MALFORMED_GRACE_MS)
    return True


@dataclass(frozen=True, slots=True)
class _Snapshot:
    raw: bytes
    dev: int
    ino: int
    mtime_ns: int


def _snapshot(path: str, dir_fd: int | None = None) -> _Snapshot | None:
    """The lock file's raw bytes and identity, or None when there is no lock file.

    ``path`` is relative to ``dir_fd`` when that is given (the transcript's confined
    directory); a symlink is never followed either way.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return _Snapshot(b"".join(chunks), st.st_dev, st.st_ino, st.st_mtime_ns)


def _same_lock(a: _Snapshot | None, b: _Snapshot) -> bool:
    """Same lock file: same inode and same content (mtime may be touched)."""
    return a is not None and (a.raw, a.dev, a.ino) == (b.raw, b.dev, b.ino)


def inspect(path: str, now: float, *, stale_ms: int = DEFAULT_STALE_MS) -> list[StaleReason]:
    """Stale reasons of the lock file at ``path`` at ``now`` (Unix seconds), for ``doctor``.

    Empty when the lock is live or there is no lock file.
    """
    snap = _snapshot(path)
    if snap is None:
        return []
    payload = parse_lock_payload(snap.raw.decode("utf-8", "replace"))
    return stale_reasons(payload, int(now * 1000), stale_ms=stale_ms)


# -- the lock ---------------------------------------------------------------------------------


class LegacyLock:
    """One process's hold on the legacy ``<transcript>.lock``; never blocks.

    ``clock`` returns Unix seconds (injectable for tests). Not reentrant: ``try_acquire``
    while held returns True without nesting, and one ``release`` drops the lock.
    ``directory`` is the transcript's confined directory (borrowed): the lock file is then
    created, read and removed relative to it, so it is never made outside the root even if
    the directory's path was swapped for a symlink (``try_acquire`` raises ``PathNotAllowed``).
    """

    def __init__(
        self,
        transcript_path: str,
        *,
        stale_ms: int = DEFAULT_STALE_MS,
        clock: Callable[[], float] = time.time,
        directory: ConfinedDir | None = None,
    ) -> None:
        self.transcript_path = transcript_path
        self.path = lock_path(transcript_path)
        self.stale_ms = stale_ms
        self._clock = clock
        self._mine: _Snapshot | None = None
        self._directory = directory
        self._name = os.path.basename(self.path) if directory is not None else self.path

    @property
    def _dir_fd(self) -> int | None:
        return self._directory.fd if self._directory is not None else None

    @property
    def held(self) -> bool:
        """Whether this object believes it holds the lock."""
        return self._mine is not None

    def try_acquire(self) -> bool:
        """Create the lock file if it is free or stale; False when a live owner holds it.

        A stale lock is removed only if it is unchanged since it was read, then creation is
        tried once more. Never sleeps; the caller retries later.
        """
        if self._mine is not None:
            return True
        if self._directory is not None:
            self._directory.revalidate()
        for _attempt in range(2):
            if self._create():
                return True
            snap = _snapshot(self._name, self._dir_fd)
            if snap is None:
                continue  # released between our create and our read
            if not self._remove_if_stale(snap):
                return False
        return False

    def release(self) -> None:
        """Remove the lock file if it is still ours (same inode and content); else forget it."""
        mine, self._mine = self._mine, None
        if mine is None:
            return
        if _same_lock(_snapshot(self._name, self._dir_fd), mine):
            os.unlink(self._name, dir_fd=self._dir_fd)
        else:
            _log.warning("legacy lock %s is no longer ours; left in place", self.path)

    def _create(self) -> bool:
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self._name, flags, 0o600, dir_fd=self._dir_fd)
        except FileExistsError:
            return False
        pid = os.getpid()
        text = encode_lock_payload(pid, int(self._clock() * 1000), starttime=process_starttime(pid))
        raw = text.encode("utf-8")
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            os.unlink(self._name, dir_fd=self._dir_fd)
            raise
        os.close(fd)
        self._mine = _Snapshot(raw, st.st_dev, st.st_ino, st.st_mtime_ns)
        return True

    def _remove_if_stale(self, snap: _Snapshot) -> bool:
        """Remove the lock of ``snap`` if stale and unchanged; whether it is gone now."""
        now_ms = int(self._clock() * 1000)
        payload = parse_lock_payload(snap.raw.decode("utf-8", "replace"))
        reasons = stale_reasons(payload, now_ms, stale_ms=self.stale_ms)
        file_age_ms = now_ms - snap.mtime_ns / 1_000_000
        if not reasons:
            return False
        if not reclaimable(reasons, file_age_ms, stale_ms=self.stale_ms):
            _log.debug("legacy lock %s stale (%s) but not removable", self.path, reasons)
            return False
        again = _snapshot(self._name, self._dir_fd)
        if again is None:
            return True
        if not _same_lock(again, snap):
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._name, dir_fd=self._dir_fd)
        _log.warning(
            "removed stale legacy lock %s (%s): %s",
            self.path,
            ", ".join(reasons),
            snap.raw.decode("utf-8", "replace").strip(),
        )
        return True
