"""The gateway's timers: one type per wake-up, matched by type (never a string payload).

Each is the ``payload`` of a thespian ``wakeupAfter``; the gateway's one ``WakeupMessage``
handler dispatches on its type. They never leave the gateway's process.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AcceptResume",
    "FlushDue",
    "GatewayTimer",
    "HelloSweep",
    "KeepaliveSweep",
    "LaneCloseDue",
    "LinksDue",
    "ProofDue",
]


@dataclass(frozen=True, slots=True)
class FlushDue:
    """Output a full socket refused (a client's, a link's, a closing one's) is due again."""


@dataclass(frozen=True, slots=True)
class LaneCloseDue:
    """A closing lane waited long enough for its abandons: it closes anyway."""

    uid: str


@dataclass(frozen=True, slots=True)
class LinksDue:
    """The links have something to do at ``due`` (monotonic ms): a retry, an idle close."""

    due: float


@dataclass(frozen=True, slots=True)
class HelloSweep:
    """The earliest hello deadline passed: close the connections that are late."""


@dataclass(frozen=True, slots=True)
class ProofDue:
    """The earliest parked token proof's turn came: judge the proofs that are due."""


@dataclass(frozen=True, slots=True)
class AcceptResume:
    """The pause after running out of descriptors is over: watch the listeners again."""


@dataclass(frozen=True, slots=True)
class KeepaliveSweep:
    """One keepalive period passed: close the connections silent for three of them."""


GatewayTimer = (
    FlushDue | LaneCloseDue | LinksDue | HelloSweep | ProofDue | AcceptResume | KeepaliveSweep
)
