"""The gateway: a thespian actor that owns the listening sockets and speaks the wire protocol.

Clients of any language connect over TCP or a Unix socket and exchange length-prefixed msgpack
frames (``messages.codec``). No pickle crosses this boundary. The actor returns a
``ThespianWatch`` with every socket it owns from each ``receiveMessage``, so thespian's own
select loop wakes it with a ``WatchMessage`` when one is readable: everything happens in one
single-threaded process, and nothing blocks (sockets are non-blocking, output is buffered).

Per connection: the first request must be ``hello``, and it admits the connection only as
``system.gateway.admission`` decides: with a ``token_file``, the token; without one, the peer
must run as the service's own user (``system.gateway.peercred``, read at accept) unless
``allow_other_users``.
Before its hello a connection costs little: one frame of at most ``MAX_HELLO_BYTES`` is
buffered (a header announcing more is answered ``too_large`` and closed, its body never read),
the hello must arrive within ``hello_timeout_ms`` of accept (one sweep timer closes the late),
at most ``max_connections`` are open (one more is answered ``unavailable`` and closed; of
those the uid check will refuse, only the 8 newest wait for their hello), and
``accept`` failing for want of descriptors pauses the listeners with a growing back-off
instead of spinning or dying.

Each lane name used on an admitted connection gets its own lane
(``actors.lane_state.LaneState``), hosted here in the gateway's process; their calls reach the
SessionFiles over direct channels (``system.gateway.links``: one socket hop each way, not five
thespian messages), and replies and events are framed back. When the connection closes,
breaks, sends a frame over the size limit, or stays silent for three keepalive periods, its
lanes abandon everything they hold or wait for.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import resource
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from thespian.actors import (
    ActorExitRequest,
    PoisonMessage,
    ThespianWatch,
    WakeupMessage,
    WatchMessage,
)

from actors._shell import Handler, ShellActor, monotonic_ms
from actors.lane_state import CLOSE_TIMEOUT_S, LaneState
from messages.codec import HEADER, FrameDecodeError, FrameReader, decode_request, frame, take_frame
from messages.errors import ErrorCode, TooLarge
from messages.internal import (
    ChannelOffer,
    FileReply,
    FileRestarted,
    GatewayFailed,
    GatewayStarted,
    LaneCall,
    LaneClosed,
    LaneRef,
    Ping,
    Pong,
    StartGateway,
    StatusQuery,
)
from messages.wire import (
    PROTOCOL_VERSION,
    Abandon,
    Acquire,
    Alive,
    Append,
    Error,
    Granted,
    Hello,
    Keepalive,
    Priority,
    Recover,
    Release,
    Reply,
    Revoked,
    Rewrite,
    Status,
    StatusReply,
    Welcome,
)
from system.config import parse_listen
from system.gateway import peercred
from system.gateway.admission import (
    MAX_HELLO_BYTES,
    AcceptBackoff,
    HelloDeadlines,
    Policy,
    RateLimit,
    connection_cap,
    hello_refusal,
    startup_refusal,
)
from system.gateway.links import Links

__all__ = ["Gateway"]

log = logging.getLogger(__name__)

SERVER_NAME = "sessionlane/0.1"
_RECV_BYTES = 256 * 1024
_MAX_OUTBUF = 32 * 1024 * 1024
_MAX_LEASES_PER_CONN = 4096
_FLUSH_RETRY_S = 0.005
_BACKLOG = 1024
"""Connections the kernel holds for us before we accept them (bounded again by somaxconn).

A burst beyond the backlog is not refused but stalls in SYN retransmits for seconds, then
arrives all at once: better that it waits here, where it is accepted (or refused) at once."""
_ACCEPT_BUDGET = 64
"""Connections accepted per listener per wakeup: a flood waits its turn behind the clients."""
_MAX_STRANGERS_WAITING = 8
"""Connections the uid check will refuse, kept for their hello (to tell them why) at once; one
more closes the oldest. Without it, another local user could fill ``max_connections``."""
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_MAX_RECORD_DEPTH = 100
"""Deepest nesting of maps and lists accepted in a record.

