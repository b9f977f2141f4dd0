"""Lane: what agent code talks to. One per open lane (a lane name on one connection).

The Lane forwards its agent's requests to the Registry (which routes them to the path's
SessionFile), tracks the leases it holds from the ``held`` field of every reply, and hands
replies and events back to its agent as ``LaneOutput``. When its agent is gone it abandons
everything it holds or waits for, then exits.

Ordering: every call of a lane goes Lane -> Registry -> SessionFile, and thespian keeps order
per sender/target pair, so an abandon always reaches a file after the lane's earlier requests
for it: a request still in flight when the agent vanished is granted and then dropped, never
leaked.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from thespian.actors import ActorExitRequest, WakeupMessage

from actors._shell import Handler, ShellActor
from messages.internal import (
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
from messages.wire import (
    Abandon,
    Abandoned,
    Acquire,
    Append,
    Error,
    Queued,
    Recover,
    Release,
    Reply,
    Revoked,
    Rewrite,
)

__all__ = ["Lane"]

log = logging.getLogger(__name__)

_TOMBSTONES = 256
_CLOSE_TIMEOUT_S = 3.0


@dataclass
class _Pending:
    request: LaneRequest
    path: str | None
    """The canonical path, once a reply has named it."""
    raw: str = ""
    """The path as the agent wrote it."""


@dataclass
class _Fanout:
    """An abandon sent to several files, answered once all have answered."""

    remaining: int
    reply_id: Any
    """The agent's request id (None when it sent none), for the one ``abandoned`` reply."""
    leases: list[str] = field(default_factory=list)


