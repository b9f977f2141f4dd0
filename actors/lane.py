"""Lane: the actor a Python agent inside the system talks to. One per open lane.

A thin shell over ``LaneState`` (see there for what a lane does): its calls go to the
Registry, which routes them to the path's SessionFile; replies and events go back to its agent
as ``LaneOutput``. The gateway does not use Lane actors: it hosts its connections' lanes in its
own process (``sessionlane.system.gateway.links``).

Ordering: every call of a lane goes Lane -> Registry -> SessionFile, and thespian keeps order
per sender/target pair, so an abandon always reaches a file after the lane's earlier requests.
"""

from __future__ import annotations

import logging
from typing import Any

from thespian.actors import ActorExitRequest, WakeupMessage

from sessionlane.actors._shell import Handler, ShellActor, retitle
from sessionlane.actors.lane_state import CLOSE_TIMEOUT_S, LaneState
from sessionlane.actors.timers import CloseTimeout
from sessionlane.messages.internal import (
    AgentGone,
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
    Error,
    Recover,
    Release,
    Reply,
    Rewrite,
)

__all__ = ["Lane"]

log = logging.getLogger(__name__)


class Lane(ShellActor):
    log = log

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state: LaneState | None = None
        self.registry: Any = None
        self.agent: Any = None

    def handlers(self) -> dict[type, Handler]:
        return {
            OpenLane: self.on_open,
            Acquire: self.on_request,
            Release: self.on_request,
            Abandon: self.on_request,
            Append: self.on_request,
            Rewrite: self.on_request,
            Recover: self.on_request,
            FileReply: self.on_file_reply,
            FileRestarted: self.on_file_restarted,
            AgentGone: self.on_agent_gone,
            WakeupMessage: self.on_wakeup,
        }

    def on_open(self, msg: OpenLane, sender: Any) -> None:
        ref = LaneRef(uid=msg.uid, name=msg.name, address=self.myAddress, priority=msg.priority)
        self.state = LaneState(ref, self)
        retitle(self, f"lane {msg.name}")
        self.registry = msg.registry
        self.agent = sender
        self.send(sender, Opened(uid=msg.uid))

    def on_request(self, req: LaneRequest, sender: Any) -> None:
        if self.state is None:
            self.send(
                sender,
                LaneOutput(
                    uid="",
                    name="?",
                    message=Error(id=req.id, code="unavailable", detail="the lane is closed"),
                ),
            )
            return
        self.state.request(req)

    def on_file_reply(self, msg: FileReply, sender: Any) -> None:
        if self.state is not None:
            self.state.file_reply(msg)

    def on_file_restarted(self, msg: FileRestarted, sender: Any) -> None:
        if self.state is not None:
            self.state.file_restarted(msg)

    def on_agent_gone(self, msg: AgentGone, sender: Any) -> None:
        if self.state is not None and self.state.agent_gone(msg.reason):
            self.wakeupAfter(CLOSE_TIMEOUT_S, payload=CloseTimeout())

    def on_wakeup(self, msg: WakeupMessage, sender: Any) -> None:
        if isinstance(msg.payload, CloseTimeout) and self.state is not None:
            self.state.close_timeout()

    # LaneHost ------------------------------------------------------------------------------

    def call(self, call: LaneCall) -> None:
        self.send(self.registry, call)

    def to_agent(self, lane: LaneState, message: Reply) -> None:
        if self.agent is not None:
            self.send(self.agent, LaneOutput(uid=lane.uid, name=lane.name, message=message))

    def closed(self, lane: LaneState) -> None:
        if self.registry is None:
            return
        self.send(self.registry, LaneClosed(address=self.myAddress))
        self.send(self.myAddress, ActorExitRequest())
        self.registry = None
