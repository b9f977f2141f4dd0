"""OpenClaw's cross-process session write lock, ported to Python (upstream's
``src/agents/session-write-lock.ts``).

This is the lower layer of the baseline: one ``<session file>.lock`` per transcript, created
with ``O_CREAT | O_EXCL`` (upstream: ``fs.open(lockPath, "wx")``), carrying a JSON payload
``{pid, createdAt, maxHoldMs, starttime}`` written with ``indent=2`` plus a newline.

Faithful parts:

* one acquire-timeout budget across retries, a constant retry delay (upstream: fs-safe
  ``retry: {minTimeout: 50, maxTimeout: 1000, factor: 1}``, i.e. 50 ms every time);
* stale detection with upstream's reason strings (``inspect_lock_payload``), the mtime grace
  for malformed payloads, report-only reasons (``too-old``, ``hold-exceeded``) that are
  reported with ``SessionWriteLockStaleError`` but never removed while the holder lives;
* ``remove-if-unchanged`` stale removal (raw text and file identity compared just before the
  unlink; the same small TOCTOU window as upstream);
* no reentrancy by default (a second acquire from the same process contends like a foreign
  process); reentrancy with ``allow_reentrant`` is a refcount;
* the in-process max-hold watchdog: a thread that *silently* force-releases an entry held past
  its ``maxHoldMs`` (the holder is not told, its release handle becomes a no-op);
* exit/signal cleanup that releases held locks if they are unchanged.

Simplifications (each also noted where it happens):

* ``non-openclaw-owner`` (owner argv inspection) is not implemented: every holder in the race
  is the same program, so the reason could never fire;
* no event-loop yields: Python threads give the same interleaving freedom;
* times come from injectable clocks so tests can drive the watchdog and the stale rules.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

__all__ = [
    "DEFAULT_LOCK_POLICY",
    "MALFORMED_STALE_REASONS",
    "REPORT_ONLY_STALE_REASONS",
    "LockPolicy",
    "LockSnapshot",
    "SessionWriteLock",
    "SessionWriteLockError",
    "SessionWriteLockManager",
    "SessionWriteLockStaleError",
    "SessionWriteLockTimeoutError",
    "StaleReason",
    "StaleVerdict",
    "classify_stale",
    "default_manager",
    "encode_lock_payload",
    "inspect_lock_payload",
    "lock_path_for",
    "normalize_session_file",
    "orphan_payload_grace_ms",
    "parse_lock_payload",
    "pid_alive",
    "process_start_time",
    "register_cleanup_handlers",
]

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


@dataclass(frozen=True)
class LockPolicy:
    """The session write-lock policy, in milliseconds of wall time.

    The defaults are upstream's: acquire timeout 60 s, ``staleMs`` 30 min,
    ``maxHoldMs`` 5 min, watchdog every 60 s, retry every 50 ms. ``scaled(speed)`` divides
    every duration by the race's speed factor so the ratios between model time, lock budgets
    and retry delay stay those of the real system.
    """

    timeout_ms: float = 60_000.0
    """The one acquire budget shared by every retry of one acquisition."""
    stale_ms: float = 1_800_000.0
    """Age past which a lock is ``too-old`` (report-only while its holder lives)."""
    max_hold_ms: float = 300_000.0
    """The holder's own budget: written into the payload, enforced by its watchdog."""
    watchdog_interval_ms: float = 60_000.0
    """How often the in-process watchdog looks for entries held past ``max_hold_ms``."""
    retry_delay_ms: float = 50.0
    """Constant delay between two ``O_EXCL`` attempts (``factor: 1``)."""
    orphan_payload_grace_ms: float = 30_000.0
    """mtime grace for a lock whose payload is missing or malformed."""

    def scaled(self, speed: float) -> LockPolicy:
        """The same policy with every duration divided by ``speed`` (retry delay >= 1 ms)."""
        if speed <= 0:
            raise ValueError("speed must be positive")
        return replace(
            self,
            timeout_ms=self.timeout_ms / speed,
            stale_ms=self.stale_ms / speed,
            max_hold_ms=self.max_hold_ms / speed,
            watchdog_interval_ms=self.watchdog_interval_ms / speed,
            retry_delay_ms=max(1.0, self.retry_delay_ms / speed),
            orphan_payload_grace_ms=self.orphan_payload_grace_ms / speed,
        )


