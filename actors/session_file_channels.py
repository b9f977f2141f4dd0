"""The direct channels of a SessionFile: how the gateway reaches a file without the actor chain.

``ChannelsMixin`` is a part of ``actors.session_file.SessionFile``, not used alone: it shares
the actor's state and reads its clock through ``now()``. The sockets themselves are the
``ChannelServer`` of ``actors.file_channels``; this part connects it to the actor.

The gateway reaches a file over a direct channel (``messages.channel``) instead of the actor
chain: it asks through the Registry (``OpenChannel``, counted like a call), and the file
answers with a ``ChannelOffer`` naming its ``ChannelServer``, opened on the first such
request. Channel calls run through exactly the code of a ``LaneCall``, with the connection (a
``ChannelRef``) as the lane's address; every message to such a lane becomes a reply frame on
that connection, queued, and written once at the end of the actor's turn. They are not
counted in ``received`` (that number is compared with what the Registry forwarded), so an
open channel keeps the file from asking to be passivated, and a channel that closes abandons
its lanes' leases and requests. The server's sockets are watched always; the always-readable
pipe of group commit only while a pass is being ended (``actors.session_file_commit``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from actors.file_channels import ChannelCallEvent, ChannelClosed, ChannelRef, ChannelServer
from actors.lease_table import Effect, LeaseTable
from messages.channel import reply_frame
from messages.internal import ChannelOffer, FileReply, LaneCall, LaneRef, OpenChannel

__all__ = ["ChannelsMixin"]


class _Broken(Protocol):
    """``actors.session_file.Broken`` (not imported: that module imports this one)."""

    @property
    def code(self) -> Any: ...
    @property
    def detail(self) -> str: ...


log = logging.getLogger(__name__)

_FLUSH_RETRY_S = 0.002
"""How soon channel output a full socket buffer refused is written again."""


class ChannelsMixin:
    """The channel end of ``SessionFile``: offers, calls and closes, replies as frames."""

    # What this part uses of the rest of the actor.
    channels: ClassVar[bool]
    watch_supported: bool
    path: str
    table: LeaseTable | None
    broken: _Broken | None
    incarnation: int
    retiring: bool
    lanes: dict[str, Any]
    lane_names: dict[str, str]
    counters: dict[str, int]

    if TYPE_CHECKING:

        def now(self) -> float: ...
        def from_registry(self) -> None: ...
        def touch(self) -> None: ...
        def serve(self, call: LaneCall) -> None: ...
        def on_handler_error(self, msg: Any, sender: Any, exc: Exception) -> None: ...
        def perform(self, effects: list[Effect]) -> None: ...
        def send(self, targetAddr: Any, msg: Any) -> None: ...
        def wakeupAfter(self, timePeriod: Any, payload: Any = None) -> None: ...

    def init_channels(self) -> None:
        self.server: ChannelServer | None = None
        self.flush_armed = False
        self.closed_channels = 0

    def on_open_channel(self, msg: OpenChannel, sender: Any) -> None:
        self.from_registry()
        reply_to = msg.reply_to if msg.reply_to is not None else sender
        server, reason = self.channel_server()
        canonical = self.path or None
        if server is None:
            code = self.broken.code if self.broken is not None else None
            offer = ChannelOffer(
                path=msg.path, nonce=msg.nonce, canonical=canonical, reason=reason, code=code
            )
        else:
            offer = ChannelOffer(
                path=msg.path,
                nonce=msg.nonce,
                canonical=canonical,
                address=server.address,
                token=server.token,
                incarnation=self.incarnation,
            )
        self.send(reply_to, offer)

    def channel_server(self) -> tuple[ChannelServer | None, str]:
        """The channel listener, opened on first use, or None and why there is none."""
        if self.server is not None:
            return self.server, ""
        if self.table is None:
            detail = self.broken.detail if self.broken is not None else ""
            return None, detail or "the file actor is not initialised"
        if not self.watch_supported:
            return None, "this actor system cannot watch sockets"
        if not self.channels:
            return None, "channels are turned off"
        try:
            self.server = ChannelServer.open(
                self.path, self.incarnation, accepting=lambda: not self.retiring
            )
        except OSError as exc:
            log.error("cannot open a channel listener for %s: %s", self.path, exc)
            return None, f"cannot open a channel listener: {exc}"
        return self.server, ""

    def on_channels_ready(self, ready: list[int]) -> None:
        """Serve what the ready channel sockets brought: calls, and channels that closed."""
        if self.server is None:
            return
        for event in self.server.on_ready(ready):
            if isinstance(event, ChannelCallEvent):
                self.on_channel_call(event)
            else:
                self.on_channel_closed(event)

    def on_channel_call(self, event: ChannelCallEvent) -> None:
        """A call on a channel: served like a ``LaneCall`` but not counted in ``received``."""
        c = event.call
        lane = LaneRef(uid=c.uid, name=c.name, address=event.conn, priority=c.priority)
        call = LaneCall(lane=lane, path=self.path, canonical=True, request=c.request)
        self.counters["channel_calls"] += 1
        self.touch()
        try:
            self.serve(call)
        except Exception as exc:
            log.exception("channel call to %s failed", self.path)
            try:
                self.on_handler_error(call, None, exc)
            except Exception:
                log.exception("answering the failed channel call to %s failed", self.path)

    def on_channel_closed(self, event: ChannelClosed) -> None:
        """Abandon every lane that was reached through the closed channel, and forget it."""
        gone = [
            uid
            for uid, address in self.lanes.items()
            if isinstance(address, ChannelRef) and address == event.conn
        ]
        for uid in gone:
            try:
                if self.table is not None:
                    self.closed_channels += 1
                    key = ("closed", self.closed_channels)
                    reason = "the gateway's channel closed"
                    self.perform(self.table.abandon(key, uid, self.now(), reason=reason))
            except Exception:
                log.exception("abandoning lane %s of %s failed", uid, self.path)
            self.lanes.pop(uid, None)
            self.lane_names.pop(uid, None)

    def flush_channels(self) -> list[ChannelClosed]:
        """Write the channels' output; the connections found closed (for the caller)."""
        if self.server is None:
            return []
        try:
            left = self.server.flush()
        except Exception:
            log.exception("writing the channels of %s failed", self.path)
            left = True
        if left and not self.flush_armed:
            self.flush_armed = True
            self.wakeupAfter(_FLUSH_RETRY_S, payload=("flush", 0))
        return self.server.closed_since_last()

    def close_channels(self) -> None:
        """The actor is exiting: write what is left if the sockets take it, then close them."""
        if self.server is not None:
            with contextlib.suppress(OSError):
                self.server.flush()  # best effort: the last replies of a passivated file
            self.server.close()
            self.server = None

    def deliver(self, address: Any, message: FileReply) -> None:
        """To a Lane actor, or as a reply frame on a channel (dropped if it closed)."""
        if isinstance(address, ChannelRef):
            if self.server is not None:
                frame = reply_frame(message.lane, message.held, message.message)
                self.server.send(address, frame)
        else:
            self.send(address, message)