A record may travel pickled through actors (calls routed through the Registry); pickling a
record nested about 500 deep exceeds the recursion limit, and thespian then drops the message
(the request would never be answered). Real transcript records nest a dozen levels at most.
"""


@dataclass
class _Conn:
    id: int
    sock: socket.socket
    peer: str
    peer_uid: int | None
    """The peer's user as read at accept (None: unknown, or not needed by the policy)."""
    last_seen: float
    pre: bytearray = field(default_factory=bytearray)
    """Bytes received before the hello was handled (at most one hello frame's worth)."""
    reader: FrameReader | None = None
    """Set once the hello admitted the connection."""
    out: bytearray = field(default_factory=bytearray)
    lanes: dict[str, LaneState] = field(default_factory=dict)
    leases: dict[str, str] = field(default_factory=dict)  # lease -> lane name
    closing: bool = False

    @property
    def hello(self) -> bool:
        """Whether its hello admitted the connection."""
        return self.reader is not None


class Gateway(ShellActor):
    log = log

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.listeners: dict[int, tuple[socket.socket, str]] = {}  # fd -> (socket, address)
        self.conns: dict[int, _Conn] = {}  # fd -> connection
        self.by_uid: dict[str, tuple[_Conn, LaneState]] = {}  # lane uid -> its connection, lane
        self.statuses: dict[str, tuple[int, Any]] = {}  # gateway status id -> (conn id, id)
        self.registry: Any = None
        self.policy = Policy(token=None, allow_other_users=False, service_uid=os.geteuid())
        self.max_frame_bytes = 8 * 1024 * 1024
        self.keepalive_ms = 10_000
        self.ids = itertools.count(1)
        self.unix_paths: list[str] = []
        self.flush_scheduled = False
        self.links: Links | None = None
        self.links_wakeup: float | None = None
        self.max_connections = 512
        self.hellos = HelloDeadlines(5_000)
        self.sweep_due: float | None = None  # when the one pending hello sweep fires
        self.backoff = AcceptBackoff()
        self.accept_paused = False
        self.warnings: dict[str, RateLimit] = {}
        self.strangers: dict[int, _Conn] = {}  # connection id -> a peer the uid check refuses

    def handlers(self) -> dict[type, Handler]:
        return {
            StartGateway: self.on_start,
            WatchMessage: self.on_watch,
            FileReply: self.on_file_reply,
            FileRestarted: self.on_file_restarted,
            ChannelOffer: self.on_channel_offer,
            StatusReply: self.on_status_reply,
            Error: self.on_status_reply,  # a status refused (e.g. a path outside the roots)
            WakeupMessage: self.on_wakeup,
            Ping: self.on_ping,
            PoisonMessage: self.on_poison,
            ActorExitRequest: self.on_exit,
        }

    def receiveMessage(self, msg: Any, sender: Any) -> Any:
        super().receiveMessage(msg, sender)
        fds = [] if self.accept_paused else list(self.listeners)
        fds += self.conns
        if self.links is not None:
            if self.links.flush() and not self.flush_scheduled:
                self.flush_scheduled = True
                self.wakeupAfter(_FLUSH_RETRY_S, payload="flush")
            self.schedule_links()
            fds += self.links.fds()
        return ThespianWatch(fds) if fds else None

    # Listeners -----------------------------------------------------------------------------

    def on_start(self, msg: StartGateway, sender: Any) -> None:
        self.registry = msg.registry
        self.policy = Policy(msg.token, msg.allow_other_users, os.geteuid())
        refusal = startup_refusal(self.policy, peercred.identifies_peers())
        if refusal is not None:
            self.send(sender, GatewayFailed(reason=refusal))
            return
        self.max_frame_bytes = msg.max_frame_bytes
        self.keepalive_ms = msg.keepalive_ms
        self.hellos = HelloDeadlines(msg.hello_timeout_ms)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_connections = connection_cap(
            msg.max_connections, -1 if soft == resource.RLIM_INFINITY else soft
        )
        if self.max_connections < msg.max_connections:
            log.warning(
                "max_connections %d lowered to %d: the open-file limit is %d",
                msg.max_connections,
                self.max_connections,
                soft,
            )
        self.links = Links(self, msg.roots, msg.suffixes, msg.idle_ms / 2, monotonic_ms)
        bound: list[str] = []
        try:
            for address in msg.listen:
                sock, actual = self.bind(address)
                sock.setblocking(False)
                self.listeners[sock.fileno()] = (sock, actual)
                bound.append(actual)
        except OSError as exc:
            self.close_listeners()
            self.send(sender, GatewayFailed(reason=f"cannot listen: {exc}"))
            return
        admits = (
            "token holders"
            if self.policy.token is not None
            else "every local user"
            if self.policy.allow_other_users
            else f"uid {self.policy.service_uid} only"
        )
        log.info("gateway listening on %s (admits %s)", ", ".join(bound), admits)
        self.wakeupAfter(self.keepalive_ms / 1000.0, payload="keepalive")
        self.send(sender, GatewayStarted(addresses=bound))

    def bind(self, address: str) -> tuple[socket.socket, str]:
        parsed = parse_listen(address)
        if parsed[0] == "unix":
            path = parsed[1]
            with contextlib.suppress(FileNotFoundError):
                if os.path.exists(path) and not _is_socket(path):
                    raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)  # created 0600: only our user may connect
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            sock.listen(_BACKLOG)
            self.unix_paths.append(path)
            return sock, f"unix://{path}"
        _, host, port = parsed
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
        real_port = sock.getsockname()[1]
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        return sock, f"tcp://{shown}:{real_port}"

    def close_listeners(self) -> None:
        for sock, _ in self.listeners.values():
            sock.close()
        self.listeners.clear()
        for path in self.unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.unix_paths.clear()

    def on_exit(self, msg: ActorExitRequest, sender: Any) -> None:
        for conn in list(self.conns.values()):
            self.close(conn, "gateway stopping")
        if self.links is not None:
            self.links.flush()  # the abandons, before the channels close
            self.links.close()
        self.close_listeners()

    # Socket activity -----------------------------------------------------------------------

    def on_watch(self, msg: WatchMessage, sender: Any) -> None:
        for fd in msg.ready:
            if fd in self.listeners:
                self.accept(self.listeners[fd][0])
            elif (conn := self.conns.get(fd)) is not None:
                self.read(conn)
            elif self.links is not None and self.links.owns(fd):
                self.links.on_ready(fd)

    def accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPT_BUDGET):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self.pause_accepting(exc)
                else:
                    log.warning("accept failed: %s", exc)
                return
            if ended := self.backoff.succeeded():
                self.note("accepting", logging.INFO, "accepting again after %d failures", ended)
            if len(self.conns) >= self.max_connections:
                self.refuse_full(sock, str(peer) or "unix")
                continue
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            now = monotonic_ms()
            conn = _Conn(
                id=next(self.ids),
                sock=sock,
                peer=str(peer) or "unix",
                # Read now: the peer's socket may be gone by the time it says hello.
                peer_uid=peercred.peer_uid(sock) if self.policy.by_peer else None,
                last_seen=now,
            )
            self.conns[sock.fileno()] = conn
            self.hellos.add(conn.id, now)
            self.schedule_sweep()
            if self.policy.by_peer and conn.peer_uid != self.policy.service_uid:
                self.hold_stranger(conn)

    def hold_stranger(self, conn: _Conn) -> None:
        """Keep a few refused-to-be peers for their hello; close the oldest past that."""
        self.strangers[conn.id] = conn
        if len(self.strangers) <= _MAX_STRANGERS_WAITING:
            return
        oldest = next(iter(self.strangers.values()))
        refusal = hello_refusal(self.policy, oldest.peer_uid, None)
        assert refusal is not None
        self.write(oldest, Error(code="unauthorized", detail=refusal))
        self.close(oldest, "too many strangers waiting")
        self.warn("strangers", "closed a connection from %s: %s", oldest.peer, refusal)

    def pause_accepting(self, exc: OSError) -> None:
        """Out of descriptors: stop watching the listeners for a while (the backlog waits)."""
        first = self.backoff.failures == 0
        delay = self.backoff.failed()
        if not self.accept_paused:
            self.accept_paused = True
            self.wakeupAfter(delay, payload="accept")
        if first:
            self.warn(
                "descriptors",
                "cannot accept connections (%s): pausing, retrying after %.2f s and growing"
                " intervals; the %d open connections are still served",
                exc,
                delay,
                len(self.conns),
            )

    def refuse_full(self, sock: socket.socket, peer: str) -> None:
        """One connection too many: say so in one non-blocking write, and close it."""
        detail = f"too many connections ({self.max_connections})"
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(frame(Error(code="unavailable", detail=detail)))
            # What the peer sent already (its hello), read so the close is not a reset that
            # could overtake the error frame.
            sock.recv(HEADER.size + MAX_HELLO_BYTES)
        sock.close()
        self.warn("full", "refused a connection from %s: %s", peer, detail)

    def warn(self, kind: str, fmt: str, *args: Any) -> None:
        """A warning about what strangers do, at most one per 10 s per ``kind``."""
        self.note(kind, logging.WARNING, fmt, *args)

    def note(self, kind: str, level: int, fmt: str, *args: Any) -> None:
        """Log at ``level``, at most once per 10 s per ``kind`` (then saying how many were not)."""
        suppressed = self.warnings.setdefault(kind, RateLimit()).allow(monotonic_ms())
        if suppressed is None:
            return
        if suppressed:
            fmt += " (and %d more like it since)"
            args = (*args, suppressed)
        log.log(level, fmt, *args)

    def schedule_sweep(self) -> None:
        """Have one wakeup pending at the earliest hello deadline, never one per connection."""
        due = self.hellos.next_due()
        if due is not None and self.sweep_due is None:
            self.sweep_due = due
            self.wakeupAfter(max(0.0, due - monotonic_ms()) / 1000.0, payload="hellos")

    def sweep_hellos(self) -> None:
        self.sweep_due = None
        late = set(self.hellos.expired(monotonic_ms()))
        if late:
            timeout = self.hellos.timeout_ms
            detail = f"no hello within {timeout:.0f} ms of connecting"
            for conn in [c for c in self.conns.values() if c.id in late]:
                self.write(conn, Error(code="unauthorized", detail=detail))
                self.close(conn, detail)
                self.warn("late", "closed a connection from %s: %s", conn.peer, detail)
        self.schedule_sweep()

    def read(self, conn: _Conn) -> None:
        # Before the hello, never more than one hello frame's worth is buffered.
        size = _RECV_BYTES if conn.hello else HEADER.size + MAX_HELLO_BYTES - len(conn.pre)
        try:
            data = conn.sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(conn, f"connection error: {exc}")
            return
        if not data:
            self.close(conn, "connection closed")
            return
        conn.last_seen = monotonic_ms()
        if conn.reader is None:
            data = self.read_hello(conn, data)
            if conn.reader is None or conn.closing:
                return
        bodies, too_large = conn.reader.feed_until_error(data)
        for body in bodies:
            if conn.closing:
                return
            self.handle_frame(conn, body)
        if too_large is not None and not conn.closing:
            self.write(conn, Error(code="too_large", detail=too_large.detail))
            self.close(conn, "frame too large", flush=True)

    def read_hello(self, conn: _Conn, data: bytes) -> bytes:
        """Buffer ``data`` until the first frame is whole and handle it; what follows it."""
        conn.pre += data
        try:
            body = take_frame(conn.pre, MAX_HELLO_BYTES)
        except TooLarge as exc:
            detail = f"{exc.detail} before the hello"
            self.write(conn, Error(code="too_large", detail=detail))
            self.close(conn, "frame too large before the hello", flush=True)
            self.warn("large", "closed a connection from %s: %s", conn.peer, detail)
            return b""
        if body is None:
            return b""
        self.handle_frame(conn, body)
        rest, conn.pre = bytes(conn.pre), bytearray()
        return rest

    def handle_frame(self, conn: _Conn, body: bytes) -> None:
        try:
            request = decode_request(body)
        except FrameDecodeError as exc:
            self.write(conn, Error(id=exc.request_id, code="bad_frame", detail=exc.detail))
            if not conn.hello:
                self.close(conn, "bad frame before hello", flush=True)
            return
        if not conn.hello:
            self.greet(conn, request)
            return
        self.dispatch(conn, request)

    def greet(self, conn: _Conn, request: Any) -> None:
        if not isinstance(request, Hello):
            detail = "the first request on a connection must be hello"
            admitted = hello_refusal(self.policy, conn.peer_uid, None) is None
            code: ErrorCode = "bad_frame" if admitted else "unauthorized"
            self.write(conn, Error(id=request.id, code=code, detail=detail))
            self.close(conn, "no hello", flush=True)
            return
        refusal = hello_refusal(self.policy, conn.peer_uid, request.token)
        if refusal is not None:
            self.write(conn, Error(id=request.id, code="unauthorized", detail=refusal))
            self.close(conn, "unauthorized", flush=True)
            self.warn("refused", "refused connection from %s: %s", conn.peer, refusal)
            return
        conn.reader = FrameReader(self.max_frame_bytes)
        self.hellos.discard(conn.id)
        self.write(conn, Welcome(id=request.id, server=SERVER_NAME, protocol=PROTOCOL_VERSION))

    def dispatch(self, conn: _Conn, request: Any) -> None:
        match request:
            case Hello():
                self.write(
                    conn, Welcome(id=request.id, server=SERVER_NAME, protocol=PROTOCOL_VERSION)
                )
            case Keepalive():
                self.write(conn, Alive(id=request.id))
            case Status():
                sid = f"g{next(self.ids)}"
                self.statuses[sid] = (conn.id, request.id)
                self.send(
                    self.registry, StatusQuery(request=request.model_copy(update={"id": sid}))
                )
            case Acquire() | Recover() | Abandon():
                priority = request.priority if isinstance(request, Acquire) else None
                self.to_lane(conn, request.lane, request, priority)
            case Append() | Rewrite() if (refusal := _too_deep(request.records)) is not None:
                self.write(conn, Error(id=request.id, code="invalid_record", detail=refusal))
            case Append() if request.lane is not None:
                self.to_lane(conn, request.lane, request, None)
            case Release() | Append() | Rewrite():
                assert request.lease is not None
                lane = conn.leases.get(request.lease)
                if lane is not None and lane in conn.lanes:
                    self.to_lane(conn, lane, request, None)
                elif isinstance(request, Release):
                    self.write(
                        conn,
                        Error(
                            id=request.id,
                            code="not_holder",
                            detail=f"lease {request.lease} is not held here",
                        ),
                    )
                else:
                    self.write(
                        conn,
                        Error(
                            id=request.id,
                            code="stale_fence",
                            detail=f"lease {request.lease} is not held here",
                        ),
                    )

    def to_lane(self, conn: _Conn, name: str, request: Any, priority: Priority | None) -> None:
        lane = conn.lanes.get(name)
        if lane is None:
            uid = f"{name}#{conn.id}.{uuid.uuid4().hex[:6]}"
            ref = LaneRef(
                uid=uid, name=name, address=self.myAddress, priority=priority or "interactive"
            )
            lane = conn.lanes[name] = LaneState(ref, self)
            self.by_uid[uid] = (conn, lane)
        lane.request(request)

    # LaneHost: the lanes of our connections ------------------------------------------------

    def call(self, call: LaneCall) -> None:
        assert self.links is not None
        self.links.call(call)

    def to_agent(self, lane: LaneState, message: Reply) -> None:
        found = self.by_uid.get(lane.uid)
        if found is None:
            return
        conn = found[0]
        if isinstance(message, Granted):
            conn.leases[message.lease] = lane.name
            while len(conn.leases) > _MAX_LEASES_PER_CONN:
                conn.leases.pop(next(iter(conn.leases)))
        elif isinstance(message, Revoked):
            conn.leases.pop(message.lease, None)
        self.write(conn, message)

    def closed(self, lane: LaneState) -> None:
        self.by_uid.pop(lane.uid, None)
        if self.links is not None and lane.uid in self.links.registry_lanes:
            # Calls through the Registry may have reached another convention member, which
            # keeps the lane until told (its leases there are abandoned already).
            self.links.registry_lanes.discard(lane.uid)
            self.send(self.registry, LaneClosed(address=self.myAddress, uid=lane.uid))

    # LinkHost: what the links report -------------------------------------------------------

    def deliver(self, reply: FileReply) -> None:
        found = self.by_uid.get(reply.lane)
        if found is not None:
            found[1].file_reply(reply)

    def restarted(self, msg: FileRestarted) -> None:
        for _, lane in list(self.by_uid.values()):
            lane.file_restarted(msg)

    def in_use(self, path: str) -> bool:
        return any(lane.uses(path) for _, lane in self.by_uid.values())

    # From the actors -----------------------------------------------------------------------

    def on_file_reply(self, msg: FileReply, sender: Any) -> None:
        self.deliver(msg)

    def on_file_restarted(self, msg: FileRestarted, sender: Any) -> None:
        if self.links is not None:
            self.links.on_restarted(msg)

    def on_channel_offer(self, msg: ChannelOffer, sender: Any) -> None:
        if self.links is not None:
            self.links.on_offer(msg)

    def schedule_links(self) -> None:
        assert self.links is not None
        due = self.links.next_due()
        if due is not None and (self.links_wakeup is None or due < self.links_wakeup):
            self.links_wakeup = due
            self.wakeupAfter(max(0.0, due - monotonic_ms()) / 1000.0, payload=("links", due))

    def on_status_reply(self, msg: StatusReply | Error, sender: Any) -> None:
        """The Registry's answer to a ``status``: the files, or the refusal (``error``)."""
        found = self.statuses.pop(str(msg.id), None)
        if found is None:
            return
        conn_id, rid = found
        conn = next((c for c in self.conns.values() if c.id == conn_id), None)
        if conn is not None:
            self.write(conn, msg.model_copy(update={"id": rid}))

    def on_poison(self, msg: PoisonMessage, sender: Any) -> None:
        """A call this gateway sent could not be delivered: answer it, never leave it hanging.

        thespian returns a message it could not send (e.g. one that would not pickle) to its
        sender as ``PoisonMessage``.
        """
        call = msg.poisonMessage
        log.error("undeliverable %s: %s", type(call).__name__, msg.details)
        if isinstance(call, LaneCall) and call.request.id is not None:
            detail = "the request could not be delivered inside the service"
            error = Error(id=call.request.id, code="internal", detail=detail)
            self.deliver(FileReply(path=call.path, message=error, lane=call.lane.uid))

    def on_ping(self, msg: Ping, sender: Any) -> None:
        self.send(sender, Pong(nonce=msg.nonce, connections=len(self.conns)))

    # Output and closing --------------------------------------------------------------------

    def write(self, conn: _Conn, message: Reply) -> None:
        if conn.closing and not conn.out:
            return
        conn.out += frame(message)
        self.flush(conn)
        if len(conn.out) > _MAX_OUTBUF:
            self.close(conn, "client does not read its replies")

    def flush(self, conn: _Conn) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                conn.out.clear()
                self.close(conn, f"connection error: {exc}")
                return
            del conn.out[:sent]
        if conn.out and not self.flush_scheduled:
            self.flush_scheduled = True
            self.wakeupAfter(_FLUSH_RETRY_S, payload="flush")

    def close(self, conn: _Conn, reason: str, *, flush: bool = False) -> None:
        if flush and conn.out:
            with contextlib.suppress(OSError):
                conn.sock.setblocking(True)
                conn.sock.settimeout(0.2)
                conn.sock.sendall(bytes(conn.out))
        conn.closing = True
        self.hellos.discard(conn.id)
        self.strangers.pop(conn.id, None)
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        with contextlib.suppress(OSError):
            conn.sock.close()
        for name, lane in conn.lanes.items():
            if lane.agent_gone(f"{reason} ({conn.peer}, lane {name})"):
                self.wakeupAfter(CLOSE_TIMEOUT_S, payload=("close", lane.uid))
        if conn.lanes:
            log.info(
                "connection %d closed (%s); %d lanes released", conn.id, reason, len(conn.lanes)
            )

    def on_wakeup(self, msg: WakeupMessage, sender: Any) -> None:
        if msg.payload == "flush":
            self.flush_scheduled = False
            for conn in list(self.conns.values()):
                if conn.out:
                    self.flush(conn)
        elif isinstance(msg.payload, tuple) and msg.payload[0] == "close":
            if (found := self.by_uid.get(msg.payload[1])) is not None:
                found[1].close_timeout()
        elif isinstance(msg.payload, tuple) and msg.payload[0] == "links":
            if self.links_wakeup is not None and msg.payload[1] >= self.links_wakeup:
                self.links_wakeup = None
            if self.links is not None:
                self.links.tick()
        elif msg.payload == "hellos":
            self.sweep_hellos()
        elif msg.payload == "accept":
            self.accept_paused = False
            for sock, _ in list(self.listeners.values()):
                if not self.accept_paused:
                    self.accept(sock)
        elif msg.payload == "keepalive":
            limit = 3 * self.keepalive_ms
            now = monotonic_ms()
            for conn in list(self.conns.values()):
                if now - conn.last_seen > limit:
                    self.close(conn, f"silent for more than {limit} ms (keepalive missed)")
            self.wakeupAfter(self.keepalive_ms / 1000.0, payload="keepalive")


def _too_deep(records: list[Any]) -> str | None:
    """Why ``records`` nest deeper than :data:`_MAX_RECORD_DEPTH`, or None (iterative)."""
    for index, record in enumerate(records):
        stack: list[tuple[Any, int]] = [(record, 1)]
        while stack:
            value, depth = stack.pop()
            if depth > _MAX_RECORD_DEPTH:
                return f"record {index}: nested deeper than {_MAX_RECORD_DEPTH} levels"
            if isinstance(value, dict):
                stack.extend((v, depth + 1) for v in value.values())
            elif isinstance(value, list):
                stack.extend((v, depth + 1) for v in value)
    return None


def _is_socket(path: str) -> bool:
    import stat

    return stat.S_ISSOCK(os.lstat(path).st_mode)
