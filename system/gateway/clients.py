"""The gateway's client connections: listeners, admission at hello, framed input and output.

``Clients`` owns every listening socket and every client connection of the gateway (each an
``sessionlane.actors.endpoint`` ``Acceptor`` or ``FramedSocket``) and answers the connection-level
protocol itself: ``hello`` (admission, as ``sessionlane.system.gateway.admission`` decides), a
repeated ``hello``, ``keepalive``, frames it cannot decode, frames over the size limits. Every other
request of an admitted connection goes to its host (the ``Gateway`` actor), which answers it
through :meth:`Clients.write`. Nothing here blocks: an error frame sent just before a close
is written by the same non-blocking flushes as any output (the socket lingers, unwatched,
until it is written or ``_LINGER_MS`` passed).

Before its hello a connection costs little: one frame of at most ``MAX_HELLO_BYTES`` is
buffered (a header announcing more is answered ``too_large`` and closed, its body never read),
the hello must arrive within ``hello_timeout_ms`` of accept (one sweep timer closes the late),
at most ``max_connections`` are open (one more is answered ``unavailable`` and closed, unless
it comes from the service's own user and a connection of another user waits unadmitted: that
one is closed instead), and ``accept`` failing for want of descriptors pauses the listeners
with a growing back-off instead of spinning or dying. Of the unadmitted connections of other
users (those the uid check will refuse; with a token, those of a known other user until they
proved it), only the 8 newest wait, per user with a token: a stranger cannot crowd the
service's own user out, whatever the mode.

With a ``token_file``, admission takes two steps (``docs/protocol.md``, "Token proof"):
``hello`` with the client's nonce is answered ``challenge`` with ours, and the client's
``proof`` decides; the ``welcome`` carries our own proof. A peer's proofs are checked no
faster than ``ProofDelays`` allows after wrong ones: the connection waits (parked, reading
nothing) for its turn.

A hello may ask for direct channels (``docs/direct-channel.md``); the ``welcome`` says whether
they are offered. (About 620 lines: admission is one piece, and that offer is part of it.)
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import socket
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sessionlane.actors.endpoint import AcceptBackoff, Acceptor, FramedSocket
from sessionlane.messages.client_frames import MAX_CLIENT_OUTPUT_BYTES
from sessionlane.messages.codec import HEADER, FrameDecodeError, decode_request, frame
from sessionlane.messages.errors import ErrorCode
from sessionlane.messages.handshake import NONCE_BYTES, client_proof, matches, server_proof
from sessionlane.messages.wire import (
    PROTOCOL_VERSION,
    Alive,
    Challenge,
    Error,
    Hello,
    Keepalive,
    Proof,
    Request,
    RequestId,
    Welcome,
)
from sessionlane.system.gateway import listeners, peercred
from sessionlane.system.gateway.admission import (
    MAX_HELLO_BYTES,
    WRONG_PROOF_REFUSAL,
    HelloDeadlines,
    Policy,
    ProofDelays,
    RateLimit,
    hello_refusal,
)
from sessionlane.system.gateway.timers import (
    AcceptResume,
    FlushDue,
    GatewayTimer,
    HelloSweep,
    ProofDue,
)

if TYPE_CHECKING:
    from sessionlane.actors.lane_state import LaneState

__all__ = ["SERVER_NAME", "Client", "Clients", "ClientsHost"]

log = logging.getLogger(__name__)

SERVER_NAME = "sessionlane/0.1"
_RECV_BYTES = 256 * 1024
"""Read per connection per wake-up: a flood waits its turn behind the other clients."""
_FLUSH_RETRY_S = 0.005
_LINGER_MS = 1_000.0
"""How long a closed connection's last frames (an error) may take to be written."""
_ACCEPT_BUDGET = 64
"""Connections accepted per listener per wakeup: a flood waits its turn behind the clients."""
_MAX_STRANGERS_WAITING = 8
"""Unadmitted connections of other users kept at once (without a token: in all, those the uid
check will refuse, kept to tell them why; with one: per user, until they proved the token); one
more closes the oldest. Without it, another local user could fill ``max_connections``."""
_MAKE_ROOM = "closed to make room for the service's own user (too many connections)"


