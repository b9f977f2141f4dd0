"""Direct channels (``docs/direct-channel.md``): a local client's lease traffic straight to the
file's process, admitted by the gateway through a single-use ticket.

Real services, real sockets: raw frames where the wire is under test (``RawConn``), the
Python client where its routing and fallback are. Where the suite runs as root, a forked child
becomes uid 65534 and tries a ticket it sniffed, and plays an impostor listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from test_gateway import HEADER, Closed, RawConn, records_of
from test_gateway_trust import as_stranger, needs_root
from waiting import eventually, eventually_async

from sessionlane.actors.direct_channels import TICKET_TTL_MS, DirectTickets, direct_request
from sessionlane.actors.file_channels import ChannelServer
from sessionlane.messages.channel import CHANNEL_VERSION, hello_frame
from sessionlane.messages.errors import InvalidRecord, LeaseRevoked, UnknownOutcome
from sessionlane.messages.wire import Acquire, Append, Direct, Error, Release, Status
from sessionlane.system.client import connect, connect_async
from sessionlane.system.runtime.service import Service, embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(120)]

MAX_FRAME = 64 * 1024


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("direct") / "sessions"
    root.mkdir()
    return root


@pytest.fixture(scope="module")
def service(roots: Path) -> Iterator[Service]:
    with embedded_service(
        [str(roots)], log_file=roots.parent / "actors.log", max_frame_bytes=MAX_FRAME
    ) as svc:
        yield svc


@pytest.fixture
def transcript(roots: Path, request: pytest.FixtureRequest) -> Path:
    return roots / f"{request.node.name}.jsonl"


def gateway(service: Service, *, direct: bool | None = True) -> RawConn:
    conn = RawConn(service.address)
    hello: dict[str, Any] = {"type": "hello", "client": "raw-direct"}
    if direct is not None:
        hello["direct"] = direct
    welcome = conn.request(hello)
    assert welcome["type"] == "welcome", welcome
    return conn


def abstract(address: str, timeout: float = 5.0) -> RawConn:
    """A ``RawConn`` on the abstract Unix name ``address`` (a direct offer's)."""
    conn = RawConn.__new__(RawConn)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.settimeout(timeout)
    conn.sock.connect("\0" + address)
    conn.unaddressed = False
    conn.timeout = timeout
    conn.buf = bytearray()
    conn.ids = iter(range(1, 1 << 30))
    return conn


def offer(gw: RawConn, lane: str, path: Path) -> dict[str, Any]:
    reply = gw.request({"type": "direct", "lane": lane, "path": str(path)})
    assert reply["type"] == "direct_offer", reply
    return reply


def direct(gw: RawConn, lane: str, path: Path) -> RawConn:
    """A welcomed direct channel for ``lane`` on ``path``."""
    given = offer(gw, lane, path)
    conn = abstract(given["address"])
    conn.send({"k": "direct", "v": 1, "ticket": given["ticket"]})
    welcome = conn.recv()
    assert (welcome["k"], welcome["path"], welcome["lane"]) == ("welcome", str(path), lane)
    return conn


def refused(conn: RawConn) -> bool:
    """The peer closed ``conn`` without a frame."""
    try:
        frame = conn.recv()
    except (Closed, ConnectionResetError):
        return True
    raise AssertionError(f"expected a close, got {frame}")


# The lease cycle ------------------------------------------------------------------------------


def test_a_lease_cycle_and_a_pipelined_window_go_over_the_direct_channel(
    service: Service, transcript: Path
) -> None:
    with connect(service.address) as sl:
        assert sl.core.direct.offered
        lane = sl.lane("agent")
        with lane.lease(transcript, purpose="write") as lease:
            assert lease is not None
            # The grant came on the direct channel: its writes and release go there too.
            assert (
                sl.core.direct.leases[lease.id] is sl.core.direct.links[(str(transcript), "agent")]
            )
            lease.append({"n": 0})
            results = lease.append_pipelined([{"n": i} for i in range(1, 33)], window=8)
            assert [r.offset for r in results] == sorted(r.offset for r in results)
        assert lease.id not in sl.core.direct.leases
        with lane.lease(transcript, purpose="write") as again:  # the same channel, reused
            assert again is not None and again.fence > lease.fence
            again.append({"n": 33})
        assert len(sl.core.direct.links) == 1
    assert records_of(transcript) == [f'{{"n":{i}}}' for i in range(34)]


def test_a_pipeline_read_in_one_piece_is_written_in_one_write_and_answered_in_order(
    service: Service, transcript: Path
) -> None:
    gw = gateway(service)
    channel = direct(gw, "a", transcript)
    granted = channel.acquire("a", transcript)
    frames, after = [], None
    for n in range(20):
        aid = f"aid-{n:012d}"
        append = {"v": 1, "type": "append", "id": 100 + n, "lease": granted["lease"]}
        append.update(fence=granted["fence"], records=[{"n": n}], aid=aid)
        if after is not None:
            append["after"] = after
        body = msgpack.packb(append, use_bin_type=True)
        frames.append(HEADER.pack(len(body)) + body)
        after = aid
    before = _counters(gw, transcript)
    channel.send_raw(b"".join(frames))  # one read brings them all to the file
    replies = [channel.recv() for _ in frames]
    assert [(r["type"], r["id"]) for r in replies] == [("appended", 100 + n) for n in range(20)]
    assert [r["offset"] for r in replies] == sorted(r["offset"] for r in replies)
    after_counters = _counters(gw, transcript)
    assert after_counters["chained_appends"] - before.get("chained_appends", 0) == 19
    assert after_counters["syncs"] - before["syncs"] == 1
    gw.close()
    assert records_of(transcript) == [f'{{"n":{n}}}' for n in range(20)]


def _counters(gw: RawConn, path: Path) -> dict[str, int]:
    status = gw.request({"type": "status", "path": str(path)})
    (found,) = status["files"]
    return dict(found["counters"])


def test_a_lane_less_append_goes_over_its_lanes_direct_channel_queued_like_a_write_lease(
    service: Service, transcript: Path
) -> None:
    with connect(service.address) as sl, connect(service.address) as other:
        lane = sl.lane("agent", priority="background")
        first = lane.append(transcript, {"n": 0})
        key = (str(transcript), "agent")
        channel = sl.core.direct.links[key]  # the first append opened the channel
        second = lane.append(transcript, {"n": 1}, {"n": 2})
        assert sl.core.direct.links[key] is channel and second.offset > first.offset
        # Queued behind another connection's lease, and written once it is released.
        holder = other.lane("holder")
        with holder.lease(transcript, purpose="write") as lease:
            assert lease is not None
            done: list[Any] = []
            writer = threading.Thread(target=lambda: done.append(lane.append(transcript, {"n": 4})))
            writer.start()
            eventually(lambda: _queued(other, transcript) == 1, "the append queued")
            lease.append({"n": 3})
        writer.join(10)
        assert done and done[0].lines == 1
        # Refused as through the gateway: a record the service refuses, nothing written.
        deep: Any = 1
        for _ in range(150):
            deep = [deep]
        with pytest.raises(InvalidRecord):
            lane.append(transcript, {"deep": deep})
    assert records_of(transcript) == [f'{{"n":{i}}}' for i in range(5)]


def test_a_lane_less_append_on_a_raw_direct_channel_is_answered_as_the_gateway_answers_it(
    service: Service, transcript: Path, roots: Path
) -> None:
    gw = gateway(service)
    channel = direct(gw, "a", transcript)
    deep: Any = 1
    for _ in range(150):
        deep = [deep]

    def lane_append(conn: RawConn, lane: str, path: Path, record: Any) -> dict[str, Any]:
        return conn.request(
            {"type": "append", "lane": lane, "path": str(path), "records": [record]}
        )

    for conn in (channel, gw):  # the same answers either way
        assert lane_append(conn, "a", transcript, {"deep": deep})["code"] == "invalid_record"
        reply = lane_append(conn, "a", transcript, {"ok": 1})
        assert (reply["type"], reply["lines"]) == ("appended", 1)
    # What only a bound channel refuses: another lane's append, or another path's.
    assert lane_append(channel, "b", transcript, {"no": 1})["code"] == "bad_frame"
    other = roots / "other-lane-less.jsonl"
    assert lane_append(channel, "a", other, {"no": 1})["code"] == "bad_frame"
    gw.close()
    assert records_of(transcript) == ['{"ok":1}', '{"ok":1}']
    assert not other.exists()


class _PeerClosed:
    """A direct channel's socket as the kernel has it once the file closed its end: a send
    fails (EPIPE); everything else is the real socket's."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def sendall(self, data: bytes) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_a_lane_less_append_sent_as_the_file_closed_its_channel_goes_again(
    service: Service, transcript: Path
) -> None:
    with connect(service.address) as sl:
        lane = sl.lane("agent")
        lane.append(transcript, {"n": 0})
        key = (str(transcript), "agent")
        first = sl.core.direct.links[key]
        first.transport = _PeerClosed(first.transport)  # closed by the file, not noticed yet
        assert lane.append(transcript, {"n": 1}).lines == 1  # nothing of it left: sent again
        assert first.lost is not None and sl.core.direct.links[key] is not first
        # A write by lease is not sent again: its lease went with the channel.
        with lane.lease(transcript, purpose="write") as lease:
            assert lease is not None
            held = sl.core.direct.leases[lease.id]
            held.transport = _PeerClosed(held.transport)
            with pytest.raises(LeaseRevoked):
                lease.append({"n": "lost"})
    assert records_of(transcript) == ['{"n":0}', '{"n":1}']


def _queued(sl: Any, path: Path) -> int:
    status = sl.status(str(path))
    return sum(len(f.queue) for f in status.files)


@pytest.mark.parametrize("direct_channels", [True, False])
def test_lane_less_appends_answer_the_same_over_either_route(
    service: Service, transcript: Path, direct_channels: bool
) -> None:
    with connect(service.address, direct=direct_channels) as sl:
        lane = sl.lane("agent")
        results = [lane.append(transcript, {"n": n}) for n in range(3)]
        assert [r.lines for r in results] == [1, 1, 1]
        assert [r.offset for r in results] == sorted({r.offset for r in results})
        with pytest.raises(InvalidRecord):
            lane.append(transcript, {"nan": float("nan")})
        assert bool(sl.core.direct.links) == direct_channels
    assert records_of(transcript) == [f'{{"n":{i}}}' for i in range(3)]


def test_a_direct_holder_and_a_gateway_waiter_share_one_fair_queue(
    service: Service, transcript: Path
) -> None:
    with connect(service.address) as sl:
        lease = sl.lane("direct").acquire(transcript, purpose="write")
        assert lease is not None
        waiter = gateway(service, direct=None)
        queued = waiter.request(
            {"type": "acquire", "lane": "w", "path": str(transcript), "purpose": "write"},
            skip_queued=False,
        )
        assert queued["type"] == "queued"
        lease.append({"who": "direct"})
        lease.release()
        granted = waiter.recv()
        assert granted["type"] == "granted" and granted["fence"] > lease.fence
        assert waiter.append(granted, {"who": "gateway"})["type"] == "appended"
        waiter.close()
    assert records_of(transcript) == ['{"who":"direct"}', '{"who":"gateway"}']


# Losses ----------------------------------------------------------------------------------------


def test_a_direct_channel_cut_mid_lease_revokes_that_lease_and_grants_the_next_waiter(
    service: Service, transcript: Path
) -> None:
    with connect(service.address) as sl:
        lease = sl.lane("holder").acquire(transcript, purpose="write")
        assert lease is not None
        lease.append({"acked": 1})
        waiter = gateway(service, direct=None)
        queued = waiter.request(
            {"type": "acquire", "lane": "w", "path": str(transcript), "purpose": "write"},
            skip_queued=False,
        )
        assert queued["type"] == "queued"
        channel = sl.core.direct.links[(str(transcript), "holder")]
        channel.transport.shutdown(socket.SHUT_RDWR)  # the channel breaks, the gateway's not

        granted = waiter.recv()
        assert granted["type"] == "granted" and granted["fence"] > lease.fence
        # The gateway's connection lives on: the client asked it, and the answer says the
        # file's end of the channel is what ended (as a restarted file's would).
        eventually(lambda: lease.revoked == "actor_restart", "the holder's lease revoked")
        with pytest.raises((LeaseRevoked, UnknownOutcome)):
            lease.append({"lost": 1})
        assert sl.connected  # the gateway's connection stays
        assert waiter.append(granted, {"next": 1})["type"] == "appended"
        waiter.close()
    assert records_of(transcript) == ['{"acked":1}', '{"next":1}']


def test_the_gateway_connection_closing_closes_its_direct_channels_and_their_leases(
    service: Service, transcript: Path
) -> None:
    gw = gateway(service)
    channel = direct(gw, "holder", transcript)
    granted = channel.acquire("holder", transcript)
    assert granted["type"] == "granted"
    waiter = gateway(service, direct=None)
    assert (
        waiter.request(
            {"type": "acquire", "lane": "w", "path": str(transcript), "purpose": "write"},
            skip_queued=False,
        )["type"]
        == "queued"
    )

    gw.close()  # the client is gone: the file drops the channel bound to its lane

    assert refused(channel)
    assert waiter.recv()["type"] == "granted"
    waiter.close()


# Tickets -------------------------------------------------------------------------------------


def test_an_old_client_is_offered_nothing_and_cannot_ask(
    service: Service, transcript: Path
) -> None:
    old = RawConn(service.address)
    welcome = old.request({"type": "hello", "client": "old"})
    assert welcome["type"] == "welcome" and "direct" not in welcome
    reply = old.request({"type": "direct", "lane": "a", "path": str(transcript)})
    assert (reply["type"], reply["code"]) == ("error", "unavailable")
    old.close()


def test_a_forged_or_replayed_ticket_is_refused_with_a_close(
    service: Service, transcript: Path
) -> None:
    gw = gateway(service)
    given = offer(gw, "a", transcript)
    forged = abstract(given["address"])
    forged.send({"k": "direct", "v": 1, "ticket": given["ticket"][:-2] + "xx"})
    assert refused(forged)
    # A forged attempt does not burn the real ticket; the first use does.
    first = abstract(given["address"])
    first.send({"k": "direct", "v": 1, "ticket": given["ticket"]})
    assert first.recv()["k"] == "welcome"
    replay = abstract(given["address"])
    replay.send({"k": "direct", "v": 1, "ticket": given["ticket"]})
    assert refused(replay)
    # Nor can a ticket holder pose as the gateway: its calls name any lane.
    posing = abstract(given["address"])
    posing.send({"k": "hello", "v": 2, "token": given["ticket"]})
    assert refused(posing)
    first.close()
    gw.close()


def test_tickets_expire_are_single_use_and_bound_to_the_admitted_uid() -> None:
    tickets = DirectTickets()
    request = Direct(lane="a", path="/r/a.jsonl", peer_uid=1000, max_frame_bytes=MAX_FRAME)
    one = tickets.mint("c1.x/a", request, "/r/a.jsonl", now=0.0)
    two = tickets.mint("c1.x/a", request, "/r/a.jsonl", now=0.0)
    three = tickets.mint("c2.y/a", request, "/r/a.jsonl", now=0.0)
    assert isinstance(tickets.redeem(one, 1000, now=TICKET_TTL_MS - 1), object)
    assert tickets.redeem(one, 1000, now=1.0) == "unknown, used or expired ticket"
    assert tickets.redeem(two, 1000, now=TICKET_TTL_MS) == "expired ticket"
    assert "shown by uid 1001" in str(tickets.redeem(three, 1001, now=1.0))
    assert tickets.redeem(three, 1000, now=1.0) == "unknown, used or expired ticket"
    four = tickets.mint("c3.z/a", request, "/r/a.jsonl", now=0.0)
    tickets.drop_for("c3.z/a")
    assert tickets.redeem(four, 1000, now=1.0) == "unknown, used or expired ticket"


@needs_root
def test_another_user_cannot_use_a_sniffed_ticket(service: Service, transcript: Path) -> None:
    gw = gateway(service)
    given = offer(gw, "a", transcript)

    def attack() -> dict[str, Any]:
        conn = abstract(given["address"])
        conn.send({"k": "direct", "v": 1, "ticket": given["ticket"]})
        try:
            return {"got": conn.recv()}
        except (Closed, ConnectionResetError):
            return {"closed": True}

    assert as_stranger(attack) == {"closed": True}
    # It was used up by the attempt: the owner asks for another.
    again = abstract(given["address"])
    again.send({"k": "direct", "v": 1, "ticket": given["ticket"]})
    assert refused(again)
    assert direct(gw, "a", transcript).acquire("a", transcript)["type"] == "granted"
    gw.close()


@needs_root
def test_the_client_refuses_an_impostor_listener_and_falls_back_to_the_gateway(
    service: Service, transcript: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"sessionlane-impostor-{os.getpid()}"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the impostor, as another user: it reports whatever it is sent
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind("\0" + name)
            listener.listen(1)
            os.write(write_end, b"L")
            peer, _ = listener.accept()
            peer.settimeout(5)
            os.write(write_end, peer.recv(4096) or b"-")
        finally:
            os._exit(0)
    os.close(write_end)
    assert os.read(read_end, 1) == b"L"
    from sessionlane.system.client import _sync

    real = _sync.SessionLane._exchange

    def swapped(self: Any, link: Any, call: Any) -> Any:
        reply = real(self, link, call)
        if reply.type == "direct_offer":  # as if the name had been taken by the impostor
            reply = reply.model_copy(update={"address": name})
        return reply

    monkeypatch.setattr(_sync.SessionLane, "_exchange", swapped)
    try:
        with connect(service.address) as sl:
            with sl.lane("a").lease(transcript, purpose="write") as lease:
                assert lease is not None
                lease.append({"via": "gateway"})
            assert sl.core.direct.links == {}
            assert (str(transcript), "a") in sl.core.direct.refused
        assert os.read(read_end, 4096) == b"-"  # it got the connection, never the ticket
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert records_of(transcript) == ['{"via":"gateway"}']


# What the file takes on a direct channel -----------------------------------------------------


def test_bad_frames_on_a_direct_channel_get_a_clear_error_and_change_nothing(
    service: Service, transcript: Path, roots: Path
) -> None:
    gw = gateway(service)
    channel = direct(gw, "a", transcript)
    granted = channel.acquire("a", transcript)
    assert granted["type"] == "granted"

    channel.send_raw(HEADER.pack(3) + b"\xc1\xc1\xc1")
    assert channel.recv()["code"] == "bad_frame"
    reply = channel.request({"type": "release", "lease": granted["lease"], "extra": 1})
    assert (reply["code"], "extra" in reply["detail"]) == ("bad_frame", True)
    assert channel.request({"type": "status"})["code"] == "bad_frame"
    other = roots / "other.jsonl"
    assert channel.acquire("a", other)["code"] == "bad_frame"
    assert channel.acquire("b", transcript)["code"] == "bad_frame"
    deep: Any = 1
    for _ in range(150):
        deep = [deep]
    assert channel.append(granted, {"deep": deep})["code"] == "invalid_record"
    assert channel.append(granted, {"ok": 1})["type"] == "appended"
    # Another connection's lease is not this channel's to write or release.
    stranger = gateway(service, direct=None)
    theirs = stranger.acquire("s", other)
    assert channel.append(theirs, {"no": 1})["code"] in ("stale_fence", "not_holder")
    assert channel.release(theirs)["code"] == "not_holder"
    stranger.close()
    # Over the service's max_frame_bytes: too_large, then the channel closes.
    channel.send_raw(HEADER.pack(MAX_FRAME + 1))
    assert channel.recv()["code"] == "too_large"
    assert refused(channel)
    gw.close()
    assert records_of(transcript) == ['{"ok":1}']
    assert not other.exists() or records_of(other) == []


def test_what_a_bound_channel_turns_each_request_into() -> None:
    tickets = DirectTickets()
    ask = Direct(lane="a", path="p.jsonl", peer_uid=1, max_frame_bytes=MAX_FRAME)
    binding = tickets.redeem(tickets.mint("c1.x/a", ask, "/r/p.jsonl", 0.0, "background"), 1, 0.0)
    assert not isinstance(binding, str)
    call = direct_request(binding, Acquire(id=1, lane="a", path="/r/p.jsonl", purpose="write"))
    assert not isinstance(call, Error)
    assert (call.uid, call.name, call.priority) == ("c1.x/a#d1", "a", "interactive")
    recovery = direct_request(binding, Acquire(lane="a", path="p.jsonl", purpose="recovery"))
    assert not isinstance(recovery, Error) and recovery.priority == "recovery"
    assert not isinstance(direct_request(binding, Release(lease="l")), Error)
    # A lane-less append queues with the gateway lane's priority, as through the gateway.
    lane_append = direct_request(binding, Append(id=2, lane="a", path="p.jsonl", records=[{}]))
    assert not isinstance(lane_append, Error)
    assert (lane_append.uid, lane_append.priority) == ("c1.x/a#d1", "background")
    for other in (
        Append(id=4, lane="b", path="p.jsonl", records=[{}]),
        Append(id=5, lane="a", path="/r/q.jsonl", records=[{}]),
    ):
        refusal = direct_request(binding, other)
        assert isinstance(refusal, Error) and (refusal.id, refusal.code) == (other.id, "bad_frame")
    assert isinstance(direct_request(binding, Status(id=3)), Error)


def test_a_service_with_direct_channels_off_offers_none(tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    with embedded_service(
        [str(root)], log_file=tmp_path / "actors.log", direct_channels=False
    ) as svc:
        raw = RawConn(svc.address)
        assert raw.request({"type": "hello", "client": "x", "direct": True})["direct"] is False
        raw.close()
        with connect(svc.address) as sl:
            assert not sl.core.direct.offered
            with sl.lane("a").lease(root / "a.jsonl", purpose="write") as lease:
                assert lease is not None
                lease.append({"via": "gateway"})
            assert sl.core.direct.links == {}


# The asyncio client -----------------------------------------------------------------------------


def test_the_asyncio_client_takes_the_same_direct_channel_and_loses_it_the_same_way(
    service: Service, transcript: Path
) -> None:
    async def run() -> None:
        async with connect_async(service.address) as sl:
            lane = sl.lane("agent")
            async with lane.lease(transcript, purpose="write") as lease:
                assert lease is not None
                key = (str(transcript), "agent")
                assert sl.core.direct.leases[lease.id] is sl.core.direct.links[key]
                await lease.append({"n": 0})
                results = await lease.append_pipelined([{"n": i} for i in range(1, 9)], window=4)
                assert len(results) == 8
            held = await lane.acquire(transcript, purpose="write")
            assert held is not None
            waiter = gateway(service, direct=None)
            assert (
                waiter.request(
                    {"type": "acquire", "lane": "w", "path": str(transcript), "purpose": "write"},
                    skip_queued=False,
                )["type"]
                == "queued"
            )
            sl.core.direct.links[key].transport.writer.transport.abort()  # the channel breaks

            granted = await asyncio.to_thread(waiter.recv)
            assert granted["type"] == "granted" and granted["fence"] > held.fence

            async def revoked() -> bool:
                return held.revoked == "actor_restart"  # the gateway answered the probe

            await eventually_async(revoked, "the holder's lease revoked")
            with pytest.raises((LeaseRevoked, UnknownOutcome)):
                await held.append({"lost": 1})
            assert sl.connected
            waiter.close()

    asyncio.run(run())
    assert records_of(transcript) == [f'{{"n":{i}}}' for i in range(9)]


@needs_root
def test_a_stranger_on_a_files_listener_neither_poses_as_the_gateway_nor_crowds_it_out() -> None:
    server = ChannelServer.open("/sessions/s.jsonl", incarnation=1)
    stop = threading.Event()
    events: list[Any] = []

    def serve() -> None:  # the actor's loop, in a thread: nobody else touches the server
        while not stop.is_set():
            ready, _, _ = select.select(server.fds(), [], [], 0.02)
            if ready:
                events.extend(server.on_ready(ready))
                server.flush()

    own = abstract(server.address)  # the service's own user, its hello not read yet
    thread = threading.Thread(target=serve)
    thread.start()
    try:

        def attack() -> dict[str, Any]:
            crowd = [abstract(server.address) for _ in range(12)]  # more than the cap
            posing = abstract(server.address)
            posing.send_raw(hello_frame(server.token))  # even with the right token
            try:
                return {"got": posing.recv(), "crowd": len(crowd)}
            except (Closed, ConnectionResetError):
                return {"closed": True}

        assert as_stranger(attack) == {"closed": True}
        own.send_raw(hello_frame(server.token))
        assert own.recv() == {
            "k": "welcome",
            "v": CHANNEL_VERSION,
            "path": "/sessions/s.jsonl",
            "inc": 1,
        }
    finally:
        stop.set()
        thread.join()
        own.close()
        server.close()
    assert events == []


def test_a_client_connects_to_an_older_service_that_refuses_the_hellos_direct_field() -> None:
    """An older gateway refuses an unknown hello field as ``bad_frame`` and closes: the client
    says hello again without it (this stand-in answers as ``main`` before this change did)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    hellos: list[dict[str, Any]] = []

    def serve() -> None:
        for _ in range(2):
            sock, _ = listener.accept()
            conn = RawConn.__new__(RawConn)
            conn.sock, conn.buf, conn.timeout = sock, bytearray(), 5.0
            hello = conn.recv()
            hellos.append(hello)
            if "direct" in hello:
                detail = "hello.direct: Extra inputs are not permitted"
                conn.send({"v": 1, "type": "error", "id": 1, "code": "bad_frame", "detail": detail})
                sock.close()
                continue
            welcome = {"v": 1, "type": "welcome", "id": hello["id"], "server": "old", "protocol": 1}
            conn.send(welcome)
            with contextlib.suppress(Closed, OSError):
                conn.recv()  # until the client closes
            sock.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        port = listener.getsockname()[1]
        with connect(f"tcp://127.0.0.1:{port}") as sl:
            assert sl.server == "old" and not sl.core.direct.offered
    finally:
        thread.join(10)
        listener.close()
    assert [("direct" in hello) for hello in hellos] == [True, False]


def test_an_idle_file_closes_the_direct_channel_and_the_next_acquire_opens_another(
    tmp_path: Path,
) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    path = root / "idle.jsonl"
    with (
        embedded_service([str(root)], log_file=tmp_path / "actors.log", idle_ms=300) as svc,
        connect(svc.address) as sl,
    ):
        lane = sl.lane("a")
        with lane.lease(path, purpose="write") as lease:
            assert lease is not None
            lease.append({"turn": 1})
        first = sl.core.direct.links[(str(path), "a")]
        eventually(lambda: first.lost is not None, "the idle file to close the channel")
        assert lease.revoked is None  # released before: nothing was lost with it
        with lane.lease(path, purpose="write") as again:
            assert again is not None
            again.append({"turn": 2})
            second = sl.core.direct.links[(str(path), "a")]
            assert second is not first and sl.core.direct.leases[again.id] is second
    assert records_of(path) == ['{"turn":1}', '{"turn":2}']
