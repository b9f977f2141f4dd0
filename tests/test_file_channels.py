"""The SessionFile's end of the direct channels: ``ChannelServer`` alone, then inside the actor.

First the server with real sockets in this process, driven the way the actor drives it (a
select, ``on_ready``, ``flush``): Unix stream sockets hand data over synchronously, so once
``sendall`` returned, the bytes are readable on the other end and nothing needs a sleep.
Then a real ``SessionFile`` on ``multiprocTCPBase``, reached the way the gateway reaches it:
``OpenChannel`` for an offer, then frames over the socket; each step blocks on the reply it
expects.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import select
import socket
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from driver import file_settings

from sessionlane.actors.file_channels import (
    MAX_FRAME_BYTES,
    MAX_HELLO_BYTES,
    ChannelCallEvent,
    ChannelClosed,
    ChannelEvent,
    ChannelRef,
    ChannelServer,
)
from sessionlane.actors.paths import lease_route, route_of_lease
from sessionlane.actors.session_file import SessionFile
from sessionlane.messages.channel import (
    CHANNEL_VERSION,
    ChannelReply,
    ChannelWelcome,
    call_frame,
    decode_from_file,
    hello_frame,
    reply_frame,
)
from sessionlane.messages.codec import HEADER, FrameReader
from sessionlane.messages.internal import (
    ChannelOffer,
    FileInit,
    FileStatusAnswer,
    FileStatusQuery,
    IdleNotice,
    OpenChannel,
)
from sessionlane.messages.wire import (
    Acquire,
    Append,
    Appended,
    Granted,
    Queued,
    Release,
    Released,
)
from sessionlane.system.runtime.launch import TcpSystem

PATH = "/sessions/s.jsonl"
TIMEOUT = 10.0


class Peer:
    """The gateway's end of one channel, blocking: send frames, read the next one."""

    def __init__(self, address: str, timeout: float = TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect("\0" + address)
        self.reader = FrameReader(MAX_FRAME_BYTES)
        self.bodies: deque[bytes] = deque()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def call(self, uid: str, request: Any, name: str | None = None) -> None:
        self.send(call_frame(uid, name or uid, "interactive", request))

    def next(self) -> ChannelWelcome | ChannelReply:
        """The next frame from the file; ``EOFError`` if it closed the connection first."""
        while not self.bodies:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("the file closed the channel")
            self.bodies.extend(self.reader.feed(data))
        return decode_from_file(self.bodies.popleft())

    def reply(self) -> ChannelReply:
        frame = self.next()
        assert isinstance(frame, ChannelReply), frame
        return frame

    def closed_by_server(self) -> bool:
        """Whether the file closed the connection with nothing (more) to read."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


# ChannelServer alone ------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[ChannelServer]:
    made = ChannelServer.open(PATH, incarnation=3)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def peers(server: ChannelServer) -> Iterator[list[Peer]]:
    made: list[Peer] = []
    try:
        yield made
    finally:
        for peer in made:
            peer.close()


def pump(server: ChannelServer) -> list[ChannelEvent]:
    """What the actor does with ``WatchMessage``s, until no watched fd is readable."""
    events: list[ChannelEvent] = []
    for _ in range(100):
        ready, _, _ = select.select(server.fds(), [], [], 0)
        if not ready:
            server.flush()
            return events
        events += server.on_ready(ready)
    raise AssertionError("the server never went quiet")


def connect(server: ChannelServer, peers: list[Peer]) -> Peer:
    peer = Peer(server.address)
    peers.append(peer)
    return peer


def welcomed(server: ChannelServer, peers: list[Peer]) -> Peer:
    peer = connect(server, peers)
    peer.send(hello_frame(server.token))
    assert pump(server) == []
    assert peer.next() == ChannelWelcome(path=PATH, incarnation=3)
    return peer


def acquire(lane: str = "a") -> Acquire:
    return Acquire(id=1, lane=lane, path=PATH, purpose="prompt")


def test_the_server_listens_on_an_abstract_name_with_a_fresh_token(server: ChannelServer) -> None:
    other = ChannelServer.open(PATH, incarnation=3)
    try:
        assert server.address.startswith("sessionlane-") and "\0" not in server.address
        assert (other.address, other.token) != (server.address, server.token)
        assert len(server.token) >= 32
        assert server.fds() and server.connections() == 0
    finally:
        other.close()
    with pytest.raises(ConnectionRefusedError):
        Peer(other.address)


def test_a_hello_with_the_token_is_welcomed(server: ChannelServer, peers: list[Peer]) -> None:
    welcomed(server, peers)
    assert server.connections() == 1
    assert len(server.fds()) == 2


def test_a_wrong_token_closes_the_connection_and_reports_nothing(
    server: ChannelServer, peers: list[Peer], caplog: pytest.LogCaptureFixture
) -> None:
    peer = connect(server, peers)
    peer.send(hello_frame("not-" + server.token))
    with caplog.at_level(logging.WARNING, logger="sessionlane.actors.file_channels"):
        assert pump(server) == []
    assert peer.closed_by_server()
    assert server.connections() == 0 and len(server.fds()) == 1
    assert "wrong token" in caplog.text


def test_a_hello_of_another_channel_version_closes_the_connection(
    server: ChannelServer, peers: list[Peer]
) -> None:
    peer = connect(server, peers)
    body = msgpack.packb({"k": "hello", "v": CHANNEL_VERSION + 1, "token": server.token})
    peer.send(HEADER.pack(len(body)) + body)
    assert pump(server) == []
    assert peer.closed_by_server()
    assert server.connections() == 0


def test_connections_that_never_say_hello_cannot_pile_up(
    server: ChannelServer, peers: list[Peer]
) -> None:
    silent = [connect(server, peers) for _ in range(8)]
    pump(server)
    assert len(server.fds()) == 1 + 8
    late = connect(server, peers)
    pump(server)
    assert silent[0].closed_by_server(), "the oldest silent connection made room"
    assert len(server.fds()) == 1 + 8
    late.send(hello_frame(server.token))
    pump(server)
    assert isinstance(late.next(), ChannelWelcome)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_a_connection_from_another_user_is_refused_even_with_the_token(
    server: ChannelServer,
) -> None:
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through its exit status
        try:
            os.setuid(65534)  # nobody
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect("\0" + server.address)
            sock.sendall(hello_frame(server.token))
            try:
                answer = sock.recv(16)
            except ConnectionResetError:
                answer = b""
            os._exit(0 if answer == b"" else 1)  # closed without a welcome
        except BaseException:
            os._exit(2)
    for _ in range(500):
        pump(server)
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            break
        select.select([], [], [], 0.01)  # poll the child: no ordering depends on it
    else:
        os.kill(child, 9)
        os.waitpid(child, 0)
        raise AssertionError("the other user's connection was neither refused nor answered")
    assert os.waitstatus_to_exitcode(status) == 0
    assert server.connections() == 0


def test_a_call_before_the_hello_closes_the_connection(
    server: ChannelServer, peers: list[Peer]
) -> None:
    peer = connect(server, peers)
    peer.call("a", acquire())
    assert pump(server) == []
    assert peer.closed_by_server()
    assert server.connections() == 0


def test_garbage_before_the_hello_closes_quietly_and_after_it_reports_the_close(
    server: ChannelServer, peers: list[Peer]
) -> None:
    early = connect(server, peers)
    early.send(HEADER.pack(3) + b"\xc1\xc1\xc1")
    assert pump(server) == []
    assert early.closed_by_server()

    late = welcomed(server, peers)
    late.call("a", acquire())
    late.send(HEADER.pack(3) + b"\xc1\xc1\xc1")
    events = pump(server)
    assert len(events) == 2
    call, closed = events
    assert isinstance(call, ChannelCallEvent) and call.call.uid == "a"
    assert closed == ChannelClosed(call.conn)
    assert late.closed_by_server()
    assert server.connections() == 0


def test_frames_split_across_reads_are_reassembled(
    server: ChannelServer, peers: list[Peer]
) -> None:
    peer = connect(server, peers)
    hello = hello_frame(server.token)
    for i in range(len(hello)):
        peer.send(hello[i : i + 1])
        assert pump(server) == []
    assert isinstance(peer.next(), ChannelWelcome)
    frame = call_frame("a", "chat", "background", acquire())
    cuts = [0, 2, 7, len(frame) - 1, len(frame)]
    events: list[ChannelEvent] = []
    for start, end in itertools.pairwise(cuts):
        assert events == []
        peer.send(frame[start:end])
        events += pump(server)
    (event,) = events
    assert isinstance(event, ChannelCallEvent)
    assert (event.call.uid, event.call.name, event.call.priority) == ("a", "chat", "background")
    assert event.call.request == acquire()


def test_calls_in_the_same_read_as_the_hello_are_not_held_to_the_hello_limit(
    server: ChannelServer, peers: list[Peer]
) -> None:
    peer = connect(server, peers)
    big = Append(id=2, lane="a", path=PATH, records=[{"pad": "x" * (4 * MAX_HELLO_BYTES)}])
    peer.send(hello_frame(server.token) + call_frame("a", "a", "interactive", big))
    events = pump(server)
    assert isinstance(peer.next(), ChannelWelcome)
    assert [e.call.request for e in events if isinstance(e, ChannelCallEvent)] == [big]


def test_an_oversized_frame_closes_the_connection(server: ChannelServer, peers: list[Peer]) -> None:
    early = connect(server, peers)
    early.send(HEADER.pack(MAX_HELLO_BYTES + 1))
    assert pump(server) == []
    assert early.closed_by_server()

    late = welcomed(server, peers)
    late.send(HEADER.pack(MAX_FRAME_BYTES + 1))
    (closed,) = pump(server)
    assert isinstance(closed, ChannelClosed)
    assert late.closed_by_server()


def test_a_server_that_stopped_accepting_closes_a_hello_without_a_welcome(
    server: ChannelServer, peers: list[Peer]
) -> None:
    server.accepting = lambda: False
    peer = connect(server, peers)
    peer.send(hello_frame(server.token))
    assert pump(server) == []
    assert peer.closed_by_server()
    server.accepting = lambda: True
    welcomed(server, peers)


def test_a_peer_that_closes_after_its_hello_is_reported_once_and_never_reused(
    server: ChannelServer, peers: list[Peer]
) -> None:
    first = welcomed(server, peers)
    first.call("a", acquire())
    (call,) = pump(server)
    assert isinstance(call, ChannelCallEvent)
    first.close()
    assert pump(server) == [ChannelClosed(call.conn)]
    server.send(call.conn, b"dropped")  # gone: dropped silently
    assert server.flush() is False and server.closed_since_last() == []

    second = welcomed(server, peers)
    second.call("a", acquire())
    (again,) = pump(server)
    assert isinstance(again, ChannelCallEvent)
    assert again.conn != call.conn and again.conn.serial > call.conn.serial


def test_flush_keeps_what_a_slow_peer_cannot_take_yet_and_loses_nothing(
    server: ChannelServer, peers: list[Peer]
) -> None:
    peer = welcomed(server, peers)
    peer.call("a", acquire())
    (call,) = pump(server)
    assert isinstance(call, ChannelCallEvent)
    reply = Released(id=1, lease="l" * 100)
    frames = [reply_frame(f"lane-{i}", reply) for i in range(20_000)]
    for frame in frames:
        server.send(call.conn, frame)
    assert server.flush() is True  # several MiB: far more than a socket buffer holds
    peer.sock.setblocking(False)
    received = bytearray()
    left = True
    while left:
        while True:
            try:
                data = peer.sock.recv(1 << 20)
            except BlockingIOError:
                break
            received += data
        left = server.flush()
    peer.sock.setblocking(True)
    expected = b"".join(frames)
    while len(received) < len(expected):
        received += peer.sock.recv(1 << 20)
    assert bytes(received) == expected
    assert server.closed_since_last() == []


def test_a_peer_gone_while_output_is_pending_is_reported_by_closed_since_last(
    server: ChannelServer, peers: list[Peer]
) -> None:
    peer = welcomed(server, peers)
    peer.call("a", acquire())
    (call,) = pump(server)
    assert isinstance(call, ChannelCallEvent)
    peer.close()
    server.send(call.conn, reply_frame("a", Released(id=1, lease="l")))
    server.flush()
    assert server.closed_since_last() == [ChannelClosed(call.conn)]
    assert server.closed_since_last() == []
    assert pump(server) == []  # reported once, by one of the two
    assert server.connections() == 0


def test_close_ends_the_listener_and_every_connection(
    server: ChannelServer, peers: list[Peer]
) -> None:
    peer = welcomed(server, peers)
    server.close()
    assert peer.closed_by_server()
    assert server.fds() == [] and server.connections() == 0
    with pytest.raises(ConnectionRefusedError):
        Peer(server.address)
    server.close()  # idempotent


# A SessionFile actor on multiprocTCPBase ----------------------------------------------------


class FileUnderTest:
    """One SessionFile actor, started as the Registry would start it (the test is its Registry)."""

    def __init__(self, asys: Any, path: Path, **settings: Any) -> None:
        self.asys = asys
        self.path = str(path)
        self.actor = asys.createActor(SessionFile)
        init = FileInit(path=self.path, settings=file_settings(**settings), incarnation=1)
        asys.tell(self.actor, init)
        self.nonces = 0
        self.peers: list[Peer] = []

    def offer(self) -> ChannelOffer:
        self.nonces += 1
        offer = self.asys.ask(self.actor, OpenChannel(path=self.path, nonce=self.nonces), TIMEOUT)
        assert isinstance(offer, ChannelOffer), offer
        assert offer.nonce == self.nonces
        return offer

    def channel(self, offer: ChannelOffer | None = None) -> Peer:
        offer = offer or self.offer()
        assert offer.address is not None, offer.reason
        peer = Peer(offer.address)
        self.peers.append(peer)
        peer.send(hello_frame(offer.token))
        assert peer.next() == ChannelWelcome(path=self.path, incarnation=1)
        return peer

    def status(self) -> Any:
        answer = self.asys.ask(self.actor, FileStatusQuery(query=7), TIMEOUT)
        assert isinstance(answer, FileStatusAnswer) and answer.query == 7, answer
        return answer.status

    def close(self) -> None:
        for peer in self.peers:
            peer.close()


@pytest.fixture
def tcp_file(tcp_system: TcpSystem, root: Path) -> Iterator[FileUnderTest]:
    made = FileUnderTest(tcp_system.asys, root / "s.jsonl")
    try:
        yield made
    finally:
        made.close()


def granted(peer: Peer, uid: str) -> Granted:
    reply = peer.reply()
    assert reply.uid == uid and isinstance(reply.message, Granted), reply
    lease, path = reply.message.lease, reply.message.path
    assert route_of_lease(lease) == lease_route(path), "the lease id names its file's route"
    return reply.message


@pytest.mark.tcp
def test_a_file_offers_a_channel_that_welcomes_the_token_holder(tcp_file: FileUnderTest) -> None:
    offer = tcp_file.offer()
    assert offer.path == offer.canonical == tcp_file.path and offer.incarnation == 1
    assert offer.address is not None and offer.address.startswith("sessionlane-")
    assert tcp_file.offer().address == offer.address  # one listener per file
    tcp_file.channel(offer)


@pytest.mark.tcp
def test_two_channels_contend_for_a_lease_and_the_waiter_is_granted_on_release(
    tcp_file: FileUnderTest,
) -> None:
    a, b = tcp_file.channel(), tcp_file.channel()
    path = tcp_file.path
    a.call("a", Acquire(id=1, lane="a", path=path, purpose="prompt"))
    held = granted(a, "a")
    b.call("b", Acquire(id=1, lane="b", path=path, purpose="prompt"))
    queued = b.reply()
    assert queued.uid == "b" and queued.message == Queued(id=1, position=1)

    a.call("a", Append(id=2, lease=held.lease, fence=held.fence, records=[{"turn": 1}]))
    appended = a.reply()
    assert isinstance(appended.message, Appended) and appended.message.id == 2
    assert json.loads(Path(path).read_text()) == {"turn": 1}  # acknowledged once durable
    a.call("a", Release(id=3, lease=held.lease))
    released = a.reply()
    assert released.message == Released(id=3, lease=held.lease)

    then = granted(b, "b")
    assert then.id == 1 and then.fence > held.fence
    status = tcp_file.status()
    assert status.holder is not None and status.holder.lane == "b"
    assert status.counters["channel_calls"] == 4 and status.counters["channels"] == 2


@pytest.mark.tcp
def test_eight_lanes_appending_at_once_get_durable_acknowledgements(
    tcp_file: FileUnderTest,
) -> None:
    channels = [tcp_file.channel(), tcp_file.channel()]
    lanes = [f"lane-{i}" for i in range(8)]
    rounds = 10
    acks: dict[tuple[str, int], Appended] = {}
    for r in range(rounds):
        for c, channel in enumerate(channels):
            mine = lanes[c::2]
            channel.send(
                b"".join(
                    call_frame(
                        lane,
                        lane,
                        "interactive",
                        Append(id=r, lane=lane, path=tcp_file.path, records=[{"l": lane, "r": r}]),
                    )
                    for lane in mine
                )
            )
        for c, channel in enumerate(channels):
            for _ in lanes[c::2]:
                reply = channel.reply()
                assert isinstance(reply.message, Appended), reply
                acks[(reply.uid, reply.message.id)] = reply.message
    assert len(acks) == rounds * len(lanes)
    data = Path(tcp_file.path).read_bytes()
    for (lane, r), ack in acks.items():
        line = data[ack.offset : data.index(b"\n", ack.offset)]
        assert json.loads(line) == {"l": lane, "r": r}
    assert data.count(b"\n") == len(acks)
    counters = tcp_file.status().counters
    assert counters["appends"] == len(acks)
    assert counters["syncs"] < len(acks)  # group commit: appends that came together share one


@pytest.mark.tcp
def test_a_closed_channel_abandons_its_lanes_and_the_waiter_elsewhere_is_granted(
    tcp_file: FileUnderTest,
) -> None:
    a, b = tcp_file.channel(), tcp_file.channel()
    path = tcp_file.path
    a.call("a", Acquire(id=1, lane="a", path=path, purpose="prompt"))
    held = granted(a, "a")
    b.call("b", Acquire(id=1, lane="b", path=path, purpose="prompt"))
    assert isinstance(b.reply().message, Queued)
    a.close()
    then = granted(b, "b")
    assert then.fence > held.fence
    status = tcp_file.status()
    assert status.holder is not None and status.holder.lane == "b"
    assert status.counters["abandons"] == 1


@pytest.mark.tcp
def test_a_file_with_an_open_channel_stays_and_retires_once_it_closes(
    tcp_system: TcpSystem, root: Path
) -> None:
    f = FileUnderTest(tcp_system.asys, root / "idle.jsonl", idle_ms=100)
    try:
        channel = f.channel()
        for i in range(3):  # channel calls are not what the Registry counted
            channel.call("a", Append(id=i, lane="a", path=f.path, records=[{"i": i}]))
            assert isinstance(channel.reply().message, Appended)
        assert f.asys.listen(0.5) is None  # five idle periods: no IdleNotice with a channel
        channel.close()
        notice = f.asys.listen(TIMEOUT)
        assert notice == IdleNotice(path=f.path, received=1)  # the OpenChannel only
        offer = f.offer()  # a registry message: the Registry would not retire it now
        f.channel(offer)
    finally:
        f.close()


@pytest.mark.tcp
def test_a_retiring_file_refuses_a_channel_until_the_registry_speaks_again(
    tcp_system: TcpSystem, root: Path
) -> None:
    f = FileUnderTest(tcp_system.asys, root / "retiring.jsonl", idle_ms=100)
    try:
        offer = f.offer()
        assert f.asys.listen(TIMEOUT) == IdleNotice(path=f.path, received=1)
        refused = Peer(offer.address or "")
        f.peers.append(refused)
        refused.send(hello_frame(offer.token))
        with pytest.raises(EOFError):
            refused.next()  # closed without a welcome: the gateway asks the Registry again
        assert f.status().path == f.path  # a registry message ...
        f.channel(offer)  # ... and the same listener welcomes again
    finally:
        f.close()


def test_a_base_without_socket_watching_offers_a_carried_channel(
    simple_asys: Any, root: Path
) -> None:
    f = FileUnderTest(simple_asys, root / "s.jsonl")
    offer = f.offer()
    assert offer.address is None and offer.canonical == f.path and offer.code is None
    assert offer.file is not None and offer.token, "frames go to the file's actor instead"


def test_channel_refs_are_values() -> None:
    assert ChannelRef(1) == ChannelRef(1) and len({ChannelRef(1), ChannelRef(1)}) == 1
