"""Lane: the actor a Python agent inside the system talks to. One per open lane.

A thin shell over ``LaneState`` (see there for what a lane does) and ``Links`` (how calls reach
files): the lane's calls go to the path's SessionFile over that file's channel, exactly as the
gateway's lanes' do. The Registry resolves the path and hands out the channel; it carries no
call. Where no socket can go (a path another convention member serves, a base that cannot
watch sockets such as ``simpleSystemBase``) the same frames are carried in thespian messages
(``CarriedReplies`` here, ``sessionlane.actors.carried``). Replies and events go back to the
agent as ``LaneOutput``.

The actor returns a ``ThespianWatch`` on its channel sockets from every ``receiveMessage``, so
thespian's select loop wakes it when a file answers; nothing blocks (see ``Links``).

Ordering: a lane's calls for one file take one route at a time (queued while its channel
opens), and a channel, like thespian per sender/target pair, keeps order: an abandon always
reaches a file after the lane's earlier requests.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError
from thespian.actors import (
    ActorExitRequest,
    PoisonMessage,
    ThespianWatch,
    WakeupMessage,
    WatchMessage,
)

from sessionlane.actors._shell import Handler, ShellActor, monotonic_ms, retitle
from sessionlane.actors.lane_state import CLOSE_TIMEOUT_S, ChannelLost, LaneState
from sessionlane.actors.links import Links
from sessionlane.actors.timers import ChannelFlush, CloseTimeout, LinksDue
from sessionlane.messages.carried import CarriedCalls, CarriedReplies
from sessionlane.messages.errors import ErrorCode
from sessionlane.messages.internal import (
    AgentGone,
    ChannelOffer,
    FileReply,
    FileRestarted,
    LaneCall,
    LaneClosed,
    LaneOutput,
    LaneRef,
    LaneRequest,
    Opened,
    OpenLane,
)
from sessionlane.messages.wire import (
    Abandon,
    Acquire,
    Append,
    Direct,
    Error,
    Recover,
    Release,
    Reply,
    Rewrite,
)

__all__ = ["Lane"]

log = logging.getLogger(__name__)

_LINK_IDLE_MS = 30_000.0
"""A channel no call used this long is closed (so its file may be passivated)."""
_FLUSH_RETRY_S = 0.002
"""How soon channel output a full socket buffer refused is written again."""


class Lane(ShellActor):
    log = log

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state: LaneState | None = None
        self.registry: Any = None
        self.agent: Any = None
        self.links = Links(self, _LINK_IDLE_MS, monotonic_ms)
        self.links_wakeup: float | None = None
        self.flush_armed = False

    def handlers(self) -> dict[type, Handler]:
        return {
            OpenLane: self.on_open,
            Acquire: self.on_request,
            Release: self.on_request,
            Abandon: self.on_request,
            Append: self.on_request,
            Rewrite: self.on_request,
            Recover: self.on_request,
            Direct: self.on_request,  # answered unavailable: only the gateway's clients get one
            ChannelOffer: self.on_channel_offer,
            CarriedReplies: self.on_carried,
            WatchMessage: self.on_watch,
            FileRestarted: self.on_file_restarted,
            AgentGone: self.on_agent_gone,
            PoisonMessage: self.on_poison,
            WakeupMessage: self.on_wakeup,
            ActorExitRequest: self.on_exit,
        }

    def receiveMessage(self, msg: Any, sender: Any) -> ThespianWatch | None:
        super().receiveMessage(msg, sender)
        if isinstance(msg, ActorExitRequest):
            return None
        if self.links.flush() and not self.flush_armed:
            self.flush_armed = True
            self.wakeupAfter(_FLUSH_RETRY_S, payload=ChannelFlush())
        self.schedule_links()
        fds = self.links.fds()
        return ThespianWatch(fds) if fds else None

    def on_open(self, msg: OpenLane, sender: Any) -> None:
        ref = LaneRef(uid=msg.uid, name=msg.name, address=self.myAddress, priority=msg.priority)
        self.state = LaneState(ref, self)
        retitle(self, f"lane {msg.name}")
        self.registry = msg.registry
        self.agent = sender
        self.send(sender, Opened(uid=msg.uid))

    def on_request(self, req: LaneRequest, sender: Any) -> None:
        if self.state is None:
            error = Error(id=req.id, code="unavailable", detail="the lane is closed")
            self.send(sender, LaneOutput(uid="", name="?", message=error))
            return
        try:
            # An agent may hand us an unvalidated model (``model_construct``); the file checks
            # every channel frame and would drop the channel, every lane's leases with it.
            checked = type(req).model_validate(req.model_dump(mode="python", warnings=False))
        except ValidationError as exc:
            bad_records = isinstance(req, Append | Rewrite)
            code: ErrorCode = "invalid_record" if bad_records else "bad_frame"
            path = self.state.path_of(req)
            self.state.to_agent(Error(id=req.id, code=code, detail=_first_error(exc), path=path))
            return
        self.state.request(checked)

    def on_channel_offer(self, msg: ChannelOffer, sender: Any) -> None:
        self.links.on_offer(msg)

    def on_carried(self, msg: CarriedReplies, sender: Any) -> None:
        self.links.on_carried(msg)

    def on_watch(self, msg: WatchMessage, sender: Any) -> None:
        for fd in msg.ready:
            if self.links.owns(fd):
                self.links.on_ready(fd)

    def on_file_restarted(self, msg: FileRestarted, sender: Any) -> None:
        self.links.on_restarted(msg)

    def on_poison(self, msg: PoisonMessage, sender: Any) -> None:
        log.error("undeliverable %s: %s", type(msg.poisonMessage).__name__, msg.details)
        if isinstance(msg.poisonMessage, CarriedCalls):
            self.links.undeliverable(msg.poisonMessage)

    def on_agent_gone(self, msg: AgentGone, sender: Any) -> None:
        if self.state is not None and self.state.agent_gone(msg.reason):
            self.wakeupAfter(CLOSE_TIMEOUT_S, payload=CloseTimeout())

    def on_wakeup(self, msg: WakeupMessage, sender: Any) -> None:
        match msg.payload:
            case CloseTimeout() if self.state is not None:
                self.state.close_timeout()
            case LinksDue(due=due):
                if self.links_wakeup is not None and due >= self.links_wakeup:
                    self.links_wakeup = None
                self.links.tick()
            case ChannelFlush():
                self.flush_armed = False

    def on_exit(self, msg: ActorExitRequest, sender: Any) -> None:
        self.links.flush()  # the abandons, before the channels close
        self.links.close()

    def schedule_links(self) -> None:
        due = self.links.next_due()
        if due is not None and (self.links_wakeup is None or due < self.links_wakeup):
            self.links_wakeup = due
            self.wakeupAfter(max(0.0, due - monotonic_ms()) / 1000.0, payload=LinksDue(due))

    # LaneHost ------------------------------------------------------------------------------

    def call(self, call: LaneCall) -> None:
        self.links.call(call)

    def route_of(self, lease: str) -> str | None:
        return self.links.route_of(lease)

    def to_agent(self, lane: LaneState, message: Reply) -> None:
        if self.agent is not None:
            self.send(self.agent, LaneOutput(uid=lane.uid, name=lane.name, message=message))

    def closed(self, lane: LaneState) -> None:
        if self.registry is None:
            return
        self.send(self.registry, LaneClosed(address=self.myAddress))
        self.send(self.myAddress, ActorExitRequest())
        self.registry = None

    # LinkHost ------------------------------------------------------------------------------

    def deliver(self, reply: FileReply) -> None:
        if self.state is not None:
            self.state.file_reply(reply)

    def restarted(self, msg: FileRestarted, holder: tuple[str, str] | None) -> None:
        if self.state is not None:
            self.state.file_restarted(msg, holder)

    def channel_lost(self, msg: ChannelLost) -> None:
        if self.state is not None:
            self.state.channel_lost(msg)

    def in_use(self, path: str) -> bool:
        return self.state is not None and self.state.uses(path)


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])
