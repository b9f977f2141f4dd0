"""Messages between sessionlane's actors (never on the wire; pickled by thespian).

Flow: an agent (the gateway, or a Python test driving actors) talks to its Lane actor with the
wire requests of ``sessionlane.messages.wire``. The Lane wraps each in a ``LaneCall`` to the
Registry, which resolves the path and forwards it to the path's SessionFile. The SessionFile
answers the Lane directly with ``FileReply``; the Lane tracks its leases and hands the wire reply
to its agent inside ``LaneOutput``.

Actor addresses are opaque thespian objects, typed ``Any`` here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sessionlane.messages.errors import ErrorCode
from sessionlane.messages.wire import (
    Abandon,
    Acquire,
    Append,
    Direct,
    FileStatus,
    Priority,
    Recover,
    Release,
    Reply,
    Rewrite,
    Status,
)

__all__ = [
    "ActivationFailed",
    "AgentGone",
    "AwaitHolders",
    "ChannelOffer",
    "Configure",
    "Configured",
    "Drain",
    "Drained",
    "FileInit",
    "FileReply",
    "FileRestarted",
    "FileSettings",
    "FileStatusAnswer",
    "FileStatusQuery",
    "GatewayFailed",
    "GatewayStarted",
    "HoldersAwaited",
    "IdleNotice",
    "InternalMessage",
    "LaneCall",
    "LaneClosed",
    "LaneOutput",
    "LaneRef",
    "LaneRequest",
    "OpenChannel",
    "OpenLane",
    "Opened",
    "Ping",
    "Pong",
    "ServiceIdentity",
    "StartGateway",
    "StatusQuery",
]

LaneRequest = Annotated[
    Acquire | Release | Abandon | Append | Rewrite | Recover | Direct, Field(discriminator="type")
]


class _Internal(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    def __str__(self) -> str:
        # Cheap on purpose: thespian formats str(message) on every send and receive (see
        # messages.wire._Message.__str__); repr() still shows every field.
        return type(self).__name__


class LaneRef(_Internal):
    """Who a request comes from: a lane instance, never just its name."""

    uid: str
    """Unique per Lane actor; the lease table's lane identity."""
    name: str
    """The lane name the agent chose (shown in status and diagnostics)."""
    address: Any
    """The Lane actor, where the SessionFile sends replies and events."""
    priority: Priority = "interactive"
    """The lane's class, used for its lease-less writes."""


class ServiceIdentity(_Internal):
    """Who a service is, as its SessionFiles name it in their owner sidecars."""

    pid: int
    """The service's process (``sessionlane serve``, or the process embedding a Service)."""
    gateway: str
    """The gateway address its clients connect to."""
    admin_port: int
    """Its thespian admin port."""


class FileSettings(_Internal):
    """What a SessionFile needs to know, handed down by the Registry."""

    max_hold_ms: int | None
    wait_timeout_ms: int | None
    aging_ms: int
    max_queue: int
    idle_ms: int
    durability: Literal["fsync", "flush"]
    max_record_bytes: int
    legacy_lock: bool
    reclaim_until_ms: float = 0.0
    """End of the service's reclaim grace, on the machine's monotonic clock (ms): until then a
    lease found in the file's lease record waits for its holder (``actors/reclaim.py``)."""
    memory_merge: bool = False
    """Opt the file's process in to the kernel's samepage merging (``actors/page_merge.py``)."""
    channel_loop_ms: int = 50
    """How long one turn of the file may serve its channel sockets itself while thespian has
    nothing to do (``actors/channel_loop.py``); 0: a thespian pass for every readable socket."""
    owner: ServiceIdentity | None = None
    """Written into the file's owner sidecar (``sessionlane.actors.ownership``) while the
    SessionFile holds it, so a contender can name this service; None: only the actor's own pid is
    known."""


class Configure(_Internal):
    """To the Registry, once, before any call: roots and per-file settings."""

    kind: Literal["configure"] = "configure"
    roots: list[str]
    suffixes: list[str]
    file: FileSettings
    max_files: int = 256
    """Live SessionFiles at most (the service's effective cap, see
    ``sessionlane.system.runtime.limits``); a request for one more file is refused
    ``too_many_files``."""


class Configured(_Internal):
    kind: Literal["configured"] = "configured"


class AwaitHolders(_Internal):
    """To the Registry, once configured, at a start within the reclaim grace: transcripts
    whose lease record names a holder (``sessionlane.system.runtime.held_scan``). Each is
    activated at once, within ``max_files``, so that it awaits its holder (issue 21)."""

    kind: Literal["await_holders"] = "await_holders"
    paths: list[str]


class HoldersAwaited(_Internal):
    """The Registry's answer to ``AwaitHolders``: files activated, and those not (already
    active, outside the roots, or no capacity left)."""

    kind: Literal["holders_awaited"] = "holders_awaited"
    activated: int
    skipped: int


