"""OpenClaw's ``<file>.lock`` protocol (its ``src/agents/session-write-lock.ts``): the one copy.

Two clients build on it and cannot disagree about the format, liveness or what "stale" means:
the interop (``sessionlane.actors.legacy_lock.LegacyLock``: the SessionFile takes the lock around
each write, never waiting) and the race's baseline (``sessionlane.system.race._lockfile``:
OpenClaw's own acquirer with its retry loop, timeout budget and max-hold watchdog).

The protocol:

* the lock of a transcript is ``<transcript>.lock`` (``lock_path``; OpenClaw first resolves
  the directory's symlinks, ``normalize_session_file``), created with ``O_CREAT | O_EXCL``
  and holding ``JSON.stringify({pid, createdAt, maxHoldMs?, starttime?}, null, 2) + "\\n"``
  (``encode_lock_payload``; ``create_lock`` writes it);
* a lock is *stale* for the reasons of ``stale_reasons``, in OpenClaw's order;
* what may be done with a stale lock (``classify_stale``): a dead or recycled owner's lock is
  removed; a malformed payload only (``missing-pid`` / ``invalid-createdAt``) is removed once
  the file's mtime is older than ``min(stale_ms, grace)``, because an owner writes its payload
  just after the exclusive create and may be paused in between; ``too-old`` and
  ``hold-exceeded`` alone (a live owner past ``stale_ms`` or past its own ``maxHoldMs``) are
  reported, never removed, as OpenClaw does: a live holder keeps its lock;
* removal is "remove-if-unchanged" (``remove_if_unchanged``): the raw text and inode are read
  again just before the unlink, and a lock that changed in between is left alone (the same
  small window between that compare and the unlink as upstream).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from sessionlane.actors import procfs
from sessionlane.actors.atomic_file import write_all

__all__ = [
    "DEFAULT_STALE_MS",
    "MALFORMED_GRACE_MS",
    "MALFORMED_STALE_REASONS",
    "REPORT_ONLY_STALE_REASONS",
    "LockPayload",
    "LockSnapshot",
    "OwnProcess",
    "StaleReason",
    "StaleVerdict",
    "classify_stale",
    "create_lock",
    "encode_lock_payload",
    "format_created_at",
    "inspect",
    "lock_path",
    "lock_path_for",
    "normalize_session_file",
    "parse_created_at",
    "parse_lock_payload",
    "pid_alive",
    "process_starttime",
    "read_snapshot",
    "reclaimable",
    "remove_if_unchanged",
    "stale_reasons",
]

DEFAULT_STALE_MS = 1_800_000
"""OpenClaw's ``staleMs``: 30 minutes."""
MALFORMED_GRACE_MS = 30_000
"""OpenClaw's ``orphanPayloadGraceMs`` for acquire timeouts of 30 s or more."""

StaleReason = Literal[
    "missing-pid",
    "dead-pid",
    "recycled-pid",
    "invalid-createdAt",
    "too-old",
    "hold-exceeded",
    "orphan-self-pid",
]
StaleVerdict = Literal["not-stale", "remove", "report-only"]

# A live holder past staleMs or past its own maxHoldMs is reported, never removed (upstream's
# REPORT_ONLY_STALE_LOCK_REASONS; PRs #96528 and #89673 proposed changing that and were closed).
REPORT_ONLY_STALE_REASONS: frozenset[str] = frozenset({"too-old", "hold-exceeded"})
# A payload-less lock may be a holder suspended between open("wx") and the payload write, so
# these reasons alone only count after the mtime grace.
MALFORMED_STALE_REASONS: frozenset[str] = frozenset({"missing-pid", "invalid-createdAt"})


def lock_path(session_file: str) -> str:
    """The lock file of ``session_file`` (taken as given: see ``normalize_session_file``)."""
    return session_file + ".lock"


def lock_path_for(session_file: str | os.PathLike[str]) -> str:
    """Where OpenClaw puts the lock of ``session_file``: ``<normalized session file>.lock``."""
    return lock_path(normalize_session_file(session_file))