def orphan_payload_grace_ms(timeout_ms: float) -> float:
    """Upstream's ``orphanPayloadGraceMs``: 5 s for short acquire timeouts, else 30 s."""
    return 5_000.0 if timeout_ms < 30_000 else 30_000.0


DEFAULT_LOCK_POLICY = LockPolicy()


# ---------------------------------------------------------------------------------------------
# Errors


class SessionWriteLockError(Exception):
    """Base of the baseline's lock errors; fields survive pickling."""

    code = "OPENCLAW_SESSION_WRITE_LOCK"

    def __init__(self, message: str, *, lock_path: str, owner: str) -> None:
        super().__init__(message)
        self.lock_path = lock_path
        self.owner = owner


class SessionWriteLockTimeoutError(SessionWriteLockError):
    """The acquire budget ran out while another holder kept the lock."""

    code = "OPENCLAW_SESSION_WRITE_LOCK_TIMEOUT"

    def __init__(self, *, timeout_ms: float, lock_path: str, owner: str) -> None:
        super().__init__(
            f"session file locked (timeout {round(timeout_ms)}ms): {owner} {lock_path}",
            lock_path=lock_path,
            owner=owner,
        )
        self.timeout_ms = timeout_ms

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_timeout, (self.timeout_ms, self.lock_path, self.owner))


class SessionWriteLockStaleError(SessionWriteLockError):
    """The lock looks stale only for report-only reasons: its live holder is respected."""

    code = "OPENCLAW_SESSION_WRITE_LOCK_STALE"

    def __init__(self, *, lock_path: str, owner: str, reasons: Iterable[str]) -> None:
        self.reasons = tuple(reasons)
        super().__init__(
            f"session write lock is stale ({', '.join(self.reasons)}): {owner} {lock_path}",
            lock_path=lock_path,
            owner=owner,
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_stale, (self.lock_path, self.owner, self.reasons))


def _rebuild_timeout(timeout_ms: float, lock_path: str, owner: str) -> SessionWriteLockTimeoutError:
    return SessionWriteLockTimeoutError(timeout_ms=timeout_ms, lock_path=lock_path, owner=owner)


def _rebuild_stale(
    lock_path: str, owner: str, reasons: tuple[str, ...]
) -> SessionWriteLockStaleError:
    return SessionWriteLockStaleError(lock_path=lock_path, owner=owner, reasons=reasons)


# ---------------------------------------------------------------------------------------------
# Paths, payload, process inspection


def normalize_session_file(session_file: str | os.PathLike[str]) -> str:
    """``realpath(dirname)`` + basename, as upstream: symlinked directories share one lock."""
    resolved = os.path.abspath(os.fspath(session_file))
    try:
        directory = os.path.realpath(os.path.dirname(resolved), strict=True)
    except OSError:
        return resolved
    return os.path.join(directory, os.path.basename(resolved))


def lock_path_for(session_file: str | os.PathLike[str]) -> str:
    """The lock file of a transcript: ``<normalized session file>.lock``."""
    return normalize_session_file(session_file) + ".lock"


def encode_lock_payload(
    *, pid: int, created_at_ms: float, max_hold_ms: float, starttime: int | None
) -> bytes:
    """The payload bytes: ``JSON.stringify(payload, null, 2) + "\\n"`` (starttime if known)."""
    payload: dict[str, object] = {
        "pid": pid,
        "createdAt": _iso(created_at_ms),
        "maxHoldMs": round(max_hold_ms),
    }
    if starttime is not None:
        payload["starttime"] = starttime
    return (json.dumps(payload, indent=2) + "\n").encode()