class Lane(ShellActor):
    log = log

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ref: LaneRef | None = None
        self.registry: Any = None
        self.agent: Any = None
        self.leases: dict[str, str] = {}  # lease -> canonical path
        self.tombstones: OrderedDict[str, str] = OrderedDict()  # revoked lease -> path
        self.pending: dict[Any, _Pending] = {}
        self.fanouts: dict[Any, _Fanout] = {}
        self.paths: dict[str, bool] = {}  # every path this lane used -> is it canonical
        self.internal_ids = 0
        self.closing: str | None = None

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
        self.ref = LaneRef(
            uid=msg.uid, name=msg.name, address=self.myAddress, priority=msg.priority
        )
        self.registry = msg.registry
        self.agent = sender
        self.send(sender, Opened(uid=msg.uid))

    # From the agent ------------------------------------------------------------------------

    def on_request(self, req: LaneRequest, sender: Any) -> None:
        if self.ref is None or self.closing is not None:
            self.to_agent(Error(id=req.id, code="unavailable", detail="the lane is closed"))
            return
        match req:
            case Acquire():
                if req.priority is None:
                    default = "recovery" if req.purpose == "recovery" else self.ref.priority
                    req = req.model_copy(update={"priority": default})
                self.call(req, req.path, canonical=False)
            case Recover():
                self.call(req, req.path, canonical=False)
            case Append() if req.lease is None:
                assert req.path is not None
                self.call(req, req.path, canonical=False)
            case Release() | Append() | Rewrite():
                assert req.lease is not None
                path = self.leases.get(req.lease) or self.tombstones.get(req.lease)
                if path is not None:
                    self.call(req, path, canonical=True)
                elif isinstance(req, Release):
                    detail = f"lease {req.lease} is not held by this lane"
                    self.to_agent(Error(id=req.id, code="not_holder", detail=detail))
                else:
                    detail = f"lease {req.lease} is not (or no longer) held by this lane"
                    self.to_agent(Error(id=req.id, code="stale_fence", detail=detail))
            case Abandon():
                self.abandon(req)

    def call(self, req: LaneRequest, path: str, *, canonical: bool) -> None:
        assert self.ref is not None
        self.paths.setdefault(path, canonical)
        if req.id is not None:
            self.pending[req.id] = _Pending(req, path if canonical else None, raw=path)
        call = LaneCall(lane=self.ref, path=path, canonical=canonical, request=req)
        self.send(self.registry, call)

    def abandon(self, req: Abandon) -> None:
        targets = [req.path] if req.path is not None else list(self.paths)
        if not targets:
            self.to_agent(Abandoned(id=req.id, leases=[]))
            return
        fan = _Fanout(remaining=len(targets), reply_id=req.id)
        if req.id is None:  # the fan-in counts the answers by id: give it one
            self.internal_ids += 1
            req = req.model_copy(update={"id": f"_abandon{self.internal_ids}"})
        self.fanouts[req.id] = fan
        for path in targets:
            canonical = self.paths.get(path, False)
            self.call(req.model_copy(update={"path": path}), path, canonical=canonical)

    # From the files ------------------------------------------------------------------------

    def on_file_reply(self, msg: FileReply, sender: Any) -> None:
        self.track(msg.path, msg.held)
        reply = msg.message
        rid = reply.id
        if rid is None:  # an event
            if self.closing is None:
                self.to_agent(reply)
            return
        if (fan := self.fanouts.get(rid)) is not None:
            self.fan_in(rid, fan, reply)
            return
        pending = self.pending.get(rid)
        if pending is not None:
            if isinstance(reply, Queued):
                pending.path = msg.path
            else:
                del self.pending[rid]
        if self.closing is None:
            self.to_agent(reply)

    def track(self, path: str, held: str | None) -> None:
        """Make the lease map agree with what the file says this lane holds on ``path``."""
        for lease, p in list(self.leases.items()):
            if p == path and lease != held:
                del self.leases[lease]
                self.tombstones[lease] = path
                while len(self.tombstones) > _TOMBSTONES:
                    self.tombstones.popitem(last=False)
        if held is not None:
            self.leases[held] = path
            self.paths[path] = True

    def fan_in(self, rid: Any, fan: _Fanout, reply: Reply) -> None:
        fan.remaining -= 1
        if isinstance(reply, Abandoned):
            fan.leases += reply.leases
        if fan.remaining > 0:
            return
        del self.fanouts[rid]
        self.pending.pop(rid, None)
        if self.closing is None:
            self.to_agent(Abandoned(id=fan.reply_id, leases=sorted(set(fan.leases))))
        elif not self.fanouts:
            self.finish_close()

    def on_file_restarted(self, msg: FileRestarted, sender: Any) -> None:
        lost = [lease for lease, path in self.leases.items() if path == msg.path]
        self.track(msg.path, None)
        for lease in lost:
            self.to_agent(Revoked(lease=lease, path=msg.path, reason="actor_restart"))
        for rid, pending in list(self.pending.items()):
            unanswered_here = pending.path is None and pending.raw in msg.aliases
            if pending.path != msg.path and not unanswered_here:
                continue
            if isinstance(pending.request, Acquire | Recover):
                self.call(pending.request, msg.path, canonical=True)  # queue again
            else:
                del self.pending[rid]
                detail = "the file's actor restarted before answering; the outcome is unknown"
                self.to_agent(Error(id=rid, code="unavailable", detail=detail, path=msg.path))

    # Closing -------------------------------------------------------------------------------

    def on_agent_gone(self, msg: AgentGone, sender: Any) -> None:
        if self.closing is not None:
            return
        self.closing = msg.reason
        if self.leases:
            log.warning(
                "lane %s: agent gone (%s), abandoning %s",
                self.name,
                msg.reason,
                sorted(self.leases),
            )
        if not self.paths:
            self.finish_close()
            return
        self.internal_ids += 1
        self.abandon(Abandon(id=f"_gone{self.internal_ids}", lane=self.name, reason=msg.reason))
        self.wakeupAfter(_CLOSE_TIMEOUT_S, payload="close")

    def on_wakeup(self, msg: WakeupMessage, sender: Any) -> None:
        if msg.payload == "close" and self.closing is not None:
            self.finish_close()

    def finish_close(self) -> None:
        if self.registry is None:
            return  # already closed
        self.send(self.registry, LaneClosed(address=self.myAddress))
        self.send(self.myAddress, ActorExitRequest())
        self.registry = None

    def to_agent(self, message: Reply) -> None:
        if self.agent is not None and self.ref is not None:
            self.send(self.agent, LaneOutput(uid=self.ref.uid, name=self.ref.name, message=message))

    @property
    def name(self) -> str:
        return self.ref.name if self.ref is not None else "?"