def normalize_session_file(session_file: str | os.PathLike[str]) -> str:
    """``realpath(dirname)`` + basename, as upstream: symlinked directories share one lock."""
    resolved = os.path.abspath(os.fspath(session_file))
    try:
        directory = os.path.realpath(os.path.dirname(resolved), strict=True)
    except OSError:
        return resolved
    return os.path.join(directory, os.path.basename(resolved))


# -- payload ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LockPayload:
    """The fields of a lock file that matter; invalid fields parse as None."""

    pid: int | None
    """Owner process id (a positive integer), or None when missing or invalid."""
    created_at_ms: int | None
    """``createdAt`` as Unix milliseconds, or None when missing or unparseable."""
    starttime: int | None = None
    """Owner start time in clock ticks (``/proc/<pid>/stat`` field 22), when recorded."""
    max_hold_ms: float | None = None
    """The owner's own hold budget (a positive number), when recorded."""


def format_created_at(created_at_ms: float) -> str:
    """Unix milliseconds as JavaScript's ``Date.prototype.toISOString`` writes them."""
    seconds, millis = divmod(math.floor(created_at_ms), 1000)
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


def encode_lock_payload(
    pid: int,
    created_at_ms: float,
    *,
    max_hold_ms: float | None = None,
    starttime: int | None = None,
) -> str:
    """The lock file text OpenClaw writes: 2-space-indented JSON and a newline.

    ``maxHoldMs`` (rounded to an integer) and ``starttime`` are written when given.
    """
    payload: dict[str, object] = {"pid": pid, "createdAt": format_created_at(created_at_ms)}
    if max_hold_ms is not None:
        payload["maxHoldMs"] = round(max_hold_ms)
    if starttime is not None:
        payload["starttime"] = starttime
    return json.dumps(payload, indent=2) + "\n"


