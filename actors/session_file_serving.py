"""The two states of an activated SessionFile: serving its file, or broken with an error.

``Serving`` is everything that exists only once the file is open, built complete by
``Serving.open`` when the actor gets its ``FileInit``: the directory, the ownership lock, the
transcript, the fence store, the legacy lock, the lease table, and the parts that work on them
(``WritePath`` and the ``FileDisk`` performing its writes, ``TranscriptSync``,
``GroupCommit``, ``FileChannels``). An activation that
fails leaves nothing open and gives a ``Broken`` instead (``activation_error``): every request
then gets its error. So no part of the actor ever holds a half-open file.

Ownership first, released last: nothing of the file (torn tail, fences) is touched unless we
are its one owner on this machine, and the fence floor read at activation is the last owner's
final word (it held the lock until its process ended); until ``Serving.close`` releases the
lock, another service must not open, quarantine or fence the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sessionlane.actors.awaited import AwaitingTable
from sessionlane.actors.confined import ConfinedDir, failure_code, failure_detail
from sessionlane.actors.fencestore import FenceStore
from sessionlane.actors.group_commit import CommitPolicy
from sessionlane.actors.histogram import FileMetrics
from sessionlane.actors.lease_record_file import LeaseRecordFile
from sessionlane.actors.lease_table import LeasePolicy
from sessionlane.actors.legacy_lock import LegacyLock
from sessionlane.actors.owner_check import OwnerCheck, keep_ownership
from sessionlane.actors.ownership import Ownership
from sessionlane.actors.paths import lease_route
from sessionlane.actors.reclaim import ReclaimBook
from sessionlane.actors.session_file_channels import FileChannels
from sessionlane.actors.session_file_commit import GroupCommit, TranscriptSync
from sessionlane.actors.session_file_core import FileCore
from sessionlane.actors.session_file_disk import FileDisk
from sessionlane.actors.session_file_writes import WritePath
from sessionlane.actors.transcript import OpenReport, Transcript
from sessionlane.messages.errors import ErrorCode, SessionLaneError
from sessionlane.messages.internal import FileInit, FileSettings
from sessionlane.messages.wire import FileStatus, HolderStatus, QueueEntry

__all__ = ["NOT_STARTED", "Broken", "Serving", "Switches", "activation_error"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Broken:
    """Why a SessionFile could not start serving its file: every request gets this error."""

    code: ErrorCode
    detail: str

    def status(self, path: str) -> FileStatus:
        """What a broken file reports: nothing held, nothing queued, ``broken`` 1."""
        return FileStatus(path=path, fence=0, holder=None, queue=[], counters={"broken": 1})


NOT_STARTED = Broken("unavailable", "the file actor is not initialised")
"""The state of a SessionFile before its ``FileInit``."""


def activation_error(exc: BaseException) -> Broken:
    """The error a failed activation answers with (a pure mapping, tested on its own).

    Another owner or an I/O error is ``unavailable`` (the next request tries again: the
    owner may have gone); a path that confinement refuses is ``path_not_allowed``; running out
    of descriptors is ``too_many_files``.
    """
    detail = failure_detail(exc)
    if not isinstance(exc, SessionLaneError):
        detail = f"cannot open the file: {detail}"
    return Broken(failure_code(exc), detail)


@dataclass(frozen=True, slots=True)
class Switches:
    """What the actor system and the benchmarks allow: watching fds, group commit, channels."""

    watch: bool
    group_commit: bool
    channels: bool


@dataclass(frozen=True, slots=True)
class _Opened:
    """What ``_open_file`` opened, in the order it opened it."""

    directory: ConfinedDir
    ownership: Ownership
    transcript: Transcript
    legacy: LegacyLock | None
    tail_unchecked: bool
    report: OpenReport
    fences: FenceStore
    floor: int
    records: LeaseRecordFile


class Serving:
    """A SessionFile serving its open file: the file's resources and the parts using them."""

    def __init__(
        self,
        msg: FileInit,
        opened: _Opened,
        switches: Switches,
        *,
        metrics: FileMetrics,
        clock: Callable[[], float],
        accepting: Callable[[], bool],
    ) -> None:
        s = msg.settings
        self.path = msg.path
        self.settings: FileSettings = s
        self.directory = opened.directory
        """The transcript's directory, walked from its root without symlinks; shared by the
        owner lock, the transcript, its fence store and the legacy lock."""
        self.ownership = opened.ownership
        self.transcript = opened.transcript
        self.fences = opened.fences
        policy = LeasePolicy(
            max_hold_ms=s.max_hold_ms,
            wait_timeout_ms=s.wait_timeout_ms,
            aging_ms=s.aging_ms,
            max_queue=s.max_queue,
        )
        self.table = AwaitingTable(
            msg.path, policy, fence_floor=opened.floor, lease_prefix=f"{lease_route(msg.path)}-"
        )
        self.sync = TranscriptSync(msg.path, None, metrics)  # the core learns a sync's cost
        watch = switches.watch and switches.group_commit
        self.commit = GroupCommit(msg.path, None, watch=watch, policy=CommitPolicy())
        self.ready_fd: int | None = _always_readable_fd() if watch else None
        """Always readable: watched while acks are held, its ``WatchMessage`` ends the pass."""
        self.disk = FileDisk(msg.path, self.transcript, self.sync, opened.legacy, clock)
        self.writes = WritePath(
            msg.path,
            legacy=opened.legacy is not None,
            tail_unchecked=opened.tail_unchecked,
            durability=s.durability,
            max_record_bytes=s.max_record_bytes,
            unsynced=lambda: self.sync.unsynced,
            sync_each_append=not switches.group_commit,
        )
        self.channels = FileChannels(
            msg.path,
            msg.incarnation,
            idle_ms=s.idle_ms,
            enabled=switches.channels,
            watch=switches.watch,
            accepting=accepting,
            clock=lambda: time.monotonic() * 1000.0,
        )
        self.fence_reservations = 0
        self.records = opened.records
        self.book = ReclaimBook()
        self.core = FileCore(
            msg.path,
            self.table,
            self.writes,
            self.book,
            commit=self.commit,
            reclaim_until_ms=s.reclaim_until_ms,
        )
        identity = self.transcript.identity
        self.core.ino, self.core.size = identity.ino, identity.size
        # Only the path's first actor of this service awaits a holder: a successor of one that
        # died while the service lives told its lanes ``actor_restart``; nobody will reclaim.
        until = s.reclaim_until_ms if msg.incarnation == 1 else 0.0
        lost = self.core.activate(self.records.load(), clock(), until, time.time() * 1000)
        if lost is not None:
            self.records.try_write(lost)  # a failure is logged: the file still serves

    @classmethod
    def open(
        cls,
        msg: FileInit,
        switches: Switches,
        *,
        metrics: FileMetrics,
        clock: Callable[[], float],
        accepting: Callable[[], bool],
    ) -> Serving:
        """Open ``msg.path`` for serving; raises (with nothing left open) when it cannot."""
        opened = _open_file(msg)
        serving = cls(msg, opened, switches, metrics=metrics, clock=clock, accepting=accepting)
        log.debug(  # not info: a record sent to the logger's process on every activation
            "opened %s (incarnation %d, fence floor %d, size %d, torn bytes %d)",
            msg.path,
            msg.incarnation,
            opened.floor,
            opened.report.size,
            opened.report.torn_bytes,
        )
        return serving

    def close(self) -> None:
        """Close the file's resources; the ownership lock last (see the module docstring)."""
        self.channels.close()
        self.records.close()
        self.transcript.close()
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None
        self.ownership.release()
        self.directory.close()

    def reserve(self, ceiling: int) -> Exception | None:
        """Make the fences up to ``ceiling`` durable (``fence_reservations`` counts those that
        grew the store's ceiling); the exception if it could not (the core undoes the grant
        after it: ``FileCore.reservation_failed``)."""
        grows = ceiling > self.fences.ceiling
        try:
            self.fences.reserve(ceiling)
        except Exception as exc:
            return exc
        if grows:
            self.fence_reservations += 1
        return None

    def watched(self, pass_end: bool) -> list[int]:
        """The fds thespian should watch until the next message: the channels', and the
        always-readable pipe when the end of the pass is awaited (``pass_end``)."""
        fds = self.channels.fds()
        if pass_end and self.ready_fd is not None:
            fds.append(self.ready_fd)
        return fds

    def status(
        self, now: float, lane_name: Callable[[Any], str], extra: dict[str, int]
    ) -> FileStatus:
        """The file's status: holder, queue, the counters of every part, then ``extra``."""
        t = self.table
        holder = None
        if t.holder is not None:
            holder = HolderStatus(
                lane=lane_name(t.holder.lane),
                lease=t.holder.lease,
                purpose=t.holder.purpose,
                held_ms=int(now - t.holder.granted_at),
            )
        queue = [
            QueueEntry(
                lane=lane_name(w.lane),
                purpose=w.purpose,
                priority=w.priority,
                waited_ms=int(now - w.enqueued_at),
            )
            for w in t.order(now)
        ]
        counters = {
            **t.counters,
            **self.writes.counters,
            "commits": self.commit.commits,
            "fence_reservations": self.fence_reservations,
            "channel_calls": self.channels.calls,
            "syncs": self.transcript.sync_count,
            "size": self.transcript.size,
            "disk_error_episodes": self.sync.disk.episodes,
            "moved_writes": self.sync.moved,
            "channels": self.channels.connections(),
            **self.grace_counters(now),
            "lease_record_writes": self.records.writes,
            "lease_record_failures": self.records.failures,
            **extra,
        }
        return FileStatus(
            path=self.path, fence=t.fence, holder=holder, queue=queue, counters=counters
        )

    def grace_counters(self, now: float) -> dict[str, int]:
        """``in_grace`` 1 while the holder found in the lease record is awaited, with its
        fence (``awaited_fence``) and what is left of the grace (``grace_left_ms``)."""
        h = self.table.holder
        if h is None or h.state != "awaiting":
            return {"in_grace": 0, "awaited_fence": 0, "grace_left_ms": 0}
        left = 0 if h.hold_deadline is None else max(0, int(h.hold_deadline - now))
        return {"in_grace": 1, "awaited_fence": h.fence, "grace_left_ms": left}

    def keep_ownership(self, now: float) -> OwnerCheck:
        """Before a grant or a write: is the owner lock at the file's path still ours?

        ``sessionlane.actors.owner_check``: taken again at the path if it moved and is free
        (the fences carried), or the reason to stop serving (another process holds it).
        """
        check = keep_ownership(
            self.path, self.directory, self.ownership, self.fences, self.table, now
        )
        self.ownership = check.ownership
        return check