def parse_lock_payload(raw: bytes) -> dict[str, object] | None:
    """The payload as a JSON object, or None when it is empty or not an object."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _iso(ms: float) -> str:
    stamp = datetime.fromtimestamp(ms / 1000.0, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _parse_created_at(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp() * 1000.0


def pid_alive(pid: int) -> bool:
    """``isPidAlive``: signal 0 reaches the process (EPERM still means it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (clock ticks), None off Linux or for a gone pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Stale detection (pure)


def inspect_lock_payload(
    payload: Mapping[str, object] | None,
    *,
    now_ms: float,
    stale_ms: float,
    respect_max_hold: bool,
    held_by_this_process: bool,
    own_pid: int,
    own_starttime: int | None,
    alive: Callable[[int], bool] = pid_alive,
    start_time_of: Callable[[int], int | None] = process_start_time,
    reclaim_lock_without_starttime: bool = True,
) -> list[StaleReason]:
    """Upstream's ``inspectLockPayload``: every reason the lock might be stale, in order.

    A lock held by this process is never reported stale during contention, so it yields no
    reason. ``respect_max_hold`` is ``not held_by_this_process`` during acquisition.
    """
    if held_by_this_process:
        return []
    reasons: list[StaleReason] = []
    data = payload or {}
    pid = data.get("pid")
    starttime = data.get("starttime")
    valid_pid = isinstance(pid, int) and not isinstance(pid, bool) and pid > 0
    if not valid_pid:
        reasons.append("missing-pid")
    else:
        assert isinstance(pid, int)
        if not alive(pid):
            reasons.append("dead-pid")
        elif isinstance(starttime, int) and start_time_of(pid) not in (None, starttime):
            reasons.append("recycled-pid")
    created_ms = _parse_created_at(data.get("createdAt"))
    if created_ms is None:
        reasons.append("invalid-createdAt")
    else:
        age_ms = now_ms - created_ms
        if age_ms > stale_ms:
            reasons.append("too-old")
        max_hold = data.get("maxHoldMs")
        if (
            respect_max_hold
            and isinstance(max_hold, int | float)
            and not isinstance(max_hold, bool)
            and max_hold > 0
            and age_ms > max_hold
        ):
            reasons.append("hold-exceeded")
    if valid_pid and pid == own_pid:
        same_process = (
            starttime == own_starttime
            if isinstance(starttime, int)
            else reclaim_lock_without_starttime
        )
        if same_process:
            reasons.append("orphan-self-pid")
    return reasons


def classify_stale(
    reasons: Iterable[str], *, mtime_age_ms: float, stale_ms: float, grace_ms: float
) -> StaleVerdict:
    """What to do with a lock showing ``reasons``: leave it, remove it, or only report it."""
    found = set(reasons)
    if not found:
        return "not-stale"
    if found <= REPORT_ONLY_STALE_REASONS:
        return "report-only"
    if found <= MALFORMED_STALE_REASONS:
        # Malformed-only: the owner may be suspended between open("wx") and the payload write.
        return "remove" if mtime_age_ms > min(stale_ms, grace_ms) else "not-stale"
    return "remove"


# ---------------------------------------------------------------------------------------------
# The lock manager


@dataclass(frozen=True)
class LockSnapshot:
    """What a lock file looked like: raw bytes, identity and mtime (``lstat``)."""

    raw: bytes
    dev: int
    ino: int
    mtime_ms: float

    @property
    def payload(self) -> dict[str, object] | None:
        return parse_lock_payload(self.raw)


def _read_snapshot(lock_path: str) -> LockSnapshot | None:
    try:
        st = os.lstat(lock_path)
        with open(lock_path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return None
    return LockSnapshot(raw=raw, dev=st.st_dev, ino=st.st_ino, mtime_ms=st.st_mtime_ns / 1e6)


def _remove_if_unchanged(lock_path: str, snapshot: LockSnapshot) -> Literal["removed", "changed"]:
    current = _read_snapshot(lock_path)
    if current is None:
        return "changed"
    if (current.raw, current.dev, current.ino) != (snapshot.raw, snapshot.dev, snapshot.ino):
        return "changed"
    # Same window as upstream between this compare and the unlink; see module docstring.
    try:
        os.unlink(lock_path)
    except FileNotFoundError:
        return "changed"
    return "removed"


@dataclass
class _HeldEntry:
    lock_path: str
    fd: int
    snapshot: LockSnapshot
    acquired_at_ms: float
    max_hold_ms: float
    count: int = 1
    handles: list[SessionWriteLock] = field(default_factory=list)


class SessionWriteLock:
    """A release handle for one acquisition. ``release()`` is idempotent.

    After the watchdog force-released the entry, ``release()`` is a silent no-op (upstream's
    stale handle). ``acquired_at``/``released_at`` are ``time.monotonic()`` stamps (shared by
    every process on Linux), used by the race to measure hand-off latency.
    """

    def __init__(
        self, manager: SessionWriteLockManager, key: str, *, acquired_at: float, waited_ms: float
    ) -> None:
        self._manager = manager
        self._key = key
        self.lock_path = key + ".lock"
        self.acquired_at = acquired_at
        self.waited_ms = waited_ms
        self.released_at: float | None = None
        self.force_released = False

    @property
    def released(self) -> bool:
        return self.released_at is not None

    def release(self) -> None:
        """Give this acquisition back; the file goes when the refcount reaches zero."""
        self._manager._release(self._key, self)


class SessionWriteLockManager:
    """Process-global lock table (upstream: ``createFileLockManager(...)`` on ``globalThis``).

    Thread-safe. One entry per normalized session file; the watchdog thread starts on the
    first acquisition.
    """

    def __init__(
        self,
        *,
        watchdog_interval_ms: float = DEFAULT_LOCK_POLICY.watchdog_interval_ms,
        start_watchdog: bool = True,
        wall_ms: Callable[[], float] = lambda: time.time() * 1000.0,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self._watchdog_interval_ms = watchdog_interval_ms
        self._start_watchdog = start_watchdog
        self._wall_ms = wall_ms
        self._monotonic = monotonic
        self._sleep = sleep
        self._log = log or _stderr
        self._pid = os.getpid()
        self._starttime = process_start_time(self._pid)
        self._held: dict[str, _HeldEntry] = {}
        self._mutex = threading.Lock()
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()

    # -- public -------------------------------------------------------------------------------

    def acquire(
        self,
        session_file: str | os.PathLike[str],
        *,
        timeout_ms: float = DEFAULT_LOCK_POLICY.timeout_ms,
        stale_ms: float = DEFAULT_LOCK_POLICY.stale_ms,
        max_hold_ms: float = DEFAULT_LOCK_POLICY.max_hold_ms,
        retry_delay_ms: float = DEFAULT_LOCK_POLICY.retry_delay_ms,
        orphan_grace_ms: float | None = None,
        allow_reentrant: bool = False,
    ) -> SessionWriteLock:
        """``acquireSessionWriteLock``: take ``<file>.lock`` within one ``timeout_ms`` budget.

        Raises ``SessionWriteLockTimeoutError`` when the budget runs out and
        ``SessionWriteLockStaleError`` when a live holder is only report-only stale.
        """
        key = normalize_session_file(session_file)
        lock_path = key + ".lock"
        grace = orphan_payload_grace_ms(timeout_ms) if orphan_grace_ms is None else orphan_grace_ms
        started = self._monotonic()
        deadline = started + timeout_ms / 1000.0
        while True:
            with self._mutex:
                entry = self._held.get(key)
                if entry is not None and allow_reentrant:
                    entry.count += 1
                    return self._new_handle(key, entry, started)
                # open + payload + table entry under the mutex: another thread of this process
                # must never see our fresh lock file while it is not yet in the table, or it
                # would judge it "orphan-self-pid" and remove it.
                try:
                    fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    fd = -1
                if fd >= 0:
                    handle = self._install(key, fd, max_hold_ms, started)
            if fd >= 0:
                self._ensure_watchdog()
                return handle
            snapshot = _read_snapshot(lock_path)
            if snapshot is None:
                continue  # vanished between open and read: retry at once, as upstream
            with self._mutex:
                held_by_us = key in self._held
            verdict, reasons = self._verdict(snapshot, stale_ms, grace, held_by_us)
            remaining_s = deadline - self._monotonic()
            # Stale: remove if unchanged, then retry at once ("removed" or "changed"). A lock
            # that keeps changing under us belongs to live writers: the budget bounds the loop.
            if verdict == "remove" and (
                _remove_if_unchanged(lock_path, snapshot) == "removed" or remaining_s > 0
            ):
                continue
            if verdict == "report-only":
                # file_lock_stale: retry only if the diagnostics no longer agree, else report.
                again = _read_snapshot(lock_path)
                cleared = again is None or (
                    self._verdict(again, stale_ms, grace, held_by_us)[0] == "not-stale"
                )
                if cleared and remaining_s > 0:
                    continue
                raise SessionWriteLockStaleError(
                    lock_path=lock_path, owner=self._describe_owner(snapshot), reasons=reasons
                )
            if remaining_s <= 0:
                raise SessionWriteLockTimeoutError(
                    timeout_ms=timeout_ms, lock_path=lock_path, owner=self._describe_owner(snapshot)
                )
            self._sleep(min(retry_delay_ms / 1000.0, remaining_s))

    def run_watchdog_check(self, now_ms: float | None = None) -> list[str]:
        """One watchdog pass: force-release every entry held past its ``maxHoldMs``.

        Silent towards the holder, as upstream (#113019: "silent and non-abortive"); one
        stderr line per release. Returns the released lock paths.
        """
        now = self._wall_ms() if now_ms is None else now_ms
        with self._mutex:
            expired = [
                (key, entry)
                for key, entry in self._held.items()
                if now - entry.acquired_at_ms > entry.max_hold_ms
            ]
            for key, entry in expired:
                held_for = round(now - entry.acquired_at_ms)
                self._log(
                    f"[session-write-lock] releasing lock held for {held_for}ms "
                    f"(max={round(entry.max_hold_ms)}ms): {entry.lock_path}"
                )
                self._drop(key, entry, force=True)
        return [entry.lock_path for _, entry in expired]

    def release_all(self) -> None:
        """``releaseAllLocksSync``: drop every entry, removing files that are unchanged."""
        with self._mutex:
            for key, entry in list(self._held.items()):
                self._drop(key, entry, force=True)

    def held_paths(self) -> list[str]:
        """Lock paths this process currently holds."""
        with self._mutex:
            return [entry.lock_path for entry in self._held.values()]

    def is_held(self, session_file: str | os.PathLike[str]) -> bool:
        with self._mutex:
            return normalize_session_file(session_file) in self._held

    def close(self) -> None:
        """Stop the watchdog thread (held entries stay held)."""
        self._stop.set()

    # -- internals ----------------------------------------------------------------------------

    def _verdict(
        self, snapshot: LockSnapshot, stale_ms: float, grace_ms: float, held_by_us: bool
    ) -> tuple[StaleVerdict, list[StaleReason]]:
        now = self._wall_ms()
        reasons = inspect_lock_payload(
            snapshot.payload,
            now_ms=now,
            stale_ms=stale_ms,
            respect_max_hold=not held_by_us,
            held_by_this_process=held_by_us,
            own_pid=self._pid,
            own_starttime=self._starttime,
        )
        verdict = classify_stale(
            reasons, mtime_age_ms=now - snapshot.mtime_ms, stale_ms=stale_ms, grace_ms=grace_ms
        )
        return verdict, reasons

    def _describe_owner(self, snapshot: LockSnapshot) -> str:
        payload = snapshot.payload or {}
        pid = payload.get("pid")
        created = _parse_created_at(payload.get("createdAt"))
        if not isinstance(pid, int) or created is None:
            return "owner=unknown"
        age = round(self._wall_ms() - created)
        return f"pid={pid} alive={str(pid_alive(pid)).lower()} ageMs={age}"

    def _install(self, key: str, fd: int, max_hold_ms: float, started: float) -> SessionWriteLock:
        # Called with the mutex held.
        now_ms = self._wall_ms()
        raw = encode_lock_payload(
            pid=self._pid, created_at_ms=now_ms, max_hold_ms=max_hold_ms, starttime=self._starttime
        )
        os.write(fd, raw)  # no fsync: fs-safe does not sync the payload either
        st = os.fstat(fd)
        snapshot = LockSnapshot(
            raw=raw, dev=st.st_dev, ino=st.st_ino, mtime_ms=st.st_mtime_ns / 1e6
        )
        entry = _HeldEntry(
            lock_path=key + ".lock",
            fd=fd,
            snapshot=snapshot,
            acquired_at_ms=now_ms,
            max_hold_ms=max_hold_ms,
        )
        self._held[key] = entry
        return self._new_handle(key, entry, started)

    def _new_handle(self, key: str, entry: _HeldEntry, started: float) -> SessionWriteLock:
        now = self._monotonic()
        handle = SessionWriteLock(self, key, acquired_at=now, waited_ms=(now - started) * 1000)
        entry.handles.append(handle)
        return handle

    def _release(self, key: str, handle: SessionWriteLock) -> None:
        with self._mutex:
            if handle.released:
                return
            handle.released_at = self._monotonic()
            entry = self._held.get(key)
            if entry is None or handle not in entry.handles:
                return  # force-released earlier: the stale handle is a no-op
            entry.handles.remove(handle)
            entry.count -= 1
            if entry.count <= 0:
                self._drop(key, entry, force=False)

    def _drop(self, key: str, entry: _HeldEntry, *, force: bool) -> None:
        # Called with the mutex held.
        self._held.pop(key, None)
        now = self._monotonic()
        for handle in entry.handles:
            handle.force_released = force
            if handle.released_at is None:
                handle.released_at = now
        entry.handles.clear()
        entry.count = 0
        with contextlib.suppress(OSError):
            os.close(entry.fd)
        _remove_if_unchanged(entry.lock_path, entry.snapshot)

    def _ensure_watchdog(self) -> None:
        if not self._start_watchdog or self._watchdog is not None:
            return
        with self._mutex:
            if self._watchdog is not None:
                return
            self._watchdog = threading.Thread(
                target=self._watchdog_loop, name="session-write-lock-watchdog", daemon=True
            )
            self._watchdog.start()

    def _watchdog_loop(self) -> None:
        # A thread, where upstream has an unref'd setInterval; unlike upstream it still fires
        # when the holder's thread is wedged (only a fully wedged interpreter stops it).
        while not self._stop.wait(self._watchdog_interval_ms / 1000.0):
            self.run_watchdog_check()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


_DEFAULT_MANAGER: SessionWriteLockManager | None = None
_DEFAULT_LOCK = threading.Lock()


def default_manager(
    watchdog_interval_ms: float = DEFAULT_LOCK_POLICY.watchdog_interval_ms,
) -> SessionWriteLockManager:
    """The process-global manager (created on first use with ``watchdog_interval_ms``)."""
    global _DEFAULT_MANAGER
    with _DEFAULT_LOCK:
        if _DEFAULT_MANAGER is None:
            _DEFAULT_MANAGER = SessionWriteLockManager(watchdog_interval_ms=watchdog_interval_ms)
        return _DEFAULT_MANAGER


def register_cleanup_handlers(manager: SessionWriteLockManager) -> None:
    """Release every held lock at exit and on SIGINT/SIGTERM/SIGQUIT/SIGABRT, as upstream.

    Must be called from the main thread. After releasing, the signal is re-raised with the
    previous disposition when that was the default one (upstream re-raises only if it was the
    sole listener); a custom previous handler is called instead.
    """
    atexit.register(manager.release_all)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGABRT):
        previous = signal.getsignal(signum)

        def handler(
            received: int, frame: object, *, _previous: object = previous, _signum: int = signum
        ) -> None:
            manager.release_all()
            if callable(_previous):
                _previous(received, frame)
                return
            signal.signal(_signum, signal.SIG_DFL)
            os.kill(os.getpid(), _signum)

        signal.signal(signum, handler)
