"""The convention's messages: between members' Registries, their relays and the directory.

What they mean and who sends them is in :mod:`sessionlane.actors.convention`; they are pickled by
thespian between members (never on the client wire), so they carry actor addresses as ``Any``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from sessionlane.messages.internal import OpenChannel
from sessionlane.messages.wire import Status

__all__ = [
    "Admitted",
    "Beat",
    "BeatAck",
    "Checkin",
    "CheckinAck",
    "Claim",
    "ConventionMessage",
    "Forwarded",
    "ForwardedClose",
    "ForwardedStatus",
    "Hop",
    "Join",
    "JoinRefused",
    "Joined",
    "Member",
    "Members",
    "OriginLost",
    "Refused",
    "RelayInit",
    "Resolved",
]


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


class Member(_Msg):
    """One admitted member, as the directory and every Registry know it."""

    key: str
    """``bind_host:admin_port``: stable across restarts of the member."""
    incarnation: str
    """Unique per actor system start."""
    roots: list[str]
    """Canonical roots, pairwise disjoint from every other admitted member's."""
    registry: Any
    """The member's Registry actor."""


class Join(_Msg):
    """From the Service to its Registry: claim our roots with the leader's directory."""

    kind: Literal["join"] = "join"
    key: str
    incarnation: str
    member_timeout_ms: int
    reclaim_grace_ms: int = 0
    """The service's ``reclaim_grace_ms``: how long a lane's reclaim of a lease on a lost
    member's file waits for that member (plus ``member_timeout_ms``); 0: no such reclaim."""
    directory_file: str | None = None
    """On the leader only: where its directory keeps the table of members across restarts
    (``""``: nowhere)."""


class Joined(_Msg):
    """From the Registry to the Service: admitted; ``members`` counts the convention."""

    kind: Literal["joined"] = "joined"
    members: int


class JoinRefused(_Msg):
    kind: Literal["join_refused"] = "join_refused"
    reason: str


class Claim(_Msg):
    """From a Registry, through a :class:`Claimant` on the leader, to the :class:`Directory`."""

    kind: Literal["claim"] = "claim"
    member: Member
    directory_file: str | None = None
    """Set only by the leader's own Registry (see ``Join.directory_file``): the directory
    answers no other claim before it has read the table it kept there."""


class Admitted(_Msg):
    kind: Literal["admitted"] = "admitted"
    version: int
    members: list[Member]
    directory: Any = None
    """The directory's address: the member checks in with it (``Checkin``)."""


class Refused(_Msg):
    kind: Literal["refused"] = "refused"
    reason: str


class Members(_Msg):
    """From the directory to every admitted Registry, on every change of the table."""

    kind: Literal["members"] = "members"
    version: int
    members: list[Member]


class RelayInit(_Msg):
    """First message to a new relay: who its origin is and how long it may stay silent."""

    kind: Literal["relay_init"] = "relay_init"
    origin: Any
    link: int
    timeout_ms: int


class Hop(_Msg):
    origin: Any
    """The Registry that sent it (through its relay); answers go straight back there."""
    link: int
    """The origin's id for the relay it used (a new relay is a new link)."""
    seq: int
    """Increasing per link: a ``BeatAck`` for ``seq`` confirms every earlier message."""


class Forwarded(Hop):
    """A lane's first contact with a path the owner serves, from another member's Registry:
    the owner's Registry has its file offer a carried channel to ``open.reply_to`` (the
    lane's actor), whose calls then go to the file directly, never through a Registry."""

    kind: Literal["forwarded"] = "forwarded"
    open: OpenChannel


class ForwardedClose(Hop):
    """A lane that used the owner closed (its channels closed themselves: the owner only
    forgets it)."""

    kind: Literal["forwarded_close"] = "forwarded_close"
    lane: Any
    """The Lane actor that closed."""


class ForwardedStatus(Hop):
    """Status of one path the owner serves; the owner answers ``reply_to`` directly."""

    kind: Literal["forwarded_status"] = "forwarded_status"
    request: Status
    reply_to: Any


class Beat(Hop):
    kind: Literal["beat"] = "beat"


class BeatAck(_Msg):
    """From the owner's Registry to the origin: alive, and every message up to ``seq`` came."""

    kind: Literal["beat_ack"] = "beat_ack"
    link: int
    seq: int
    incarnation: str


class Checkin(_Msg):
    """From an admitted member's Registry to the directory, every ``member_timeout_ms / 4``: a
    directory that stops answering (the leader died or was restarted) is claimed again."""

    kind: Literal["checkin"] = "checkin"
    key: str
    incarnation: str
    registry: Any
    seq: int


class CheckinAck(_Msg):
    kind: Literal["checkin_ack"] = "checkin_ack"
    seq: int


class OriginLost(_Msg):
    """From a relay to its (owner's) Registry: the origin is gone; abandon its lanes' leases."""

    kind: Literal["origin_lost"] = "origin_lost"
    origin: Any
    reason: str


class Resolved(_Msg):
    """From the owner to the origin: the lane's raw path names this canonical one."""

    kind: Literal["resolved"] = "resolved"
    incarnation: str
    lane: Any
    path: str


# Pure rules ---------------------------------------------------------------------------------

ConventionMessage = (
    Join
    | Joined
    | JoinRefused
    | Claim
    | Admitted
    | Refused
    | Members
    | RelayInit
    | Forwarded
    | ForwardedClose
    | ForwardedStatus
    | Beat
    | BeatAck
    | Checkin
    | CheckinAck
    | OriginLost
    | Resolved
)
"""Every message of the convention (``Member`` is a record they carry, not a message)."""
