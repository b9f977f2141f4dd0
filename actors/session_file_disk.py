"""The disk side of a SessionFile's writes: what the shell does when the write path says so.

``WritePath`` (``sessionlane.actors.session_file_writes``) decides and does no I/O; its effects
name what to do to the disk, and ``FileDisk`` does it and reports what happened:

* ``WriteOut``: look for an outside change, repair a torn tail if asked, then append the
  op's bytes (or replace the file with them); the ``WriteOutcome`` goes back to
  ``WritePath.written``;
* ``Sync`` (and every commit, before the held acks go): fdatasync what no sync covers yet,
  timed by the shell's clock, reported to ``TranscriptSync``;
* the legacy lock: ``take_legacy`` before a drain (its ``LockOutcome`` goes to
  ``WritePath.begin_drain``), ``ReleaseLegacyLock`` after it.

``FileDisk`` owns no decision: it never refuses a write, never answers a lane. Disk errors are
logged here once per episode (``DiskEpisodes``); their codes are chosen by the write path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sessionlane.actors.disk_errors import disk_error_code
from sessionlane.actors.legacy_lock import LegacyLock
from sessionlane.actors.session_file_commit import TranscriptSync
from sessionlane.actors.transcript import Transcript
from sessionlane.messages.errors import ErrorCode, SessionLaneError
from sessionlane.messages.lean_records import lean_record
from sessionlane.messages.wire import ExternalChangeKind

__all__ = ["FileDisk", "LockOutcome", "WriteOutcome"]

log = logging.getLogger(__name__)


@lean_record
class WriteOutcome:
    """What performing one ``WriteOut`` did.

    ``external``: the change made outside sessionlane that was adopted first (if any);
    ``offset``: where an append's bytes start; ``moved``: the file is no longer the one at
    its path (checked for flush appends and rewrites, whose answer leaves at once);
    ``error``: what the write raised (nothing of it was kept).
    """

    external: ExternalChangeKind | None = None
    offset: int = 0
    moved: bool = False
    error: Exception | None = None


LockOutcome = bool | tuple[ErrorCode, str]
"""Taking the legacy lock: True taken, False a live legacy writer holds it, or why it cannot be
used at all (code, detail)."""


class FileDisk:
    """The transcript, its sync and its legacy lock, performing what the write path decides."""

    def __init__(
        self,
        path: str,
        transcript: Transcript,
        sync: TranscriptSync,
        legacy: LegacyLock | None,
        clock: Callable[[], float],
    ) -> None:
        self.path = path
        self.transcript = transcript
        self.sync = sync
        self.legacy = legacy
        self.clock = clock
        """The shell's clock (ms), read only to time the fdatasync performed here."""

    def write(self, kind: str, data: bytes, fsync: bool, repair_tail: bool) -> WriteOutcome:
        """Adopt an outside change, then append ``data`` (or replace the file with it)."""
        external: ExternalChangeKind | None = None
        try:
            external = self.transcript.check_external()
            if repair_tail:  # left at activation: the write path holds the legacy lock now
                self.transcript.repair_torn_tail()
            if kind == "rewrite":
                self.transcript.rewrite(data)
                return WriteOutcome(external, moved=self.moved())
            offset = self.transcript.append(data)
            if fsync:
                self.sync.wrote()
                return WriteOutcome(external, offset)
            # acknowledged now: the bytes must have gone to the file at the path
            if self.moved():
                return WriteOutcome(external, offset, moved=True)
            self.sync.disk.succeeded()
            return WriteOutcome(external, offset)
        except Exception as exc:
            if (code := disk_error_code(exc)) is not None:
                self.sync.disk.failed(code, kind, exc)
            return WriteOutcome(external, error=exc)

    def moved(self) -> bool:
        if self.transcript.still_at_path():
            return False
        self.sync.moved += 1
        return True

    def sync_now(self) -> float | None:
        """fdatasync what no sync covers yet (a failure is kept for the next commit); how long
        the fdatasync took (ms), or None when there was nothing to sync or it failed."""
        if not self.sync.begin():
            return None
        started = self.clock()
        try:
            self.transcript.sync("fsync")
            elapsed = self.clock() - started
            self.sync.measured(elapsed)
            at_path = self.transcript.still_at_path()
        except OSError as exc:
            self.sync.failed(exc)
            return None
        self.sync.synced(at_path)
        return elapsed

    def take_legacy(self, lease: str) -> LockOutcome:
        """Try ``<file>.lock`` once for the writes under ``lease``, never waiting (a drop-in
        holder of ``lease`` keeps the lock: its writes go under it)."""
        assert self.legacy is not None  # the write path asks only when configured
        try:
            return self.legacy.try_acquire(lease=lease)
        except SessionLaneError as exc:  # the directory's path became a symlink...
            log.warning("cannot take legacy lock %s: %s", self.legacy.path, exc.detail)
            return (exc.code, exc.detail)
        except OSError as exc:
            log.error("cannot take legacy lock %s: %s", self.legacy.path, exc)
            return ("internal", f"legacy lock: {exc}")

    def release_legacy(self) -> None:
        assert self.legacy is not None
        try:
            self.legacy.release()
        except OSError:
            log.exception("cannot release legacy lock %s", self.legacy.path)
