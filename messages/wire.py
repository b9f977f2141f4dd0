"""The wire protocol's messages: what crosses the gateway, as frozen pydantic models.

Every message has ``v`` (the protocol version) and a ``type`` tag. Requests carry an ``id`` that
their replies echo; events carry none. Two discriminated unions, one per direction, because
``status`` names both a request and its reply: ``Request`` (client to service) and ``Reply``
(service to client, replies and events). The codec in ``sessionlane.messages.codec`` decodes into
them.

Inside the actor system the same models travel between actors (pickled by thespian), wrapped
in the envelopes of ``sessionlane.messages.internal``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sessionlane.messages.errors import ErrorCode
from sessionlane.messages.handshake import NONCE_BYTES, PROOF_BYTES

__all__ = [
    "PROTOCOL_VERSION",
    "Abandon",
    "Abandoned",
    "AbortRequested",
    "Acquire",
    "Alive",
    "Append",
    "Appended",
    "Challenge",
    "Direct",
    "DirectOffer",
    "Durability",
    "Error",
    "ExternalChange",
    "ExternalChangeKind",
    "FileStatus",
    "Granted",
    "Hello",
    "HolderStatus",
    "Keepalive",
    "OnContention",
    "Priority",
    "Proof",
    "Purpose",
    "QueueEntry",
    "Queued",
    "ReclaimTicket",
    "Recover",
    "Release",
    "Released",
    "Reply",
    "Request",
    "RequestId",
    "RevokeReason",
    "Revoked",
    "Rewrite",
    "Rewritten",
    "Skipped",
    "Status",
    "StatusReply",
    "Welcome",
]

PROTOCOL_VERSION = 1

Purpose = Literal["prompt", "write", "compaction", "recovery"]
Priority = Literal["recovery", "interactive", "background"]
OnContention = Literal["wait", "fail", "skip"]
Durability = Literal["fsync", "flush"]
RevokeReason = Literal[
    "max_hold",
    "recovery",
    "abandoned",
    "actor_restart",
    "shutdown",
    "ownership_lost",
    "member_lost",
]
ExternalChangeKind = Literal["append", "truncate", "replace"]
RequestId = Annotated[str | int, Field(union_mode="left_to_right")]
Record = dict[str, Any]

_NAME = Field(min_length=1, max_length=256)
_PATH = Field(min_length=1, max_length=4096)
_LEASE = Field(min_length=1, max_length=128)


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    v: Literal[1] = 1
    """Protocol version."""

    def __str__(self) -> str:
        # thespian formats str(message) for its debug log on every send and receive, even
        # when that level is off; a full pydantic rendering cost 3-5 % of actor CPU.
        # repr() still shows every field.
        return type(self).__name__


class _Req(_Message):
    id: RequestId | None = None
    """Request id, unique per connection; echoed on every reply to this request."""


class _Rep(_Message):
    id: RequestId | None = None
    """The id of the request this answers."""


# Requests ---------------------------------------------------------------------------------


class Hello(_Req):
    """First request on a connection."""

    type: Literal["hello"] = "hello"
    client: str = Field(max_length=256)
    """Free-form client name, for diagnostics."""
    token: str | None = Field(default=None, max_length=4096)
    """The token in clear: protocol 1's first form, refused by a service with a ``token_file``
    (it answers ``unauthorized``); clients send ``nonce`` and then a ``proof`` instead."""
    nonce: bytes | None = Field(default=None, min_length=NONCE_BYTES, max_length=NONCE_BYTES)
    """The client's fresh random nonce for the token proof (``docs/protocol.md``)."""
    direct: bool | None = None
    """The client would take direct channels to files (``docs/direct-channel.md``); a service
    that offers them says so in its ``welcome``. Older clients never send it."""


