"""How a SessionFile's messages reach its lanes: group commit holds acks until they are durable.

Two parts of ``sessionlane.actors.session_file.SessionFile``, each with its own state:

* ``TranscriptSync`` owns whether an fsync append is not covered by an fdatasync yet, and
  the last sync failure; the shell's ``FileDisk`` syncs (and measures) and reports to it.
* ``GroupCommit`` owns the ``Outbox`` of held messages, the ``CommitPolicy`` and the phase of
  the current pass; it returns what to deliver and which timer to arm, and the actor does it.

The decisions are the pure ``sessionlane.actors.group_commit``; these parts keep their state.

Group commit. An append is written at once but acknowledged only once durable: with
``durability="fsync"`` its reply is held in an ``Outbox`` until an fdatasync covers it, and
every later message to that lane queues behind it, so each lane sees its replies and events in
order. While replies are held, ``receiveMessage`` returns a ``ThespianWatch`` on a pipe that is
always readable: the transport's next ``select`` returns at once, together with every socket
that already has data; it delivers those messages and then our ``WatchMessage``, the end of
the pass. There ``CommitPolicy`` decides: sync now (a lone writer never waits), one more pass
(more appends just arrived), or wait with a timer for an expected sibling writer (a lane that
appended recently and is not in the batch), bounded by twice the usual gap between appends.
Why not peek at the mailbox or ``wakeupAfter(0)``: every call reaches this actor through the
Registry, and thespian sends one message per sender/target pair at a time, each after the
previous one's ACK, so the transport never holds more than one unread call (measured), and a
zero wakeup runs before the next ``select``; both batch nothing. Bases without watch support
(``simpleSystemBase``) sync after each message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from sessionlane.actors.disk_errors import DiskEpisodes, disk_error_code
from sessionlane.actors.group_commit import CommitPolicy, Outbox, Outgoing
from sessionlane.actors.histogram import FileMetrics
from sessionlane.messages.errors import ErrorCode
from sessionlane.messages.wire import Error

__all__ = ["Committed", "GroupCommit", "SyncFailure", "TranscriptSync", "moved_detail"]

log = logging.getLogger(__name__)


class TranscriptSync:
    """Whether the transcript holds fsync appends no fdatasync covers yet, and how syncs went.

    No I/O and no clock: the shell's ``FileDisk`` (``sessionlane.actors.session_file_disk``)
    performs the fdatasync, times it and reports here (``measured``, ``synced``, ``failed``).
    """

    def __init__(self, path: str, policy: CommitPolicy | None, metrics: FileMetrics) -> None:
        self.path = path
        self.policy = policy
        self.metrics = metrics
        self.unsynced = False  # an fsync append was written and no fdatasync covers it yet
        self.error: SyncFailure | None = None  # the last failure, until ``take_error``
        self.disk = DiskEpisodes(path, log)
        """The file's disk trouble, logged once per episode (the disk performer reports)."""
        self.moved = 0
        """Syncs after which the file was no longer the one at the path (acks refused)."""

    def wrote(self) -> None:
        """An fsync append was written: the next sync must sync."""
        self.unsynced = True

    def begin(self) -> bool:
        """A sync is about to be performed: whether there is anything to sync."""
        due, self.unsynced = self.unsynced, False
        return due

    def measured(self, elapsed_ms: float) -> None:
        """The fdatasync took ``elapsed_ms`` (group commit's estimate of a sync's cost)."""
        if self.policy is not None:  # else the shell hands the duration to the core
            self.policy.synced(elapsed_ms)
        self.metrics.observe("fsync", elapsed_ms)

    def synced(self, at_path: bool) -> None:
        """Durable. Once durable, the file must still be the one at the path under the root:
        if it was moved or replaced meanwhile, the appends went to the moved file, and the
        acks this sync covers become ``file_moved`` errors."""
        self.disk.succeeded()
        if not at_path:
            self.moved += 1
            self.error = SyncFailure("file_moved", moved_detail(self.path))
            log.warning("%s: %s", self.path, self.error.detail)

    def failed(self, exc: OSError) -> None:
        """The sync (or the walk to the path after it) failed: nothing it covers is acked."""
        detail = f"fdatasync failed: {exc}; nothing was acknowledged"
        code = disk_error_code(exc)
        if code is None:  # out of descriptors while walking the path again
            self.error = SyncFailure("too_many_files", detail)
            log.error("%s: %s", self.path, detail)
        else:
            self.error = SyncFailure(code, detail)
            self.disk.failed(code, "fdatasync", exc)

    def take_error(self) -> SyncFailure | None:
        error, self.error = self.error, None
        return error


