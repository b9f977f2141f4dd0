"""OpenClaw's session write-lock *acquirer*, ported to Python (upstream's
``src/agents/session-write-lock.ts``): the client of the lock the baseline uses.

The lock itself (the ``<session file>.lock`` path, its JSON payload, liveness, the stale
reasons and what may be removed, remove-if-unchanged) is ``sessionlane.actors.openclaw_lock``, the
module the interop uses too, so the race and the interop cannot disagree about it. This module keeps
what belongs to OpenClaw's acquirer (its policy and errors are
``sessionlane.system.race._lockpolicy``):

* one acquire-timeout budget across retries, a constant retry delay (upstream: fs-safe
  ``retry: {minTimeout: 50, maxTimeout: 1000, factor: 1}``, i.e. 50 ms every time);
* the acquirer's view of staleness: ``hold-exceeded`` and ``orphan-self-pid`` are judged, a
  lock this process holds is never stale, the mtime grace depends on the timeout, and a
  report-only verdict raises ``SessionWriteLockStaleError`` while the holder lives;
* no reentrancy by default (a second acquire from the same process contends like a foreign
  process); reentrancy with ``allow_reentrant`` is a refcount;
* the in-process max-hold watchdog: a thread that *silently* force-releases an entry held past
  its ``maxHoldMs`` (the holder is not told, its release handle becomes a no-op);
* exit/signal cleanup that releases held locks if they are unchanged.

Simplifications (each also noted where it happens):

* ``non-openclaw-owner`` (owner argv inspection) is not implemented: every holder in the race
  is the same program, so the reason could never fire;
* no event-loop yields: Python threads give the same interleaving freedom;
* the lock file's descriptor is closed once the payload is written (upstream keeps its handle
  until release; nothing reads through it);
* times come from injectable clocks so tests can drive the watchdog and the stale rules.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sessionlane.actors.openclaw_lock import (
    LockPayload,
    LockSnapshot,
    OwnProcess,
    StaleReason,
    StaleVerdict,
    classify_stale,
    create_lock,
    encode_lock_payload,
    lock_path,
    lock_path_for,
    normalize_session_file,
    pid_alive,
    process_starttime,
    read_snapshot,
    remove_if_unchanged,
    stale_reasons,
)
from sessionlane.system.race._lockpolicy import (
    DEFAULT_LOCK_POLICY,
    LockPolicy,
    SessionWriteLockError,
    SessionWriteLockStaleError,
    SessionWriteLockTimeoutError,
    orphan_payload_grace_ms,
)

__all__ = [
    "DEFAULT_LOCK_POLICY",
    "LockPolicy",
    "SessionWriteLock",
    "SessionWriteLockError",
    "SessionWriteLockManager",
    "SessionWriteLockStaleError",
    "SessionWriteLockTimeoutError",
    "default_manager",
    "inspect_lock_payload",
    "lock_path_for",
    "normalize_session_file",
    "orphan_payload_grace_ms",
    "register_cleanup_handlers",
]


# ---------------------------------------------------------------------------------------------
# The acquirer's view of staleness


def inspect_lock_payload(
    payload: LockPayload | None,
    *,
    now_ms: float,
    stale_ms: float,
    respect_max_hold: bool,
    held_by_this_process: bool,
    own_pid: int,
    own_starttime: int | None,
    alive: Callable[[int], bool] = pid_alive,
    start_time_of: Callable[[int], int | None] = process_starttime,
    reclaim_lock_without_starttime: bool = True,
) -> list[StaleReason]:
    """Upstream's ``inspectLockPayload`` as the acquirer calls it (``stale_reasons``).

    A lock held by this process is never reported stale during contention, so it yields no
    reason. ``respect_max_hold`` is ``not held_by_this_process`` during acquisition.
    """
    if held_by_this_process:
        return []
    return stale_reasons(
        payload,
        now_ms,
        stale_ms=stale_ms,
        alive=alive,
        starttime=start_time_of,
        respect_max_hold=respect_max_hold,
        own=OwnProcess(own_pid, own_starttime, reclaim_lock_without_starttime),
    )


# ---------------------------------------------------------------------------------------------
# The lock manager


@dataclass
class _HeldEntry:
    lock_path: str
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
        self.lock_path = lock_path(key)
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
        self._starttime = process_starttime(self._pid)
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
        grace = orphan_payload_grace_ms(timeout_ms) if orphan_grace_ms is None else orphan_grace_ms
        started = self._monotonic()
        deadline = started + timeout_ms / 1000.0
        while True:
            handle = self._try_take(key, max_hold_ms, started, allow_reentrant=allow_reentrant)
            if handle is not None:
                self._ensure_watchdog()
                return handle
            snapshot = read_snapshot(lock_path(key))
            if snapshot is None:
                continue  # vanished between open and read: retry at once, as upstream
            remaining_s = self._contend(key, snapshot, stale_ms, grace, deadline, timeout_ms)
            if remaining_s is not None:
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

    def _try_take(
        self, key: str, max_hold_ms: float, started: float, *, allow_reentrant: bool
    ) -> SessionWriteLock | None:
        """One ``O_EXCL`` attempt (or a reentrant count); None when someone else holds it."""
        with self._mutex:
            entry = self._held.get(key)
            if entry is not None and allow_reentrant:
                entry.count += 1
                return self._new_handle(key, entry, started)
            # create + payload + table entry under the mutex: another thread of this process
            # must never see our fresh lock file while it is not yet in the table, or it would
            # judge it "orphan-self-pid" and remove it.
            now_ms = self._wall_ms()
            text = encode_lock_payload(
                self._pid, now_ms, max_hold_ms=max_hold_ms, starttime=self._starttime
            )
            # No fsync: fs-safe does not sync the payload either.
            snapshot = create_lock(lock_path(key), text, mode=0o644)
            if snapshot is None:
                return None
            entry = _HeldEntry(
                lock_path=lock_path(key),
                snapshot=snapshot,
                acquired_at_ms=now_ms,
                max_hold_ms=max_hold_ms,
            )
            self._held[key] = entry
            return self._new_handle(key, entry, started)

    def _contend(
        self,
        key: str,
        snapshot: LockSnapshot,
        stale_ms: float,
        grace: float,
        deadline: float,
        timeout_ms: float,
    ) -> float | None:
        """Deal with the lock someone else holds: None to retry at once, else the seconds
        left to sleep in; raises when the budget ran out or the holder is report-only stale."""
        path = lock_path(key)
        with self._mutex:
            held_by_us = key in self._held
        verdict, reasons = self._verdict(snapshot, stale_ms, grace, held_by_us)
        remaining_s = deadline - self._monotonic()
        # Stale: remove if unchanged, then retry at once ("removed" or "changed"). A lock that
        # keeps changing under us belongs to live writers: the budget bounds the loop.
        if verdict == "remove" and (
            remove_if_unchanged(path, snapshot) == "removed" or remaining_s > 0
        ):
            return None
        if verdict == "report-only":
            # file_lock_stale: retry only if the diagnostics no longer agree, else report.
            again = read_snapshot(path)
            cleared = again is None or (
                self._verdict(again, stale_ms, grace, held_by_us)[0] == "not-stale"
            )
            if cleared and remaining_s > 0:
                return None
            raise SessionWriteLockStaleError(
                lock_path=path, owner=self._describe_owner(snapshot), reasons=reasons
            )
        if remaining_s <= 0:
            raise SessionWriteLockTimeoutError(
                timeout_ms=timeout_ms, lock_path=path, owner=self._describe_owner(snapshot)
            )
        return remaining_s

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
        payload = snapshot.payload
        pid = payload.pid if payload else None
        created = payload.created_at_ms if payload else None
        if pid is None or created is None:
            return "owner=unknown"
        age = round(self._wall_ms() - created)
        return f"pid={pid} alive={str(pid_alive(pid)).lower()} ageMs={age}"

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
        remove_if_unchanged(entry.lock_path, entry.snapshot)

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