class ReclaimTicket(BaseModel):
    """What a client shows to take back, after a service restart, a lease it held before.

    ``secret`` is the one ``granted`` carried: a lease id alone is not a credential."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    lease: str = _LEASE
    fence: int = Field(ge=1)
    secret: str = Field(min_length=16, max_length=128)


class Acquire(_Req):
    """Ask for a lease on ``path`` for ``lane``."""

    type: Literal["acquire"] = "acquire"
    lane: str = _NAME
    path: str = _PATH
    purpose: Purpose
    priority: Priority | None = None
    """Defaults to the lane's priority (``recovery`` for recovery leases)."""
    wait_timeout_ms: int | None = Field(default=None, ge=0)
    max_hold_ms: int | None = Field(default=None, gt=0)
    on_contention: OnContention = "wait"
    reclaim: ReclaimTicket | None = None
    """Take back a lease held before a service restart (``docs/contract.md``, Restarts):
    granted the same lease and fence, or refused ``reclaim_refused``; never queued."""
    waited_ms: int | None = Field(default=None, ge=0)
    """How long this acquire already waited before a service restart cut it off: it queues as
    if it had arrived that long ago (honoured only while the file is in its reclaim grace)."""


class Release(_Req):
    """Release one level of a held lease (the last level frees the path)."""

    type: Literal["release"] = "release"
    lease: str = _LEASE


class Abandon(_Req):
    """Drop every lease and queued request of ``lane`` (on ``path`` only, if given) at once."""

    type: Literal["abandon"] = "abandon"
    lane: str = _NAME
    path: str | None = Field(default=None, max_length=4096)
    reason: str | None = Field(default=None, max_length=512)


class Append(_Req):
    """Append records, under ``lease`` + ``fence`` or as a queued short write of ``lane``."""

    type: Literal["append"] = "append"
    records: list[Record]
    lease: str | None = Field(default=None, max_length=128)
    fence: int | None = None
    lane: str | None = Field(default=None, max_length=256)
    path: str | None = Field(default=None, max_length=4096)
    durability: Durability | None = None
    aid: str | None = Field(default=None, min_length=8, max_length=64)
    """Append id, unique per lease: an append resent after a service restart with the ``aid``
    of one already written is answered as it was, and not written again."""
    after: str | None = Field(default=None, min_length=8, max_length=64)
    """Pipelining: the ``aid`` of the append before this one in its pipeline. Written only if
    the last append written under this lease is that one; otherwise refused
    ``pipeline_broken``, nothing written. Needs ``lease`` and ``aid``."""
    release: bool | None = None
    """Append and release: once the records are written (and durable, for ``fsync``), one level
    of the lease is released in the same turn of the file, as a ``release`` would, and the next
    waiter granted; the ``appended`` answer says ``released``. Refused or failed, the append
    releases nothing. Needs ``lease`` + ``fence`` (not a lane's short write)."""
    offsets: bool | None = None
    """Ask for the byte offset of each line written (``Appended.offsets``): a client that
    sends several records in one append (a pipeline's group) learns where each one is."""

    @model_validator(mode="after")
    def _lease_or_lane(self) -> Append:
        by_lease = self.lease is not None and self.fence is not None
        by_lane = self.lane is not None and self.path is not None
        if by_lease == by_lane:
            raise ValueError("append needs either lease and fence, or lane and path")
        if self.after is not None and (not by_lease or self.aid is None):
            raise ValueError("a pipelined append (after) needs lease, fence and aid")
        if self.after is not None and self.after == self.aid:
            raise ValueError("a pipelined append cannot come after itself")
        if self.release and not by_lease:
            raise ValueError("an append that releases (release) needs lease and fence")
        return self


class Rewrite(_Req):
    """Replace the whole transcript atomically (compaction leases only)."""

    type: Literal["rewrite"] = "rewrite"
    lease: str = _LEASE
    fence: int
    records: list[Record]


class Recover(_Req):
    """Take a recovery lease: the holder is asked to abort, then revoked after the grace."""

    type: Literal["recover"] = "recover"
    lane: str = _NAME
    path: str = _PATH
    reason: str = Field(max_length=512)
    grace_ms: int = Field(ge=0)


class Status(_Req):
    """Holders, queues, fences and counters, for one path or all active ones."""

    type: Literal["status"] = "status"
    path: str | None = Field(default=None, max_length=4096)


class Proof(_Req):
    """The client's token proof, in answer to ``challenge`` (``messages.handshake``)."""

    type: Literal["proof"] = "proof"
    proof: bytes = Field(min_length=PROOF_BYTES, max_length=PROOF_BYTES)


class Direct(_Req):
    """Ask for a direct channel to ``path``'s file for lane ``lane`` (``docs/direct-channel.md``).

    Only on a connection whose ``welcome`` said ``direct: true``; answered ``direct_offer``.
    ``peer_uid`` and ``max_frame_bytes`` are the gateway's to fill in (a client's are
    overwritten): the admitted uid and the frame limit the file holds the channel to."""

    type: Literal["direct"] = "direct"
    lane: str = _NAME
    path: str = _PATH
    peer_uid: int | None = None
    max_frame_bytes: int | None = Field(default=None, gt=0)


