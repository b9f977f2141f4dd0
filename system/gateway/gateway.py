"""The gateway: a thespian actor that owns the listening sockets and speaks the wire protocol.

Clients of any language connect over TCP or a Unix socket and exchange length-prefixed msgpack
frames (``sessionlane.messages.codec``). No pickle crosses this boundary. The actor returns a
``ThespianWatch`` with every socket it owns from each ``receiveMessage``, so thespian's own
select loop wakes it with a ``WatchMessage`` when one is readable: everything happens in one
single-threaded process, and nothing blocks (sockets are non-blocking, output is buffered).

Per connection: the first request must be ``hello``, and it admits the connection only as
``sessionlane.system.gateway.admission`` decides: with a ``token_file``, the token; without one,
the peer must run as the service's own user (``sessionlane.system.gateway.peercred``, read at
accept) unless ``allow_other_users``. The connections, their admission and their framing are
``sessionlane.system.gateway.clients``; this actor routes what admitted connections ask.

Each lane name used on an admitted connection gets its own lane
(``sessionlane.actors.lane_state.LaneState``), hosted here in the gateway's process; their calls
reach the SessionFiles over direct channels (``sessionlane.actors.links``: one socket hop
each way, not five thespian messages), and replies and events are framed back. When the connection
closes, breaks, sends a frame over the size limit, or stays silent for three keepalive periods, its
lanes abandon everything they hold or wait for.
"""

from __future__ import annotations

import logging
import os
import resource
import uuid
from typing import Any

from thespian.actors import (
    ActorExitRequest,
    PoisonMessage,
    ThespianWatch,
    WakeupMessage,
    WatchMessage,
)

from sessionlane.actors._shell import Handler, ShellActor, monotonic_ms, retitle
from sessionlane.actors.holder_reclaim import HolderReclaims
from sessionlane.actors.lane_state import CLOSE_TIMEOUT_S, ChannelLost, LaneState
from sessionlane.actors.links import Links
from sessionlane.messages.carried import CarriedCalls, CarriedReplies
from sessionlane.messages.client_frames import record_refusal
from sessionlane.messages.internal import (
    ChannelOffer,
    FileReply,
    FileRestarted,
    GatewayFailed,
    GatewayStarted,
    LaneCall,
    LaneRef,
    Ping,
    Pong,
    StartGateway,
    StatusQuery,
)
from sessionlane.messages.wire import (
    Abandon,
    Acquire,
    Append,
    Direct,
    Error,
    Priority,
    Recover,
    Release,
    Reply,
    Request,
    Rewrite,
    Status,
    StatusReply,
)
from sessionlane.system.gateway import peercred
from sessionlane.system.gateway.admission import (
    HelloDeadlines,
    Policy,
    connection_cap,
    startup_refusal,
)
from sessionlane.system.gateway.clients import Client, Clients
from sessionlane.system.gateway.timers import (
    AcceptResume,
    FlushDue,
    GatewayTimer,
    HelloSweep,
    KeepaliveSweep,
    LaneCloseDue,
    LinksDue,
    ProofDue,
)

__all__ = ["Gateway"]

log = logging.getLogger(__name__)


