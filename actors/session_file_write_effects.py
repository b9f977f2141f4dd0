"""What the write path of a SessionFile speaks: its effects and the write it queues. Pure records.

``sessionlane.actors.session_file_writes.WritePath`` decides; these are what it returns (and
re-exports): the answers (``Reply``, ``Notify`` an event), what group commit must know
(``Wrote``, ``Commit``), the disk effects the shell's ``FileDisk`` performs (``WriteOut``,
``Sync``, ``ReleaseLegacyLock``), the table requests the core performs on the lease table it
owns (``CheckLease``, whose ``Verdict`` goes back to ``WritePath.checked``; ``AskWriteLease``,
``ReleaseWriteLease``: a lease-less append's short write lease), and ``WriteOp``, a write
accepted for the file. Records (``lean_record``: frozen to the type checker, cheap to build):
no behaviour, no I/O.
"""

from __future__ import annotations

from typing import Any, Literal

from sessionlane.actors.lease_types import RejectCode
from sessionlane.messages.internal import FileReply, LaneCall
from sessionlane.messages.lean_records import lean_record
from sessionlane.messages.wire import Appended, Durability, Priority, Purpose
from sessionlane.messages.wire import Reply as ReplyMessage

__all__ = [
    "AskWriteLease",
    "CheckLease",
    "Commit",
    "Notify",
    "ReleaseLegacyLock",
    "ReleaseWriteLease",
    "Reply",
    "Sync",
    "TableRequest",
    "Verdict",
    "WriteEffect",
    "WriteOp",
    "WriteOut",
    "Wrote",
]


@lean_record
class Reply:
    """Answer ``call`` with ``message``; ``needs_sync``: only once an fdatasync covers it."""

    call: LaneCall
    message: ReplyMessage
    needs_sync: bool = False


@lean_record
class Notify:
    """Send ``message`` (an event such as ``ExternalChange``) to the lane ``lane``."""

    lane: str
    message: FileReply


Verdict = tuple[RejectCode, str] | None
"""The lease table's check of a write (``LeaseTable.check_write``): why it must be refused,
or None to accept it."""


@lean_record
class CheckLease:
    """Ask the lease table whether ``call`` may write under ``lease`` and ``fence`` now
    (``purpose="compaction"``: a rewrite, which needs a compaction level); the verdict goes to
    ``WritePath.checked``. ``op``: the queued write to perform once checked; None: the write
    arriving, queued if the verdict allows. Two are made for every write (at arrival and when
    it is performed)."""

    call: LaneCall
    lease: str
    fence: int
    purpose: Purpose | None = None
    op: WriteOp | None = None


@lean_record
class AskWriteLease:
    """Ask the lease table for a short ``write`` lease for the lease-less append ``req`` (its
    call key) of ``lane``; the table's answer comes back as ``granted`` or ``rejected``."""

    req: Any
    lane: Any
    priority: Priority


@lean_record
class ReleaseWriteLease:
    """Release the short write lease ``lease`` of ``lane`` under the request key ``req``
    (answered by nobody: ``released_silently``)."""

    req: Any
    lane: Any
    lease: str
    aid: str | None = None
    """For an append that releases its lease (``Append.release``): the append's id, and its
    answer (``appended``), which the lease record keeps once the lease is released."""
    appended: Appended | None = None


TableRequest = CheckLease | AskWriteLease | ReleaseWriteLease
"""What the write path asks of the lease table; the core performs it."""


@lean_record
class Wrote:
    """An ``fsync`` append of ``lane`` was written: its acknowledgement waits for a sync."""

    lane: str


@lean_record
class Commit:
    """Sync and send what is held now (a drain under the legacy lock made the writes durable)."""


@lean_record
class WriteOut:
    """Write ``op``'s bytes (append, or replace the file), adopting an outside change first;
    ``repair_tail``: quarantine a torn last line before. Its outcome goes to ``written``.

    ``rest``: the appends of ``op``'s pipeline queued right behind it, written in the same
    ``write`` (``data`` is all their lines, in order); ``written`` gets them back."""

    op: WriteOp
    repair_tail: bool = False
    rest: tuple[WriteOp, ...] = ()

    @property
    def ops(self) -> tuple[WriteOp, ...]:
        """Every write this one performs, in file order."""
        return (self.op, *self.rest)

    @property
    def data(self) -> bytes:
        """The bytes to write: ``op``'s, then those of ``rest``."""
        if not self.rest:
            return self.op.data
        return b"".join(op.data for op in self.ops)


@lean_record
class Sync:
    """fdatasync what no sync covers yet (before a rewrite, or an append without group commit)."""


@lean_record
class ReleaseLegacyLock:
    """Release ``<file>.lock`` (the drain that took it is done and synced)."""


WriteEffect = Reply | Notify | TableRequest | Wrote | Commit | WriteOut | Sync | ReleaseLegacyLock


@lean_record
class WriteOp:
    """A write accepted for the file: performed at once, or once the legacy lock is free."""

    kind: Literal["append", "rewrite"]
    call: LaneCall
    lease: str
    fence: int
    data: bytes
    lines: int
    durability: Durability
    auto_release: bool = False
    """A lease-less append: release its short write lease once written."""
    aid: str | None = None
    """The append's id (``Append.aid``)."""
    after: str | None = None
    """The ``aid`` of the append before it in its pipeline (``Append.after``)."""
    release: bool = False
    """Append and release (``Append.release``): once written (and synced, for ``fsync``), one
    level of its lease is released."""
    starts: tuple[int, ...] | None = None
    """Where each line starts in ``data``, when the append asked for its lines' offsets
    (``Append.offsets``)."""