@dataclass(frozen=True, slots=True)
class SyncFailure:
    """Why the acks a sync covered are errors: the code and detail they carry instead."""

    code: ErrorCode
    detail: str


def moved_detail(path: str) -> str:
    """What a holder is told when its records went to a file moved away from ``path``."""
    return (
        f"the file or a directory above it was moved or replaced while the write was on its "
        f"way: the records went to the moved file, not to {path}; nothing was acknowledged "
        "(a retry writes to the file now at the path)"
    )


@dataclass
class Committed:
    """What a commit sends (in order), and the appends whose acks became errors."""

    deliveries: list[Outgoing] = field(default_factory=list)
    failed_keys: list[Any] = field(default_factory=list)
    """De-duplication keys of acks a failed sync turned into errors: forget them."""


class GroupCommit:
    """The outbox, the pass and the commit of one open file.

    ``watch``: the actor system can watch file descriptors and group commit is on; otherwise
    every message that leaves something held is followed by a commit.
    """

    def __init__(
        self,
        path: str,
        sync: TranscriptSync | None,
        *,
        watch: bool,
        policy: CommitPolicy | None = None,
    ) -> None:
        self.path = path
        self.sync = sync
        """Where ``commit`` takes the last sync failure from when it is not given one."""
        if policy is None:
            shared = sync.policy if sync is not None else None
            policy = shared if shared is not None else CommitPolicy()
        self.policy: CommitPolicy = policy
        self.outbox = Outbox()
        self.phase: Literal["idle", "pass", "wait"] = "idle"
        self.wakeup: float | None = None  # the earliest pending CommitDue
        self.watch = watch
        """The shell watches an always-readable fd for the end of each pass (``ready_fd``)."""
        self.commits = 0

    def hold(self, out: Outgoing) -> bool:
        """Hold ``out`` until the next commit if it must wait; True: send it now."""
        return self.outbox.put(out)

    def wrote(self, lane: str, now: float) -> None:
        """An fsync append of ``lane`` was written (``TranscriptSync`` was told by the writer)."""
        self.policy.wrote(lane, now)

    def after_message(self) -> bool | None:
        """After every message: True to watch for the end of the pass, None to commit now."""
        if not self.outbox:
            self.phase = "idle"
            return False
        if not self.watch:
            return None
        if self.phase == "wait":
            if not self.policy.grew():
                return False  # the commit wakeup or the next append ends the wait
            self.phase = "idle"  # an append arrived: give its pass a chance to bring more
        if self.phase == "idle":
            self.phase = "pass"
            self.policy.begin_pass()
        return True

    def pass_ended(self) -> bool:
        """The transport delivered what it had read: does the held batch need a decision?"""
        return self.phase == "pass" and bool(self.outbox)

    def timer_fired(self, due: float) -> bool:
        """A ``CommitDue`` armed for ``due`` fired: does the waiting batch need a decision?"""
        if self.wakeup is not None and due >= self.wakeup:
            self.wakeup = None
        return self.phase == "wait" and bool(self.outbox)

    def decide(self, now: float, *, others_may_write: bool) -> float | Literal["sync"] | None:
        """Sync now (``"sync"``), one more pass (None), or wait: the time to arm a timer for.

        A wait whose timer is already armed early enough returns None too.
        """
        decision = self.policy.decide(now, others_may_write=others_may_write)
        if decision == "sync":
            return "sync"
        self.policy.begin_pass()
        if decision == "pass":
            return None
        self.phase = "wait"
        due = self.policy.deadline()
        if self.wakeup is not None and due >= self.wakeup:
            return None
        self.wakeup = due
        return due

    def commit(self, failure: SyncFailure | None = None) -> Committed:
        """Release every held message; acks the failed sync before it covered (``failure``)
        become errors.

        The shell syncs first (``FileDisk.sync_now``) and hands over its failure."""
        held = self.outbox.take_all()
        if failure is None and self.sync is not None:
            failure = self.sync.take_error()
        done = Committed()
        if held:
            self.commits += 1
        for out in held:
            if failure is not None and out.needs_sync:
                rid = out.message.message.id
                error = Error(id=rid, code=failure.code, detail=failure.detail, path=self.path)
                out = replace(out, message=out.message.model_copy(update={"message": error}))
                if out.key is not None:
                    done.failed_keys.append(out.key)
            done.deliveries.append(out)
        self.policy.committed()
        self.phase = "idle"
        return done

    def idle(self) -> bool:
        return not self.outbox