class Gateway(ShellActor):
    log = log

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clients = Clients(self, monotonic_ms)
        self.by_uid: dict[str, tuple[Client, LaneState]] = {}  # lane uid -> its client, lane
        self.connection_lanes: dict[int, LaneState] = {}  # client id -> its lease-only lane
        self.prefixes: dict[int, str] = {}  # client id -> its lanes' uid prefix
        self.reclaims: dict[int, HolderReclaims] = {}  # client id -> its leases' secrets
        self.statuses: dict[str, tuple[int, Any]] = {}  # gateway status id -> (client id, id)
        self.status_ids = 0
        self.registry: Any = None
        self.links: Links | None = None
        self.links_wakeup: float | None = None

    def handlers(self) -> dict[type, Handler]:
        return {
            StartGateway: self.on_start,
            WatchMessage: self.on_watch,
            FileRestarted: self.on_file_restarted,
            ChannelOffer: self.on_channel_offer,
            CarriedReplies: self.on_carried,
            StatusReply: self.on_status_reply,
            Error: self.on_status_reply,  # a status refused (e.g. a path outside the roots)
            WakeupMessage: self.on_wakeup,
            Ping: self.on_ping,
            PoisonMessage: self.on_poison,
            ActorExitRequest: self.on_exit,
        }

    def receiveMessage(self, msg: Any, sender: Any) -> Any:
        super().receiveMessage(msg, sender)
        fds = self.clients.fds()
        if self.links is not None:
            if self.links.flush():
                self.clients.schedule_flush()
            self.schedule_links()
            fds += self.links.fds()
        return ThespianWatch(fds) if fds else None

    # Starting and stopping -----------------------------------------------------------------

    def on_start(self, msg: StartGateway, sender: Any) -> None:
        self.registry = msg.registry
        policy = Policy(msg.token, msg.allow_other_users, os.geteuid())
        refusal = startup_refusal(policy, peercred.identifies_peers())
        if refusal is not None:
            self.send(sender, GatewayFailed(reason=refusal))
            return
        clients = self.clients
        clients.policy = policy
        clients.limits.max_frame_bytes = msg.max_frame_bytes
        clients.limits.keepalive_ms = msg.keepalive_ms
        clients.limits.direct_channels = msg.direct_channels
        clients.hellos = HelloDeadlines(msg.hello_timeout_ms)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        cap = connection_cap(msg.max_connections, -1 if soft == resource.RLIM_INFINITY else soft)
        clients.limits.max_connections = cap
        if cap < msg.max_connections:
            log.warning(
                "max_connections %d lowered to %d: the open-file limit is %d",
                msg.max_connections,
                cap,
                soft,
            )
        self.links = Links(self, msg.idle_ms / 2, monotonic_ms)
        try:
            bound = clients.listen(list(msg.listen))
        except OSError as exc:
            self.send(sender, GatewayFailed(reason=f"cannot listen: {exc}"))
            return
        admits = (
            "token holders"
            if policy.token is not None
            else "every local user"
            if policy.allow_other_users
            else f"uid {policy.service_uid} only"
        )
        log.info("gateway listening on %s (admits %s)", ", ".join(bound), admits)
        retitle(self, f"gateway {' '.join(bound)}")
        self.wake(KeepaliveSweep(), msg.keepalive_ms / 1000.0)
        self.send(sender, GatewayStarted(addresses=bound))

    def on_exit(self, msg: ActorExitRequest, sender: Any) -> None:
        self.clients.close_all("gateway stopping")
        if self.links is not None:
            self.links.flush()  # the abandons, before the channels close
            self.links.close()
        self.clients.close_listeners()

    # Socket activity -----------------------------------------------------------------------

    def on_watch(self, msg: WatchMessage, sender: Any) -> None:
        for fd in msg.ready:
            if not self.clients.on_ready(fd) and self.links is not None and self.links.owns(fd):
                self.links.on_ready(fd)

    # ClientsHost: what admitted connections ask --------------------------------------------

    def wake(self, timer: GatewayTimer, seconds: float) -> None:
        self.wakeupAfter(seconds, payload=timer)

    def on_request(self, client: Client, request: Request) -> None:
        match request:
            case Status():
                self.status_ids += 1
                sid = f"g{self.status_ids}"
                self.statuses[sid] = (client.id, request.id)
                self.send(
                    self.registry, StatusQuery(request=request.model_copy(update={"id": sid}))
                )
            case Acquire() | Recover() | Abandon():
                priority = request.priority if isinstance(request, Acquire) else None
                self.to_lane(client, request.lane, request, priority)
            case Append() | Rewrite() if (refusal := record_refusal(request)) is not None:
                self.clients.write(client, refusal)
            case Direct():
                self.direct(client, request)
            case Append() if request.lane is not None:
                self.to_lane(client, request.lane, request, None)
            case Release() | Append() | Rewrite():
                self.by_lease(client, request)

    def direct(self, client: Client, request: Direct) -> None:
        """A ``direct``: the file mints the ticket (``docs/direct-channel.md``), asked through
        the client's lane, so that lane's abandon (the connection closing) also closes the
        channel. The admitted uid and the frame limit are ours to say, never the client's."""
        if not client.direct or client.peer_uid is None:
            detail = "direct channels are not offered on this connection"
            self.clients.write(client, Error(id=request.id, code="unavailable", detail=detail))
            return
        forwarded = request.model_copy(
            update={
                "peer_uid": client.peer_uid,
                "max_frame_bytes": self.clients.limits.max_frame_bytes,
            }
        )
        self.to_lane(client, request.lane, forwarded, None)

    def by_lease(self, client: Client, request: Release | Append | Rewrite) -> None:
        """A request naming only a lease: sent by the connection's own lane.

        The lease id routes it (``LaneState``); the file accepts it from the connection lane
        when one of the connection's lanes holds the lease (``lease_table.acts_for``). The
        gateway keeps no map of who holds what.
        """
        lane = self.connection_lanes.get(client.id)
        if lane is None:
            ref = LaneRef(
                uid=f"{self.connection_id(client)}/",
                name="(connection)",
                address=self.myAddress,
                priority="interactive",
            )
            lane = LaneState(ref, self, self.holder_reclaims(client))
            self.connection_lanes[client.id] = lane
            self.by_uid[ref.uid] = (client, lane)
        lane.request(request)

    def connection_id(self, client: Client) -> str:
        """The prefix of every lane uid of ``client``'s connection: unique, never reused."""
        prefix = self.prefixes.get(client.id)
        if prefix is None:
            prefix = self.prefixes[client.id] = f"c{client.id}.{uuid.uuid4().hex[:8]}"
        return prefix

    def to_lane(self, client: Client, name: str, request: Any, priority: Priority | None) -> None:
        lane = client.lanes.get(name)
        if lane is None:
            uid = f"{self.connection_id(client)}/{name}"
            ref = LaneRef(
                uid=uid, name=name, address=self.myAddress, priority=priority or "interactive"
            )
            lane = client.lanes[name] = LaneState(ref, self, self.holder_reclaims(client))
            self.by_uid[uid] = (client, lane)
        lane.request(request)

    def holder_reclaims(self, client: Client) -> HolderReclaims:
        """The reclaim secrets of the leases ``client``'s lanes hold, shared by its lanes (a
        request naming a lease comes through the connection's own lane)."""
        found = self.reclaims.get(client.id)
        if found is None:
            found = self.reclaims[client.id] = HolderReclaims()
        return found

    def on_closed(self, client: Client, reason: str) -> None:
        """A connection closed: its lanes abandon everything they hold or wait for."""
        self.prefixes.pop(client.id, None)
        self.reclaims.pop(client.id, None)
        lanes = dict(client.lanes)
        if (own := self.connection_lanes.pop(client.id, None)) is not None:
            lanes["(connection)"] = own
        for name, lane in lanes.items():
            if lane.agent_gone(f"{reason} ({client.peer}, lane {name})"):
                self.wake(LaneCloseDue(lane.uid), CLOSE_TIMEOUT_S)
        if client.lanes:  # churn: DEBUG (an agent fleet opens and closes connections all day)
            log.debug(
                "connection %d closed (%s); %d lanes released",
                client.id,
                reason,
                len(client.lanes),
            )

    # LaneHost: the lanes of our connections ------------------------------------------------

    def call(self, call: LaneCall) -> None:
        assert self.links is not None
        self.links.call(call)

    def route_of(self, lease: str) -> str | None:
        return self.links.route_of(lease) if self.links is not None else None

    def to_agent(self, lane: LaneState, message: Reply) -> None:
        found = self.by_uid.get(lane.uid)
        if found is not None:
            self.clients.write(found[0], message)

    def closed(self, lane: LaneState) -> None:
        self.by_uid.pop(lane.uid, None)

    # LinkHost: what the links report -------------------------------------------------------

    def deliver(self, reply: FileReply) -> None:
        found = self.by_uid.get(reply.lane)
        if found is not None:
            found[1].file_reply(reply)

    def restarted(self, msg: FileRestarted, holder: tuple[str, str] | None) -> None:
        for _, lane in list(self.by_uid.values()):
            lane.file_restarted(msg, holder)

    def channel_lost(self, msg: ChannelLost) -> None:
        for _, lane in list(self.by_uid.values()):
            lane.channel_lost(msg)

    def in_use(self, path: str) -> bool:
        return any(lane.uses(path) for _, lane in self.by_uid.values())

    # From the actors -----------------------------------------------------------------------

    def on_file_restarted(self, msg: FileRestarted, sender: Any) -> None:
        if self.links is not None:
            self.links.on_restarted(msg)

    def on_channel_offer(self, msg: ChannelOffer, sender: Any) -> None:
        if self.links is not None:
            self.links.on_offer(msg)

    def on_carried(self, msg: CarriedReplies, sender: Any) -> None:
        if self.links is not None:
            self.links.on_carried(msg)

    def schedule_links(self) -> None:
        assert self.links is not None
        due = self.links.next_due()
        if due is not None and (self.links_wakeup is None or due < self.links_wakeup):
            self.links_wakeup = due
            self.wake(LinksDue(due), max(0.0, due - monotonic_ms()) / 1000.0)

    def on_status_reply(self, msg: StatusReply | Error, sender: Any) -> None:
        """The Registry's answer to a ``status``: the files, or the refusal (``error``)."""
        found = self.statuses.pop(str(msg.id), None)
        if found is None:
            return
        client_id, rid = found
        client = self.clients.by_id.get(client_id)
        if client is not None:
            self.clients.write(client, msg.model_copy(update={"id": rid}))

    def on_poison(self, msg: PoisonMessage, sender: Any) -> None:
        """A call this gateway sent could not be delivered: answer it, never leave it hanging.

        thespian returns a message it could not send (e.g. one that would not pickle) to its
        sender as ``PoisonMessage``.
        """
        call = msg.poisonMessage
        log.error("undeliverable %s: %s", type(call).__name__, msg.details)
        if isinstance(call, CarriedCalls) and self.links is not None:
            self.links.undeliverable(call)

    def on_ping(self, msg: Ping, sender: Any) -> None:
        self.send(sender, Pong(nonce=msg.nonce, connections=len(self.clients.conns)))

    # Timers --------------------------------------------------------------------------------

    def on_wakeup(self, msg: WakeupMessage, sender: Any) -> None:
        match msg.payload:
            case FlushDue():
                self.clients.flush_all()
            case LaneCloseDue(uid=uid):
                if (found := self.by_uid.get(uid)) is not None:
                    found[1].close_timeout()
            case LinksDue(due=due):
                if self.links_wakeup is not None and due >= self.links_wakeup:
                    self.links_wakeup = None
                if self.links is not None:
                    self.links.tick()
            case HelloSweep():
                self.clients.sweep_hellos()
            case ProofDue():
                self.clients.proofs_due()
            case AcceptResume():
                self.clients.resume_accepting()
            case KeepaliveSweep():
                self.clients.sweep_silent()
                self.wake(KeepaliveSweep(), self.clients.limits.keepalive_ms / 1000.0)