def _open_file(msg: FileInit) -> _Opened:
    """Take ownership, load the fences, open the transcript; on failure close it all."""
    directory, _ = ConfinedDir.open_parent(msg.path, msg.root)
    ownership: Ownership | None = None
    transcript: Transcript | None = None
    try:
        owner = msg.settings.owner
        ownership = Ownership.acquire(
            msg.path,
            service_pid=owner.pid if owner else 0,
            gateway=owner.gateway if owner else "",
            admin_port=owner.admin_port if owner else 0,
            now=time.time(),
            directory=directory,
        )
        # The fences before the transcript: a refused fence sidecar (a symlink, a corrupt
        # record) must not leave behind a new empty transcript created for this request.
        fences = FenceStore(msg.path, directory)
        floor = fences.load()
        transcript = Transcript(msg.path, root=msg.root, directory=directory, log=log)
        legacy, unchecked, report = _open_transcript(transcript, msg, directory)
        records = LeaseRecordFile(msg.path, transcript.directory)
    except BaseException:  # another owner, permission, corrupt fence file, EMFILE...
        _close_after_failure(msg.path, directory, ownership, transcript)
        raise
    return _Opened(
        directory, ownership, transcript, legacy, unchecked, report, fences, floor, records
    )


def _open_transcript(
    transcript: Transcript, msg: FileInit, directory: ConfinedDir
) -> tuple[LegacyLock | None, bool, OpenReport]:
    """Open the transcript; with legacy interop, repair a torn tail only under the lock.

    A legacy writer writes its line while it holds ``<file>.lock``: an unterminated last
    line seen without that lock may be its write in progress, and quarantining it would
    cut the line in two (the test of legacy interop lost a record that way). So the
    repair happens here only if the lock is free now, else before our first write, which
    always takes the lock (the returned flag: the tail is left unchecked).

    A transcript created here is made durable (its directory's fsync) before anything is
    served on it (``SessionFile.serve``), or earlier by the fence reservation made once a
    channel is answered, whose rename fsyncs the same directory: not on the way to the welcome.
    """
    if not msg.settings.legacy_lock:
        return None, False, transcript.open(durable_create=False)
    legacy = LegacyLock(msg.path, directory=directory)
    if not legacy.try_acquire():
        return legacy, True, transcript.open(repair=False, durable_create=False)
    try:
        return legacy, False, transcript.open(durable_create=False)
    finally:
        legacy.release()


def _close_after_failure(
    path: str, directory: ConfinedDir, ownership: Ownership | None, transcript: Transcript | None
) -> None:
    """Let go of what a failed activation had already opened (the lock last)."""
    if transcript is not None:
        try:
            transcript.close()
        except Exception:
            log.exception("closing %s after a failed activation", path)
    if ownership is not None:
        ownership.release()
    directory.close()


def _always_readable_fd() -> int:
    """The read end of a pipe holding one byte that nobody reads: ``select`` always returns it."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"!")
    finally:
        os.close(write_end)
    with contextlib.suppress(OSError):
        os.set_blocking(read_end, False)
    return read_end