def parse_lock_payload(text: str | bytes) -> LockPayload | None:
    """Parse a lock file's content; None when it is not a JSON object at all."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
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
        max_hold_ms=_positive_number(payload.get("maxHoldMs")),
    )


def _positive_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _positive_number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return value
    return None


# -- staleness --------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """``isPidAlive``: a process with this pid exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def process_starttime(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks (Linux ``/proc/<pid>/stat`` field 22), or None."""
    return procfs.start_time(pid)


@dataclass(frozen=True, slots=True)
class OwnProcess:
    """The judging process, for ``orphan-self-pid``: a lock naming it that it does not hold."""

    pid: int
    starttime: int | None
    reclaim_without_starttime: bool = True
    """Whether a lock naming our pid but no start time counts as ours (upstream's default)."""


def stale_reasons(
    payload: LockPayload | None,
    now_ms: float,
    *,
    stale_ms: float = DEFAULT_STALE_MS,
    alive: Callable[[int], bool] = pid_alive,
    starttime: Callable[[int], int | None] = process_starttime,
    respect_max_hold: bool = False,
    own: OwnProcess | None = None,
) -> list[StaleReason]:
    """Upstream's ``inspectLockPayload``: why a lock with this payload is stale at ``now_ms``,
    in order; empty when it is live.

    ``hold-exceeded`` is judged only with ``respect_max_hold`` and ``orphan-self-pid`` only
    with ``own`` (OpenClaw's acquirer does both; the interop does neither: it holds its lock
    per write and never takes a lock its own process left). Pure apart from the two process
    probes, which tests replace.
    """
    reasons: list[StaleReason] = []
    pid = payload.pid if payload else None
    created = payload.created_at_ms if payload else None
    if pid is None:
        reasons.append("missing-pid")
    elif not alive(pid):
        reasons.append("dead-pid")
    elif (
        payload
        and payload.starttime is not None
        and starttime(pid) not in (None, payload.starttime)
    ):
        reasons.append("recycled-pid")
    if created is None:
        reasons.append("invalid-createdAt")
    else:
        if now_ms - created > stale_ms:
            reasons.append("too-old")
        max_hold = payload.max_hold_ms if payload else None
        if respect_max_hold and max_hold is not None and now_ms - created > max_hold:
            reasons.append("hold-exceeded")
    if own is not None and pid is not None and pid == own.pid:
        recorded = payload.starttime if payload else None
        same = recorded == own.starttime if recorded is not None else own.reclaim_without_starttime
        if same:
            reasons.append("orphan-self-pid")
    return reasons


def classify_stale(
    reasons: Iterable[str],
    *,
    mtime_age_ms: float,
    stale_ms: float = DEFAULT_STALE_MS,
    grace_ms: float = MALFORMED_GRACE_MS,
) -> StaleVerdict:
    """What to do with a lock showing ``reasons``: leave it, remove it, or only report it.

    ``mtime_age_ms`` is the lock file's age by mtime, used only for malformed payloads.
    """
    found = set(reasons)
    if not found:
        return "not-stale"
    if found <= REPORT_ONLY_STALE_REASONS:
        return "report-only"
    if found <= MALFORMED_STALE_REASONS:
        # Malformed-only: the owner may be suspended between open("wx") and the payload write.
        return "remove" if mtime_age_ms > min(stale_ms, grace_ms) else "not-stale"
    return "remove"


def reclaimable(
    reasons: Iterable[str], file_age_ms: float, *, stale_ms: float = DEFAULT_STALE_MS
) -> bool:
    """Whether a lock with these stale reasons may be removed (with the 30 s grace)."""
    return classify_stale(reasons, mtime_age_ms=file_age_ms, stale_ms=stale_ms) == "remove"


# -- the file ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LockSnapshot:
    """What a lock file looked like: raw bytes, identity and mtime."""

    raw: bytes
    dev: int
    ino: int
    mtime_ns: int

    @property
    def mtime_ms(self) -> float:
        return self.mtime_ns / 1e6

    @property
    def payload(self) -> LockPayload | None:
        return parse_lock_payload(self.raw)

    def same_lock(self, other: LockSnapshot | None) -> bool:
        """Same lock file: same inode and same content (mtime may be touched)."""
        return other is not None and (self.raw, self.dev, self.ino) == (
            other.raw,
            other.dev,
            other.ino,
        )


def read_snapshot(path: str, dir_fd: int | None = None) -> LockSnapshot | None:
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
    return LockSnapshot(b"".join(chunks), st.st_dev, st.st_ino, st.st_mtime_ns)


def create_lock(
    path: str, text: str, *, mode: int = 0o600, dir_fd: int | None = None
) -> LockSnapshot | None:
    """Create the lock file exclusively with ``text``; None when it already exists.

    A failed payload write removes the half-made file and raises.
    """
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode, dir_fd=dir_fd)
    except FileExistsError:
        return None
    raw = text.encode("utf-8")
    try:
        write_all(fd, raw)
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path, dir_fd=dir_fd)
        raise
    os.close(fd)
    return LockSnapshot(raw, st.st_dev, st.st_ino, st.st_mtime_ns)


def remove_if_unchanged(
    path: str, snapshot: LockSnapshot, dir_fd: int | None = None
) -> Literal["removed", "changed", "gone"]:
    """Unlink the lock file if it is still the one of ``snapshot``.

    ``gone`` when there was no lock file left to remove, ``changed`` when another one (or
    other content) is there now: it is left alone.
    """
    current = read_snapshot(path, dir_fd)
    if current is None:
        return "gone"
    if not snapshot.same_lock(current):
        return "changed"
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return "gone"
    return "removed"


def inspect(path: str, now: float, *, stale_ms: int = DEFAULT_STALE_MS) -> list[StaleReason]:
    """Stale reasons of the lock file at ``path`` at ``now`` (Unix seconds), for ``doctor``.

    Empty when the lock is live or there is no lock file.
    """
    snap = read_snapshot(path)
    if snap is None:
        return []
    return stale_reasons(snap.payload, int(now * 1000), stale_ms=stale_ms)
