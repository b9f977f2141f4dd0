"""The interop client of OpenClaw's ``<file>.lock`` protocol (``sessionlane.actors.openclaw_lock``).

With ``legacy_lock = true`` the SessionFile actor takes the runtime's own lock file around each
write, so processes that still use the lock-file protocol interleave with sessionlane at write
granularity. This client never waits: ``try_acquire`` answers at once and the actor retries
later with a wakeup. The format, liveness and staleness rules are the protocol module's (the
race's baseline uses the same module); what is this client's own: it writes no ``maxHoldMs``,
judges neither ``hold-exceeded`` nor ``orphan-self-pid``, gives a malformed lock the 30 s
grace, and works relative to the transcript's confined directory.

A lease holder may hold the lock file itself for the whole lease: the OpenClaw drop-in
(``clients/node/src/openclaw.ts``) does, so that processes still on OpenClaw's lock wait for it.
Its payload then names the lease (``sessionlaneLease``, a field OpenClaw ignores), and a write
under that lease goes ahead under the holder's lock (``try_acquire(lease=...)``): borrowed, never
removed by this client.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

from sessionlane.actors.confined import ConfinedDir
from sessionlane.actors.openclaw_lock import (
    DEFAULT_STALE_MS,
    REPORT_ONLY_STALE_REASONS,
    LockSnapshot,
    create_lock,
    encode_lock_payload,
    lock_path,
    process_starttime,
    read_snapshot,
    reclaimable,
    remove_if_unchanged,
    stale_reasons,
)

__all__ = ["LegacyLock"]

_log = logging.getLogger(__name__)


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
        self._mine: LockSnapshot | None = None
        self._borrowed = False
        self._directory = directory
        self._name = os.path.basename(self.path) if directory is not None else self.path

    @property
    def _dir_fd(self) -> int | None:
        return self._directory.fd if self._directory is not None else None

    @property
    def held(self) -> bool:
        """Whether this object believes it holds the lock (its own, or a lease holder's)."""
        return self._mine is not None or self._borrowed

    def try_acquire(self, *, lease: str | None = None) -> bool:
        """Create the lock file if it is free or stale; False when a live owner holds it.

        A stale lock is removed only if it is unchanged since it was read, then creation is
        tried once more. A live lock whose payload names ``lease`` (``sessionlaneLease``) is
        that lease holder's: the write under ``lease`` may go, and the lock is borrowed (left
        in place at ``release``). Never sleeps; the caller retries later.
        """
        if self._mine is not None or self._borrowed:
            return True
        if self._directory is not None:
            self._directory.revalidate()
        for _attempt in range(2):
            if self._create():
                return True
            snap = read_snapshot(self._name, self._dir_fd)
            if snap is None:
                continue  # released between our create and our read
            if lease is not None and self._held_for(snap, lease):
                self._borrowed = True
                return True
            if not self._remove_if_stale(snap):
                return False
        return False

    def release(self) -> None:
        """Remove the lock file if it is still ours (same inode and content); else forget it.

        A borrowed lock (a lease holder's) is only forgotten.
        """
        self._borrowed = False
        mine, self._mine = self._mine, None
        if mine is None:
            return
        if remove_if_unchanged(self._name, mine, self._dir_fd) != "removed":
            _log.warning("legacy lock %s is no longer ours; left in place", self.path)

    def _create(self) -> bool:
        pid = os.getpid()
        text = encode_lock_payload(pid, int(self._clock() * 1000), starttime=process_starttime(pid))
        self._mine = create_lock(self._name, text, dir_fd=self._dir_fd)
        return self._mine is not None

    def _held_for(self, snap: LockSnapshot, lease: str) -> bool:
        """Whether ``snap`` is a live lock its holder took for ``lease``."""
        try:
            named = json.loads(snap.raw).get("sessionlaneLease")
        except (ValueError, AttributeError):
            return False
        if named != lease:
            return False
        # Alive: a holder past staleMs or its own maxHoldMs still holds (report-only reasons).
        reasons = stale_reasons(snap.payload, int(self._clock() * 1000), stale_ms=self.stale_ms)
        return set(reasons) <= REPORT_ONLY_STALE_REASONS

    def _remove_if_stale(self, snap: LockSnapshot) -> bool:
        """Remove the lock of ``snap`` if stale and unchanged; whether it is gone now."""
        now_ms = int(self._clock() * 1000)
        reasons = stale_reasons(snap.payload, now_ms, stale_ms=self.stale_ms)
        if not reasons:
            return False
        if not reclaimable(reasons, now_ms - snap.mtime_ms, stale_ms=self.stale_ms):
            _log.debug("legacy lock %s stale (%s) but not removable", self.path, reasons)
            return False
        outcome = remove_if_unchanged(self._name, snap, self._dir_fd)
        if outcome == "removed":
            _log.warning(
                "removed stale legacy lock %s (%s): %s",
                self.path,
                ", ".join(reasons),
                snap.raw.decode("utf-8", "replace").strip(),
            )
        return outcome != "changed"