class ClientsHost(Protocol):
    """What the connections need from the gateway actor."""

    def wake(self, timer: GatewayTimer, seconds: float) -> None:
        """Have ``timer`` come back to the gateway after ``seconds``."""

    def on_request(self, client: Client, request: Request) -> None:
        """A request of an admitted connection that is not the connection's own business."""

    def on_closed(self, client: Client, reason: str) -> None:
        """``client`` is closed (its lanes must abandon what they hold)."""


@dataclass(eq=False)
class Client:
    """One client connection."""

    id: int
    end: FramedSocket
    peer: str
    peer_uid: int | None
    """The peer's user as read at accept (None: unknown, or not needed by the policy)."""
    last_seen: float
    host: str = "unix"
    """The peer's address without its port (who it is, where its uid is unknown)."""
    admitted: bool = False
    """Whether its hello admitted the connection."""
    nonce: bytes | None = None
    """With a token: the client's nonce, from its hello."""
    challenge: bytes | None = None
    """With a token: our nonce, once the hello was answered ``challenge``."""
    parked: bool = False
    """Its proof waits for its turn (``ProofDelays``): nothing more is read from it."""
    closing: bool = False
    direct: bool | None = None
    """Its hello asked for direct channels (None: it did not ask); once admitted, whether
    they are offered to it (``docs/direct-channel.md``)."""
    lanes: dict[str, LaneState] = field(default_factory=dict)
    """The lanes it opened, by name (the gateway's to manage)."""


@dataclass
class Limits:
    """What the service's settings say about connections (fixed at start)."""

    max_frame_bytes: int = 8 * 1024 * 1024
    keepalive_ms: float = 10_000
    max_connections: int = 512
    direct_channels: bool = True