class Keepalive(_Req):
    """Liveness probe; also proves the client is still there."""

    type: Literal["keepalive"] = "keepalive"


Request = Annotated[
    Hello
    | Proof
    | Acquire
    | Release
    | Abandon
    | Append
    | Rewrite
    | Recover
    | Status
    | Keepalive
    | Direct,
    Field(discriminator="type"),
]


# Replies ----------------------------------------------------------------------------------


class Welcome(_Rep):
    type: Literal["welcome"] = "welcome"
    server: str
    protocol: int
    proof: bytes | None = None
    """With a ``token_file``: the service's token proof, which the client checks."""
    direct: bool | None = None
    """Only when the hello asked: whether this connection may ask for direct channels."""


class Challenge(_Rep):
    """The service's answer to a ``hello`` when it has a ``token_file``: prove the token."""

    type: Literal["challenge"] = "challenge"
    nonce: bytes = Field(min_length=NONCE_BYTES, max_length=NONCE_BYTES)


class DirectOffer(_Rep):
    """The answer to ``direct``: connect to the abstract Unix name ``"\\0" + address`` and
    say ``{"k": "direct", "v": 1, "ticket": ticket}`` within a few seconds (single use)."""

    type: Literal["direct_offer"] = "direct_offer"
    address: str
    ticket: str
    path: str
    """The canonical path the channel serves."""


class Queued(_Rep):
    type: Literal["queued"] = "queued"
    position: int
    """1-based place in the path's queue when the request was queued."""


class Granted(_Rep):
    type: Literal["granted"] = "granted"
    lease: str
    fence: int
    path: str
    purpose: Purpose
    secret: str | None = None
    """The lease's reclaim credential (``Acquire.reclaim``); the same on reentrant grants."""


class Skipped(_Rep):
    type: Literal["skipped"] = "skipped"
    path: str | None = None


class Error(_Rep):
    type: Literal["error"] = "error"
    code: ErrorCode
    detail: str = ""
    path: str | None = None


class Released(_Rep):
    type: Literal["released"] = "released"
    lease: str


class Abandoned(_Rep):
    type: Literal["abandoned"] = "abandoned"
    leases: list[str]


class Appended(_Rep):
    type: Literal["appended"] = "appended"
    offset: int
    """Byte offset of the first appended line."""
    lines: int
    """Number of lines written."""
    fence: int
    released: bool | None = None
    """True when the append also released (one level of) its lease (``Append.release``)."""
    offsets: list[int] | None = None
    """The byte offset of each line written, in order (``offsets[0] == offset``); only when
    the append asked for them (``Append.offsets``)."""


class Rewritten(_Rep):
    type: Literal["rewritten"] = "rewritten"
    lines: int
    fence: int


class HolderStatus(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    lane: str
    lease: str
    purpose: Purpose
    held_ms: int


class QueueEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    lane: str
    purpose: Purpose
    priority: Priority
    waited_ms: int


class FileStatus(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    path: str
    fence: int
    holder: HolderStatus | None = None
    queue: list[QueueEntry]
    counters: dict[str, int]


class StatusReply(_Rep):
    type: Literal["status"] = "status"
    files: list[FileStatus]


class Alive(_Rep):
    type: Literal["alive"] = "alive"


# Events (no id) ----------------------------------------------------------------------------


class Revoked(_Rep):
    type: Literal["revoked"] = "revoked"
    lease: str
    path: str
    reason: RevokeReason


class AbortRequested(_Rep):
    type: Literal["abort_requested"] = "abort_requested"
    lease: str
    path: str
    grace_ms: int


class ExternalChange(_Rep):
    type: Literal["external_change"] = "external_change"
    lease: str
    path: str
    kind: ExternalChangeKind


Reply = Annotated[
    Welcome
    | Challenge
    | Queued
    | Granted
    | Skipped
    | Error
    | Released
    | Abandoned
    | Appended
    | Rewritten
    | StatusReply
    | Alive
    | Revoked
    | AbortRequested
    | ExternalChange
    | DirectOffer,
    Field(discriminator="type"),
]
