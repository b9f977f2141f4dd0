"""The way out of a SessionFile: its messages to lanes, held by group commit, then delivered.

``Outlet`` is a part of ``sessionlane.actors.session_file.SessionFile``: it owns the file's
directory of lanes (uid to address and name, learnt from their calls) and every reply and event
leaves through it. A message is held while the file's ``GroupCommit`` says it must wait (an ack an
fdatasync does not cover yet, or anything queued behind one for its lane), and delivered to a
Lane actor (``send``, the actor's) or, for a lane reached over a channel, as a reply frame on
that channel (``FileChannels``). A broken file holds nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sessionlane.actors.file_channels import ChannelRef
from sessionlane.actors.group_commit import Outgoing
from sessionlane.actors.session_file_serving import Broken, Serving
from sessionlane.actors.session_file_writes import call_key
from sessionlane.messages.internal import FileReply, LaneCall
from sessionlane.messages.wire import Reply

__all__ = ["Outlet"]


class Outlet:
    """The lanes of one file and the messages to them."""

    def __init__(self, send: Callable[[Any, Any], None]) -> None:
        self.send = send
        self.path = ""
        self.lanes: dict[str, Any] = {}  # lane uid -> Lane address (or channel)
        self.names: dict[str, str] = {}  # lane uid -> the name its agent gave it

    def met(self, call: LaneCall) -> None:
        """A call of ``call.lane``: where its replies and events go from now on."""
        self.lanes[call.lane.uid] = call.lane.address
        self.names[call.lane.uid] = call.lane.name

    def name(self, uid: Any) -> str:
        return self.names.get(uid, str(uid))

    def through(self, conn: ChannelRef) -> list[str]:
        """The lanes reached through the channel ``conn``."""
        return [u for u, a in self.lanes.items() if isinstance(a, ChannelRef) and a == conn]

    def forget(self, uid: str) -> None:
        self.lanes.pop(uid, None)
        self.names.pop(uid, None)

    def answer(self, s: Serving, req: Any, lane_uid: Any, message: Reply) -> None:
        """Answer the request ``req`` (a table key: lane uid, request id) of ``lane_uid``."""
        _, rid = req
        reply = FileReply(
            path=self.path, message=message.model_copy(update={"id": rid}), lane=lane_uid
        )
        self.event(s, lane_uid, reply)

    def reply(
        self, s: Serving | Broken, call: LaneCall, message: Reply, *, needs_sync: bool = False
    ) -> None:
        """Answer ``call``; ``needs_sync``: only once an fdatasync covers the append it acks."""
        lane = call.lane.uid
        out = Outgoing(
            lane=lane,
            address=call.lane.address,
            message=FileReply(path=self.path, message=message, lane=lane),
            needs_sync=needs_sync,
            key=call_key(call) if needs_sync else None,
        )
        self.emit(s, out)

    def event(self, s: Serving, lane_uid: Any, message: FileReply) -> None:
        """Send ``message`` to the lane ``lane_uid`` (dropped if the lane is unknown)."""
        address = self.lanes.get(lane_uid)
        if address is not None:
            self.emit(
                s, Outgoing(lane=lane_uid, address=address, message=message, needs_sync=False)
            )

    def emit(self, s: Serving | Broken, out: Outgoing) -> None:
        """Send ``out`` now, or hold it in the outbox until the next commit."""
        if not isinstance(s, Serving):
            self.send(out.address, out.message)
        elif s.commit.hold(out):
            self.deliver(s, out.address, out.message)

    def deliver(self, s: Serving, address: Any, message: FileReply) -> None:
        """To a Lane actor, or as a reply frame on a channel (dropped if it closed)."""
        if isinstance(address, ChannelRef):
            s.channels.send(address, message)
        else:
            self.send(address, message)