class Clients:
    """Every listener and client connection of the gateway. Not thread-safe; never blocks."""

    def __init__(self, host: ClientsHost, clock: Callable[[], float]) -> None:
        self.host = host
        self.clock = clock
        self.policy = Policy(token=None, allow_other_users=False, service_uid=-1)
        self.limits = Limits()
        self.listeners: dict[int, Acceptor] = {}  # fd -> listener
        self.unix_paths: list[str] = []
        self.conns: dict[int, Client] = {}  # fd -> connection
        self.by_id: dict[int, Client] = {}
        self.lingering: dict[int, tuple[FramedSocket, float]] = {}  # fd -> (end, give up at)
        self.ids = itertools.count(1)
        self.hellos = HelloDeadlines(5_000)
        self.sweep_due: float | None = None  # when the one pending hello sweep fires
        self.backoff = AcceptBackoff()
        self.accept_paused = False
        self.flush_scheduled = False
        self.warnings: dict[str, RateLimit] = {}
        # The unadmitted connections of other users, oldest first: per uid with a token, all
        # in one group (None) without.
        self.strangers: dict[int | None, dict[int, Client]] = {}
        self.delays = ProofDelays()
        self.proofs: list[tuple[float, int, bytes]] = []  # heap: (turn, connection id, proof)
        self.proof_due: float | None = None  # when the one pending ProofDue fires
        self.parked_ids: dict[int, RequestId | None] = {}  # connection id -> proof request id

    # Listeners -----------------------------------------------------------------------------

    def listen(self, addresses: list[str]) -> list[str]:
        """Listen on every address; the addresses as bound. ``OSError``: none is kept."""
        bound: list[str] = []
        try:
            for address in addresses:
                sock, actual, unix_path = listeners.bind(address)
                if unix_path is not None:
                    self.unix_paths.append(unix_path)
                acceptor = Acceptor(sock, _ACCEPT_BUDGET, self.backoff)
                self.listeners[acceptor.fd] = acceptor
                bound.append(actual)
        except OSError:
            self.close_listeners()
            raise
        return bound

    def close_listeners(self) -> None:
        for acceptor in self.listeners.values():
            acceptor.close()
        self.listeners.clear()
        listeners.unlink(self.unix_paths)
        self.unix_paths.clear()

    def fds(self) -> list[int]:
        """What to watch for reading: the listeners (unless paused) and the connections."""
        fds = [] if self.accept_paused else list(self.listeners)
        # A parked connection is not watched: its input waits in the kernel for its turn.
        return fds + [fd for fd, client in self.conns.items() if not client.parked]

    def on_ready(self, fd: int) -> bool:
        """Serve a readable fd; False if it is none of ours."""
        if (acceptor := self.listeners.get(fd)) is not None:
            self.accept(acceptor)
        elif (client := self.conns.get(fd)) is not None:
            self.read(client)
        else:
            return False
        return True

    def accept(self, acceptor: Acceptor) -> None:
        accepted = acceptor.accept(
            lambda sock, peer: self.admit_socket(
                sock, str(peer) or "unix", str(peer[0]) if isinstance(peer, tuple) else "unix"
            )
        )
        if accepted.recovered:
            self.note(
                "accepting", logging.INFO, "accepting again after %d failures", accepted.recovered
            )
        if accepted.pause_s is not None:
            self.pause_accepting(accepted.error, accepted.pause_s, accepted.first_pause)
        elif accepted.error is not None:
            log.warning("accept failed: %s", accepted.error)

    def admit_socket(self, sock: socket.socket, peer: str, host: str = "unix") -> None:
        """A new connection: counted, timed for its hello, its peer's uid read now."""
        # The uid is read now: the peer's socket may be gone by the time it says hello.
        uid = peercred.peer_uid(sock) if self.policy.reads_uid else None
        if len(self.conns) >= self.limits.max_connections:
            victim = self.make_room_for(uid)
            if victim is None:
                self.refuse_full(sock, peer)
                return
            self.write(victim, Error(code="unavailable", detail=_MAKE_ROOM))
            self.close(victim, _MAKE_ROOM, flush=True)
            self.warn("full", "closed a connection from %s: %s", victim.peer, _MAKE_ROOM)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = FramedSocket(
            sock,
            self.limits.max_frame_bytes,
            first_frame=MAX_HELLO_BYTES,
            read_budget=_RECV_BYTES,
            max_output=MAX_CLIENT_OUTPUT_BYTES,
        )
        now = self.clock()
        client = Client(
            id=next(self.ids), end=end, peer=peer, peer_uid=uid, last_seen=now, host=host
        )
        self.conns[end.fd] = client
        self.by_id[client.id] = client
        log.debug("connection %d opened (%s, uid %s)", client.id, peer, uid)
        self.hellos.add(client.id, now)
        self.schedule_sweep()
        if self.policy.is_stranger(client.peer_uid):
            self.hold_stranger(client)

    def make_room_for(self, uid: int | None) -> Client | None:
        """The connection to close so one of the service's own user (``uid``) gets in: the
        oldest unadmitted one of another (or an unknown) user; None for anyone else."""
        if uid is None or uid != self.policy.service_uid:
            return None
        groups = [group for group in self.strangers.values() if group]
        if groups:
            return next(iter(max(groups, key=len).values()))
        for client in self.conns.values():
            if not client.admitted and client.peer_uid != self.policy.service_uid:
                return client
        return None

    def stranger_group(self, client: Client) -> int | None:
        """The group of ``client`` under the strangers' cap: its uid with a token, else all."""
        return client.peer_uid if self.policy.token is not None else None

    def hold_stranger(self, client: Client) -> None:
        """Keep a few unadmitted connections of another user; close the oldest past that."""
        group = self.strangers.setdefault(self.stranger_group(client), {})
        group[client.id] = client
        if len(group) <= _MAX_STRANGERS_WAITING:
            return
        oldest = next(iter(group.values()))
        refusal = hello_refusal(self.policy, oldest.peer_uid, None)
        if self.policy.token is not None:
            refusal = (
                f"too many connections of uid {oldest.peer_uid} waiting to prove the token"
                f" (at most {_MAX_STRANGERS_WAITING}): this is the oldest"
            )
        assert refusal is not None
        self.write(oldest, Error(code="unauthorized", detail=refusal))
        self.close(oldest, "too many strangers waiting")
        self.warn("strangers", "closed a connection from %s: %s", oldest.peer, refusal)

    def release_stranger(self, client: Client) -> None:
        group_key = self.stranger_group(client)
        group = self.strangers.get(group_key)
        if group is not None and group.pop(client.id, None) is not None and not group:
            del self.strangers[group_key]

    def pause_accepting(self, exc: OSError | None, delay: float, first: bool) -> None:
        """Out of descriptors: stop watching the listeners for a while (the backlog waits)."""
        if not self.accept_paused:
            self.accept_paused = True
            self.host.wake(AcceptResume(), delay)
        if first:
            self.warn(
                "descriptors",
                "cannot accept connections (%s): pausing, retrying after %.2f s and growing"
                " intervals; the %d open connections are still served",
                exc,
                delay,
                len(self.conns),
            )

    def resume_accepting(self) -> None:
        self.accept_paused = False
        for acceptor in list(self.listeners.values()):
            if not self.accept_paused:
                self.accept(acceptor)

    def refuse_full(self, sock: socket.socket, peer: str) -> None:
        """One connection too many: say so in one non-blocking write, and close it."""
        detail = f"too many connections ({self.limits.max_connections})"
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(frame(Error(code="unavailable", detail=detail)))
            # What the peer sent already (its hello), read so the close is not a reset that
            # could overtake the error frame.
            sock.recv(HEADER.size + MAX_HELLO_BYTES)
        sock.close()
        self.warn("full", "refused a connection from %s: %s", peer, detail)

    # Logging what strangers do -------------------------------------------------------------

    def warn(self, kind: str, fmt: str, *args: Any) -> None:
        """A warning about what strangers do, at most one per 10 s per ``kind``."""
        self.note(kind, logging.WARNING, fmt, *args)

    def note(self, kind: str, level: int, fmt: str, *args: Any) -> None:
        """Log at ``level``, at most once per 10 s per ``kind`` (then saying how many were not)."""
        suppressed = self.warnings.setdefault(kind, RateLimit()).allow(self.clock())
        if suppressed is None:
            return
        if suppressed:
            fmt += " (and %d more like it since)"
            args = (*args, suppressed)
        log.log(level, fmt, *args)

    # Deadlines -----------------------------------------------------------------------------

    def schedule_sweep(self) -> None:
        """Have one wakeup pending at the earliest hello deadline, never one per connection."""
        due = self.hellos.next_due()
        if due is not None and self.sweep_due is None:
            self.sweep_due = due
            self.host.wake(HelloSweep(), max(0.0, due - self.clock()) / 1000.0)

    def sweep_hellos(self) -> None:
        self.sweep_due = None
        late = set(self.hellos.expired(self.clock()))
        if late:
            detail = f"no hello within {self.hellos.timeout_ms:.0f} ms of connecting"
            for client in [self.by_id[i] for i in late if i in self.by_id]:
                self.write(client, Error(code="unauthorized", detail=detail))
                self.close(client, detail)
                self.warn("late", "closed a connection from %s: %s", client.peer, detail)
        self.schedule_sweep()

    def sweep_silent(self) -> None:
        """Close the connections silent for more than three keepalive periods."""
        limit = 3 * self.limits.keepalive_ms
        now = self.clock()
        for client in list(self.conns.values()):
            if now - client.last_seen > limit:
                self.close(client, f"silent for more than {limit} ms (keepalive missed)")

    # Input ---------------------------------------------------------------------------------

    def read(self, client: Client) -> None:
        if client.parked:
            # Its proof waits for its turn: read nothing more until it is judged (the data
            # waits in the kernel). A close is noticed when the turn comes.
            return
        got = client.end.read()
        if got.received:
            client.last_seen = self.clock()
        for body in got.bodies:
            if client.closing:
                return
            self.handle_frame(client, body)
        if client.closing or client.parked:
            return
        if got.too_large is not None:
            detail = got.too_large.detail
            if not client.admitted:
                detail = f"{detail} before the hello"
                self.warn("large", "closed a connection from %s: %s", client.peer, detail)
            self.write(client, Error(code="too_large", detail=detail))
            why = "frame too large" if client.admitted else "frame too large before the hello"
            self.close(client, why, flush=True)
        elif got.ended is not None:
            self.close(client, got.ended)

    def handle_frame(self, client: Client, body: bytes) -> None:
        try:
            request = decode_request(body)
        except FrameDecodeError as exc:
            self.write(client, Error(id=exc.request_id, code="bad_frame", detail=exc.detail))
            if not client.admitted:
                self.close(client, "bad frame before hello", flush=True)
            return
        if not client.admitted:
            self.greet(client, request)
        elif isinstance(request, Hello):
            self.welcome(client, request)
        elif isinstance(request, Keepalive):
            self.write(client, Alive(id=request.id))
        else:
            self.host.on_request(client, request)

    def greet(self, client: Client, request: Request) -> None:
        if client.challenge is not None:
            self.prove(client, request)
            return
        if not isinstance(request, Hello):
            detail = "the first request on a connection must be hello"
            admitted = self.policy.token is None and (
                hello_refusal(self.policy, client.peer_uid, None) is None
            )
            code: ErrorCode = "bad_frame" if admitted else "unauthorized"
            self.write(client, Error(id=request.id, code=code, detail=detail))
            self.close(client, "no hello", flush=True)
            return
        refusal = hello_refusal(self.policy, client.peer_uid, request.token, request.nonce)
        if refusal is not None:
            self.refuse(client, request.id, refusal)
            return
        if request.direct is not None:
            client.direct = request.direct
        if self.policy.token is not None:
            # Step two: our nonce; the client's proof decides. Its frame is held to the
            # hello's small limit too.
            client.nonce = request.nonce
            client.challenge = os.urandom(NONCE_BYTES)
            client.end.reader.small_frames = 2
            self.write(client, Challenge(id=request.id, nonce=client.challenge))
            return
        self.admit(client, request.id)

    def refuse(self, client: Client, rid: RequestId | None, refusal: str) -> None:
        self.write(client, Error(id=rid, code="unauthorized", detail=refusal))
        self.close(client, "unauthorized", flush=True)
        self.warn("refused", "refused connection from %s: %s", client.peer, refusal)

    def admit(self, client: Client, rid: RequestId | None, proof: bytes | None = None) -> None:
        client.admitted = True
        self.hellos.discard(client.id)
        self.release_stranger(client)
        if client.direct is not None:
            client.direct = client.direct and self.offers_direct(client)
        self.write(
            client,
            Welcome(
                id=rid,
                server=SERVER_NAME,
                protocol=PROTOCOL_VERSION,
                proof=proof,
                direct=client.direct,
            ),
        )

    def offers_direct(self, client: Client) -> bool:
        """Whether ``client`` (which asked) may have direct channels: the service offers them
        and the peer is a process of this host whose uid is known (``SO_PEERCRED``, or the
        loopback connection's owner)."""
        if not self.limits.direct_channels:
            return False
        if client.peer_uid is None:
            client.peer_uid = peercred.peer_uid(client.end.sock)
        return client.peer_uid is not None

    def welcome(self, client: Client, request: Hello) -> None:
        """A repeated hello: welcomed again, nothing checked again."""
        self.write(client, Welcome(id=request.id, server=SERVER_NAME, protocol=PROTOCOL_VERSION))

    # The token proof -----------------------------------------------------------------------

    def peer_key(self, client: Client) -> Hashable:
        """Who a proof comes from, for ``ProofDelays``: the uid if known, else the host."""
        return ("uid", client.peer_uid) if client.peer_uid is not None else ("host", client.host)

    def prove(self, client: Client, request: Request) -> None:
        """The client's answer to our challenge: checked now, or parked until its turn."""
        if not isinstance(request, Proof):
            detail = f"expected proof after the challenge, got {request.type}"
            self.write(client, Error(id=request.id, code="unauthorized", detail=detail))
            self.close(client, "no proof", flush=True)
            return
        now = self.clock()
        turn = self.delays.slot(self.peer_key(client), now)
        if turn is None:
            self.refuse(client, request.id, "too many wrong token proofs from this peer: wait")
            return
        if turn <= now:
            self.judge(client, request.id, request.proof)
            return
        client.parked = True
        self.hellos.discard(client.id)  # its turn, not the hello deadline, decides now
        heapq.heappush(self.proofs, (turn, client.id, request.proof))
        self.parked_ids[client.id] = request.id
        self.schedule_proofs()

    def judge(self, client: Client, rid: RequestId | None, proof: bytes) -> None:
        assert self.policy.token is not None and client.nonce and client.challenge
        token = self.policy.token
        right = matches(proof, client_proof(token, client.nonce, client.challenge))
        self.delays.checked(self.peer_key(client), right, self.clock())
        if not right:
            self.refuse(client, rid, WRONG_PROOF_REFUSAL)
            return
        self.admit(client, rid, server_proof(token, client.nonce, client.challenge))

    def schedule_proofs(self) -> None:
        """Have a wakeup pending at the earliest parked proof's turn (one more if a new proof
        of another peer comes before the pending one: one peer's wait never delays another)."""
        if self.proofs and (self.proof_due is None or self.proofs[0][0] < self.proof_due):
            self.proof_due = self.proofs[0][0]
            self.host.wake(ProofDue(), max(0.0, self.proof_due - self.clock()) / 1000.0)

    def proofs_due(self) -> None:
        """The ProofDue timer: judge the parked proofs whose turn came."""
        self.proof_due = None
        now = self.clock()
        while self.proofs and self.proofs[0][0] <= now:
            _, conn_id, proof = heapq.heappop(self.proofs)
            client = self.by_id.get(conn_id)
            rid = self.parked_ids.pop(conn_id, None)
            if client is None or client.closing:
                continue
            client.parked = False
            self.judge(client, rid, proof)
            if not client.closing:
                self.read(client)  # what it sent meanwhile
        self.schedule_proofs()

    # Output and closing --------------------------------------------------------------------

    def write(self, client: Client, message: Any) -> None:
        """Queue ``message`` for ``client`` and write what the socket takes now."""
        if client.closing:
            return
        if not client.end.queue(frame(message)):
            self.close(client, "client does not read its replies")
            return
        self.flush(client)

    def flush(self, client: Client) -> None:
        error = client.end.flush()
        if error is not None:
            self.close(client, f"connection error: {error}")
        elif client.end.out:
            self.schedule_flush()

    def schedule_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.host.wake(FlushDue(), _FLUSH_RETRY_S)

    def flush_all(self) -> None:
        """The flush timer: write what is left, on open and on lingering connections."""
        self.flush_scheduled = False
        for client in list(self.conns.values()):
            if client.end.out:
                self.flush(client)
        now = self.clock()
        for fd, (end, give_up) in list(self.lingering.items()):
            end.flush()
            if not end.closed and now >= give_up:
                end.close()
            if end.closed:
                del self.lingering[fd]
        if self.lingering:
            self.schedule_flush()

    def close(self, client: Client, reason: str, *, flush: bool = False) -> None:
        """Close ``client`` (after writing what it has queued, with ``flush``); tell the host."""
        if client.closing:
            return
        client.closing = True
        self.hellos.discard(client.id)
        self.release_stranger(client)
        if client.parked:
            client.parked = False
            self.parked_ids.pop(client.id, None)
            self.delays.abandoned(self.peer_key(client))
        self.conns.pop(client.end.fd, None)
        self.by_id.pop(client.id, None)
        if flush and not client.end.finish(reason):
            self.lingering[client.end.fd] = (client.end, self.clock() + _LINGER_MS)
            self.schedule_flush()
        else:
            client.end.close()
        self.host.on_closed(client, reason)

    def close_all(self, reason: str) -> None:
        for client in list(self.conns.values()):
            self.close(client, reason)
        for end, _ in self.lingering.values():
            end.close()
        self.lingering.clear()