class OpenLane(_Internal):
    """To a new Lane actor: who it is, where the Registry is, who its agent is."""

    kind: Literal["open_lane"] = "open_lane"
    name: str
    priority: Priority
    registry: Any
    uid: str


class Opened(_Internal):
    """From a Lane to its agent: ready."""

    kind: Literal["opened"] = "opened"
    uid: str


class LaneCall(_Internal):
    """A lane's request for the SessionFile of ``path``: what a channel call frame carries and
    the file serves. Never a thespian message: it crosses processes only as a call frame (on a
    socket, or carried: ``sessionlane.messages.carried``)."""

    kind: Literal["lane_call"] = "lane_call"
    lane: LaneRef
    path: str
    canonical: bool
    """True when ``path`` came from a grant (already canonical): the links skip resolving."""
    request: LaneRequest


class FileReply(_Internal):
    """A file's reply to a lane, as the links hand it to their host (decoded from a reply
    frame), or their own answer (a refusal from the offer)."""

    kind: Literal["file_reply"] = "file_reply"
    path: str
    message: Reply
    lane: str = ""
    """The lane's uid: one actor (the gateway) may host many lanes."""


class LaneOutput(_Internal):
    """From a Lane to its agent: a wire reply or event."""

    kind: Literal["lane_output"] = "lane_output"
    uid: str
    name: str
    message: Reply


class AgentGone(_Internal):
    """To a Lane: its agent disappeared (connection closed, keepalive missed); abandon all."""

    kind: Literal["agent_gone"] = "agent_gone"
    reason: str


class LaneClosed(_Internal):
    """From a Lane to the Registry: forget me."""

    kind: Literal["lane_closed"] = "lane_closed"
    address: Any


class DirectAhead(_Internal):
    """A client's ``direct`` that activated a new file, with the ticket the Registry minted for
    it: the file takes the ticket as its own before it serves anything, and the gateway answers
    the client with it at once (``docs/activation.md``). A part of ``OpenChannel`` and
    ``FileInit``, never sent on its own."""

    gateway_lane: str
    """The uid of the gateway lane that asked (its abandon closes the channel)."""
    priority: Priority
    """That lane's priority (a lane-less append on the channel queues with it)."""
    request: Direct
    """The client's ``direct``, as the gateway forwarded it (``peer_uid`` and
    ``max_frame_bytes`` filled in)."""
    ticket: str = ""
    """Minted by the Registry (empty in the ask)."""


class FileInit(_Internal):
    """From the Registry to a new SessionFile."""

    kind: Literal["file_init"] = "file_init"
    path: str
    settings: FileSettings
    incarnation: int
    """How many times this path's actor was started by this Registry (1 = first)."""
    root: str | None = None
    """The configured root containing ``path`` (realpath): the file's directory is reached
    from it without following symlinks. None: the parent directory is taken as the root."""
    restarted: bool = False
    """This start replaces an actor of the path that died (not a passivated one)."""
    tickets: tuple[DirectAhead, ...] = ()
    """Direct-channel tickets minted by the Registry for the asks that activated the file: the
    file holds them as its own (each redeemable once, by its uid, as a minted one)."""


class IdleNotice(_Internal):
    """From a SessionFile to the Registry: idle for ``idle_ms`` after ``received`` calls."""

    kind: Literal["idle_notice"] = "idle_notice"
    path: str
    received: int


class ActivationFailed(_Internal):
    """From a SessionFile that could not start serving its file, to the Registry: retire me.

    Sent after the failed ``FileInit`` and again after every later message the Registry
    forwarded (each answered with ``code``), so the Registry retires it once ``received``
    equals what it forwarded: nothing can be in flight to it then.
    """

    kind: Literal["activation_failed"] = "activation_failed"
    path: str
    received: int
    code: ErrorCode
    detail: str


class FileRestarted(_Internal):
    """From the Registry to the lanes that used ``path``: its actor died and was restarted."""

    kind: Literal["file_restarted"] = "file_restarted"
    path: str
    aliases: list[str] = []
    """The spellings of ``path`` lanes used (a lane's first request names no canonical path)."""
    incarnation: int = 0
    """The incarnation that died (0: unknown), so a gateway that already saw its channel
    break does not handle the same death twice."""
    owner_lost: bool = False
    """The convention member owning ``path`` was lost (not only the file's actor): its holder's
    lane asks for the lease back when the member answers again
    (``sessionlane.actors.holder_reclaim``)."""


