"""What a SessionFile's core asks its shell to do: the effect records of ``FileCore``.

``FileCore`` (``sessionlane.actors.session_file_core``) decides; the shell
(``sessionlane.actors.session_file.SessionFile``) performs, one effect at a time, in order, and
feeds outcomes back. Two kinds:

* effects the core reads itself on its worklist (``Answer``, ``Event``, ``Resent``,
  ``DrainWrites``, ``WriteNext``, ``TableEffects``, and the write path's ``Reply``,
  ``Notify``, ``Wrote`` and table requests ``CheckLease``, ``AskWriteLease``,
  ``ReleaseWriteLease``): they never reach the shell;
* effects for the shell (``ShellEffect``): ``Deliver`` a message to a lane, the disk's
  ``WriteOut``, ``Sync``, ``TakeLegacyLock``/``ReleaseLegacyLock``, ``Reserve`` (a fence
  ceiling made durable), ``Commit`` (sync, then ``FileCore.committed``), ``WriteRecord`` (the
  lease record), the timers ``ArmTick``, ``ArmRetry``, ``ArmCommit``, and ``Handoff``/``Warn``
  (metrics and the log).

Records (``lean_record``: frozen to the type checker, cheap to build): no behaviour, no I/O.
"""

from __future__ import annotations

from typing import Any

from sessionlane.actors.lease_types import Effect
from sessionlane.actors.reclaim import LeaseRecord
from sessionlane.actors.session_file_write_effects import (
    Commit,
    ReleaseLegacyLock,
    Sync,
    WriteOut,
)
from sessionlane.messages.internal import FileReply, LaneCall
from sessionlane.messages.lean_records import lean_record
from sessionlane.messages.wire import Reply as ReplyMessage

__all__ = [
    "Answer",
    "ArmCommit",
    "ArmRetry",
    "ArmTick",
    "CoreEffect",
    "Deliver",
    "DrainWrites",
    "Event",
    "Handoff",
    "Resent",
    "Reserve",
    "ShellEffect",
    "TableEffects",
    "TakeLegacyLock",
    "Warn",
    "WriteNext",
    "WriteRecord",
]


@lean_record
class Reserve:
    """Make fences up to ``ceiling`` durable before the grant that follows (a failure goes
    to ``FileCore.reservation_failed``: the grant is undone)."""

    ceiling: int


@lean_record
class Answer:
    """Answer the table request ``req`` (lane uid, request id) of ``lane`` with ``message``."""

    req: Any
    lane: Any
    message: ReplyMessage


@lean_record
class Resent:
    """Answer ``call`` (an append resent after a restart) with its first answer;
    ``after_sync``: once the pending sync that its first delivery waits for is done (a failed
    one turns it into its error)."""

    call: LaneCall
    message: ReplyMessage
    after_sync: bool = False


@lean_record
class Event:
    """Send ``message`` (a revocation, an abort request) to the lane ``lane``."""

    lane: Any
    message: FileReply


@lean_record
class Handoff:
    """A lease was handed to a waiter that waited ``waited_ms`` (observed by the metrics)."""

    waited_ms: float


@lean_record
class Warn:
    """Log ``message`` as a warning (the table's diagnostics)."""

    message: str


@lean_record
class TableEffects:
    """Read these effects of the lease table next, in order."""

    effects: list[Effect]


@lean_record
class DrainWrites:
    """Perform the write queue (its first write may need the legacy lock)."""


@lean_record
class WriteNext:
    """The drain goes on: the next queued write (read by the core, after what the last
    write led to)."""


@lean_record
class Deliver:
    """Send ``message`` to ``address`` now: a Lane actor, or a channel (a reply frame)."""

    address: Any
    message: FileReply


@lean_record
class TakeLegacyLock:
    """Try ``<file>.lock`` once for the writes under ``lease``; the outcome goes to
    ``FileCore.locked``."""

    lease: str


@lean_record
class WriteRecord:
    """Write the file's durable lease record (``sessionlane.actors.lease_record_file``)."""

    record: LeaseRecord


@lean_record
class ArmTick:
    """Arm a ``LeaseTick`` for ``due`` (the lease table's next deadline)."""

    due: float


@lean_record
class ArmRetry:
    """Arm a ``LegacyRetry`` in ``delay`` seconds (a live legacy writer holds the lock)."""

    delay: float


@lean_record
class ArmCommit:
    """Arm a ``CommitDue`` for ``due`` (a held batch waits for an expected sibling)."""

    due: float


CoreEffect = Reserve | Answer | Event | Handoff | Warn | DrainWrites
"""What one lease-table effect means (``FileCore.meaning``)."""

ShellEffect = (
    Deliver
    | WriteOut
    | Sync
    | Reserve
    | TakeLegacyLock
    | ReleaseLegacyLock
    | Commit
    | WriteRecord
    | ArmTick
    | ArmRetry
    | ArmCommit
    | Handoff
    | Warn
)
"""What the shell performs (``FileCore.next``)."""
