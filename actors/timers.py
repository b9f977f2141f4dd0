"""The wakeup payloads of our actors: one small record per timer kind, dispatched by type.

``wakeupAfter(delay, payload=X(...))`` comes back as a ``WakeupMessage`` whose ``payload`` is
that ``X``; the actor's ``on_wakeup`` is one ``match`` on these types, so a renamed or new
timer cannot be misrouted by a string that no longer matches. Payloads stay in the actor's
own process (thespian keeps wakeups in the transport), so they need not be wire models.
"""

from __future__ import annotations

from sessionlane.messages.lean_records import lean_record

__all__ = [
    "ChannelFlush",
    "CloseTimeout",
    "CommitDue",
    "GatherTimeout",
    "IdleCheck",
    "LeaseTick",
    "LegacyRetry",
    "LinksDue",
    "SuccessorWait",
]


# SessionFile --------------------------------------------------------------------------------


@lean_record
class LeaseTick:
    """The lease table's next deadline (a hold limit, an abort grace, a waiter's timeout)."""

    due: float
    """The actor clock's time (ms) it was armed for: an earlier re-arm supersedes it."""


@lean_record
class CommitDue:
    """A group-commit batch waiting for a sibling writer is synced if nothing came by now."""

    due: float
    """The actor clock's time (ms) it was armed for."""


@lean_record
class LegacyRetry:
    """Try the legacy lock again: a live legacy writer held it when the write queue drained."""


@lean_record
class IdleCheck:
    """Passivation: is the file still quiet? It was armed when ``activity`` calls had come."""

    activity: int


@lean_record
class ChannelFlush:
    """Write the channels' output again: a full socket buffer refused part of it."""


# Registry -----------------------------------------------------------------------------------


@lean_record
class GatherTimeout:
    """A status or drain fan-out answers with what it has (children that did not answer)."""

    query: int


@lean_record
class SuccessorWait:
    """A path's retiring actor has not exited yet: start its successor anyway."""

    key: str
    """The waiting entry's child key (``Registry.activate``)."""


# Lane ---------------------------------------------------------------------------------------


@lean_record
class CloseTimeout:
    """A lane whose agent went away stops waiting for its abandons to be answered."""


@lean_record
class LinksDue:
    """The lane's links have something due (a retry, an idle channel to close)."""

    due: float
    """The actor clock's time (ms) it was armed for: an earlier re-arm supersedes it."""