class OpenChannel(_Internal):
    """From the gateway, through the Registry, to a SessionFile: offer me a direct channel.

    The Registry resolves and confines ``path`` and activates the file (for a path another
    convention member serves, that member's Registry does, and its file offers a carried
    channel). A path it refuses is answered with a ``ChannelOffer`` carrying the error
    ``code`` (the calls that waited get it).
    """

    kind: Literal["open_channel"] = "open_channel"
    path: str
    nonce: int
    """Echoed in the offer: the gateway ignores offers for requests it gave up on."""
    reply_to: Any = None
    """Set by the Registry: the gateway that asked."""
    carried: bool = False
    """Offer a carried channel even where a socket could be offered: the asker is on another
    host (a convention member's lane, ``sessionlane.messages.carried``)."""
    reclaim: bool = False
    """The link's first call is a lane's reclaim of its lease (``Acquire.reclaim``): in a
    convention, wait for a lost owner member instead of refusing at once
    (``sessionlane.actors.holder_reclaim``)."""
    ahead: bool = True
    """The asker may be answered with a listener bound ahead of a new file's actor. False
    after such a listener closed before its welcome (the file could not activate, or retired):
    the file's own answer is wanted, which says why."""
    direct: DirectAhead | None = None
    """The client's ``direct`` that opens this link, if that is its first call: a new file's
    Registry answers it with the offer (``ChannelOffer.direct_ticket``), one hop less."""


class ChannelOffer(_Internal):
    """From a SessionFile (or the Registry, refusing) to the gateway: where to connect."""

    kind: Literal["channel_offer"] = "channel_offer"
    path: str
    """The raw path of the ``OpenChannel`` it answers."""
    nonce: int
    canonical: str | None = None
    address: str | None = None
    """The SessionFile's channel listener (an abstract Unix socket name), or None: no socket
    (a carried channel when ``file`` is set; refused when ``code`` is set)."""
    file: Any = None
    """The SessionFile's actor, for a carried channel: its frames go there in thespian
    messages (``sessionlane.messages.carried``)."""
    token: str = ""
    incarnation: int = 0
    idle_ms: int = 0
    """How long the file stays up without calls: a channel its holder leaves unused for half
    of it is closed, so the file can be passivated (0: the holder's own default)."""
    reason: str = ""
    code: ErrorCode | None = None
    """Set by a SessionFile that failed to activate: the calls waiting for this channel get
    this error (and ``reason`` as detail), and the next call asks again."""
    direct_ticket: str = ""
    """The ticket the Registry minted for the ask's ``direct`` (``OpenChannel.direct``) and
    handed to the new file: the gateway answers that ``direct`` with it and ``address``."""


class StatusQuery(_Internal):
    """To the Registry: status of one path or of every active one."""

    kind: Literal["status_query"] = "status_query"
    request: Status


class FileStatusQuery(_Internal):
    kind: Literal["file_status_query"] = "file_status_query"
    query: int


class FileStatusAnswer(_Internal):
    kind: Literal["file_status_answer"] = "file_status_answer"
    query: int
    status: FileStatus


class StartGateway(_Internal):
    """To the Gateway actor: bind these listeners and serve them."""

    kind: Literal["start_gateway"] = "start_gateway"
    listen: list[str]
    """``tcp://HOST:PORT`` (port 0: any free port) and/or ``unix:///path``."""
    registry: Any
    token: str | None
    max_frame_bytes: int
    keepalive_ms: int
    roots: list[str] = []
    suffixes: list[str] = [".jsonl"]
    """The Registry's: the gateway resolves paths with them to pick a file's channel."""
    idle_ms: int = 60_000
    """A channel nobody used for half this long is closed, so its file can be passivated."""
    max_connections: int = 512
    """Most open connections (lowered if the open-file limit could not hold them)."""
    hello_timeout_ms: int = 5_000
    """A connection that has not completed its hello this long after accept is closed."""
    allow_other_users: bool = False
    """Without a token, admit peers of any local user (else only the service's own)."""
    direct_channels: bool = True
    """Offer direct channels to files to local clients that ask (``docs/direct-channel.md``)."""


class GatewayStarted(_Internal):
    kind: Literal["gateway_started"] = "gateway_started"
    addresses: list[str]
    """What was actually bound (the real port when 0 was asked)."""


class GatewayFailed(_Internal):
    kind: Literal["gateway_failed"] = "gateway_failed"
    reason: str


class Ping(_Internal):
    """Liveness probe for supervision; answered with ``Pong`` carrying the same nonce."""

    kind: Literal["ping"] = "ping"
    nonce: int


class Pong(_Internal):
    kind: Literal["pong"] = "pong"
    nonce: int
    connections: int = 0


class Drain(_Internal):
    """To the Registry, then to every SessionFile: answer waiters ``shutting_down``, stop."""

    kind: Literal["drain"] = "drain"


class Drained(_Internal):
    kind: Literal["drained"] = "drained"
    files: int


InternalMessage = (
    Configure
    | Configured
    | AwaitHolders
    | HoldersAwaited
    | OpenLane
    | Opened
    | LaneCall
    | FileReply
    | LaneOutput
    | AgentGone
    | LaneClosed
    | FileInit
    | IdleNotice
    | ActivationFailed
    | FileRestarted
    | OpenChannel
    | ChannelOffer
    | StatusQuery
    | FileStatusQuery
    | FileStatusAnswer
    | StartGateway
    | GatewayStarted
    | GatewayFailed
    | Ping
    | Pong
    | Drain
    | Drained
)
