"""The links to SessionFiles (``sessionlane.actors.links``), against a fake file
on a real socket.

The "file" here is a real abstract Unix socket the test accepts and speaks the channel frames
on; the Registry and the lanes are recorded by a fake host; time is a fake clock. So every
interleaving below is chosen by the test, never by timing.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path
from typing import Any

import pytest

from sessionlane.actors import links as links_module
from sessionlane.actors.carried import split_frames
from sessionlane.actors.lane_state import ChannelLost
from sessionlane.actors.links import Links
from sessionlane.actors.paths import lease_route
from sessionlane.messages.carried import CarriedCalls, CarriedReplies
from sessionlane.messages.channel import (
    ChannelCall,
    ChannelHello,
    decode_from_gateway,
    reply_frame,
    welcome_frame,
)
from sessionlane.messages.codec import FrameReader
from sessionlane.messages.internal import (
    ChannelOffer,
    FileReply,
    FileRestarted,
    LaneCall,
    LaneRef,
    OpenChannel,
)
from sessionlane.messages.wire import (
    Abandon,
    Abandoned,
    Acquire,
    Append,
    Appended,
    Direct,
    DirectOffer,
    Error,
    Granted,
    ReclaimTicket,
    Release,
    Released,
    Revoked,
)


class FakeHost:
    registry = "registry"

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.delivered: list[FileReply] = []
        self.restarts: list[FileRestarted] = []
        self.restart_holders: list[tuple[str, str] | None] = []
        self.losses: list[ChannelLost] = []
        self.busy: set[str] = set()
        self.to_files: list[tuple[Any, Any]] = []
        self.reclaims_on_restart: list[LaneCall] = []
        self.links: Any = None

    def send(self, target: Any, message: Any) -> None:
        if target == "registry":
            self.sent.append(message)
        else:
            self.to_files.append((target, message))

    def deliver(self, reply: FileReply) -> None:
        self.delivered.append(reply)

    def restarted(self, msg: FileRestarted, holder: tuple[str, str] | None) -> None:
        self.restarts.append(msg)
        self.restart_holders.append(holder)
        for call in self.reclaims_on_restart:
            self.links.call(call)

    def channel_lost(self, msg: ChannelLost) -> None:
        self.losses.append(msg)

    def in_use(self, path: str) -> bool:
        return path in self.busy

    def opens(self) -> list[OpenChannel]:
        return [m for m in self.sent if isinstance(m, OpenChannel)]


class FakeFile:
    """A listening abstract socket that plays a SessionFile's side of one channel."""

    def __init__(self) -> None:
        self.address = "sessionlane-test-" + secrets.token_hex(6)
        self.token = secrets.token_hex(8)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind("\0" + self.address)
        self.listener.listen(8)
        self.conn: socket.socket | None = None
        self.reader = FrameReader(1 << 20)
        self.frames: list[Any] = []

    def offer(self, nonce: int, path: str, canonical: str, incarnation: int = 1) -> ChannelOffer:
        return ChannelOffer(
            path=path,
            nonce=nonce,
            canonical=canonical,
            address=self.address,
            token=self.token,
            incarnation=incarnation,
        )

    def accept(self) -> None:
        self.listener.settimeout(5)
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(5)
        self.reader = FrameReader(1 << 20)  # a new connection: nothing read from the last one
        self.frames = []

    def read(self, count: int) -> list[Any]:
        assert self.conn is not None
        while len(self.frames) < count:
            data = self.conn.recv(65536)
            assert data, "the gateway closed the channel"
            self.frames += [decode_from_gateway(b) for b in self.reader.feed(data)]
        taken, self.frames = self.frames[:count], self.frames[count:]
        return taken

    def send(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.sendall(data)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def transcript(tmp_path: Path) -> str:
    path = tmp_path / "s.jsonl"
    path.write_text("")
    return str(path)


@pytest.fixture
def fake_file() -> Any:
    file = FakeFile()
    yield file
    file.close()


def lane(uid: str = "a#1") -> LaneRef:
    return LaneRef(uid=uid, name=uid.split("#")[0], address="gateway")


def acquire(path: str, rid: int, uid: str = "a#1") -> LaneCall:
    req = Acquire(id=rid, lane=uid.split("#")[0], path=path, purpose="prompt")
    return LaneCall(lane=lane(uid), path=path, canonical=False, request=req)


def pump(links: Links) -> None:
    """Deliver what is readable on the links' sockets (what the gateway's select loop does)."""
    for fd in list(links.fds()):
        links.on_ready(fd)


def make(tmp_path: Path, clock: Clock | None = None) -> tuple[Links, FakeHost]:
    host = FakeHost()
    links = Links(host, idle_ms=500, clock=clock or Clock())
    host.links = links
    return links, host


def open_channel(
    links: Links, host: FakeHost, file: FakeFile, transcript: str, incarnation: int = 1
) -> None:
    ask = host.opens()[-1]
    links.on_offer(file.offer(ask.nonce, ask.path, transcript, incarnation))
    links.flush()
    file.accept()
    (hello,) = file.read(1)
    assert isinstance(hello, ChannelHello) and hello.token == file.token
    file.send(welcome_frame(transcript, incarnation))
    wait_readable(links)
    pump(links)


def delivered(links: Links, host: FakeHost, count: int) -> None:
    """Pump the channels until ``count`` replies were delivered to the lanes."""
    while len(host.delivered) < count:
        wait_readable(links)
        pump(links)


def wait_readable(links: Links) -> None:
    import select

    readable, _, _ = select.select(links.fds(), [], [], 5)
    assert readable, "nothing arrived on the channel"


def test_calls_queue_while_the_channel_opens_then_go_over_it_in_order(
    tmp_path: Path, transcript: str, fake_file: FakeFile
) -> None:
    links, host = make(tmp_path)
    links.call(acquire(transcript, 1))
    links.call(acquire(transcript, 2, uid="b#1"))
    assert len(host.opens()) == 1, "one OpenChannel per path, not per call"
    assert not [m for m in host.sent if isinstance(m, LaneCall)], "nothing goes the slow way"
    open_channel(links, host, fake_file, transcript)
    links.call(acquire(transcript, 3))
    links.flush()
    calls = fake_file.read(3)
    assert [(c.uid, c.request.id) for c in calls] == [("a#1", 1), ("b#1", 2), ("a#1", 3)]
    assert all(isinstance(c, ChannelCall) for c in calls)

    lease = f"{lease_route(transcript)}-1"
    fake_file.send(reply_frame("b#1", Error(id=2, code="queue_full", detail="x")))
    fake_file.send(
        reply_frame("a#1", Granted(id=1, lease=lease, fence=1, path=transcript, purpose="prompt"))
    )
    wait_readable(links)
    pump(links)
    while len(host.delivered) < 2:
        wait_readable(links)
        pump(links)
    first, second = host.delivered
    assert (first.lane, first.message.id, first.path) == ("b#1", 2, transcript)
    assert (second.lane, second.message.lease) == ("a#1", lease)
    assert links.route_of(lease) == transcript, "the lease id routes to its file"
    assert links.route_of("0123456789abcdef-1") is None, "a route no file here has"


def test_a_channel_that_breaks_is_one_loss_however_many_times_the_death_is_reported(
    tmp_path: Path, transcript: str, fake_file: FakeFile
) -> None:
    links, host = make(tmp_path)
    links.call(acquire(transcript, 1))
    open_channel(links, host, fake_file, transcript, incarnation=3)
    links.flush()
    fake_file.read(1)
    lease = f"{lease_route(transcript)}-4"
    granted = Granted(id=1, lease=lease, fence=4, path=transcript, purpose="prompt")
    fake_file.send(reply_frame("a#1", granted))
    while not host.delivered:
        wait_readable(links)
        pump(links)
    assert fake_file.conn is not None
    fake_file.conn.close()
    fake_file.conn = None
    wait_readable(links)
    pump(links)
    assert [(r.path, r.incarnation) for r in host.losses] == [(transcript, 3)]
    assert host.losses[0].holder == ("a#1", lease), "the loss names the lease it took"
    assert host.restarts == [], "a lost channel is its own event, not a restart"
    asked = len(host.opens())
    assert asked == 2, "the link asks the registry again at once"

    # The Registry's report of the same death comes later: the lanes are not told twice.
    links.on_restarted(FileRestarted(path=transcript, incarnation=3))
    assert len(host.losses) == 1 and host.restarts == []
    assert len(host.opens()) == asked + 1, "the request may have gone to the dead actor"


def test_a_connection_refused_before_the_welcome_loses_nothing_and_is_retried(
    tmp_path: Path, transcript: str, fake_file: FakeFile
) -> None:
    clock = Clock()
    links, host = make(tmp_path, clock)
    links.call(acquire(transcript, 1))
    ask = host.opens()[-1]
    links.on_offer(fake_file.offer(ask.nonce, ask.path, transcript))
    links.flush()
    fake_file.accept()
    hello, early = fake_file.read(2)
    assert isinstance(hello, ChannelHello) and early.request.id == 1, "the acquire went early"
    assert fake_file.conn is not None
    fake_file.conn.close()  # a retiring file refuses: no welcome, nothing after it was read
    fake_file.conn = None
    wait_readable(links)
    pump(links)
    assert host.restarts == [] and host.losses == [], "nothing was served, nothing is lost"
    assert len(host.opens()) == 1
    clock.now += 25
    links.tick()
    assert len(host.opens()) == 2, "asked again after the retry delay"
    assert host.opens()[0].ahead and not host.opens()[-1].ahead, "the file's own answer"
    open_channel(links, host, fake_file, transcript)
    links.flush()
    (call,) = fake_file.read(1)
    assert call.request.id == 1, "the queued call went out once the channel opened"


def test_acquires_go_with_the_hello_and_the_rest_waits_for_the_welcome_in_order(
    tmp_path: Path, transcript: str, fake_file: FakeFile
) -> None:
    links, host = make(tmp_path)
    lease = f"{lease_route(transcript)}-1"
    links.call(acquire(transcript, 1))
    ask = host.opens()[-1]
    links.call(acquire(transcript, 2, uid="b#1"))
    release = Release(id=3, lease=lease)
    links.call(LaneCall(lane=lane("c#1"), path=transcript, canonical=False, request=release))
    links.call(acquire(transcript, 4, uid="d#1"))  # behind the release: it keeps its place
    links.on_offer(fake_file.offer(ask.nonce, ask.path, transcript))
    links.flush()
    fake_file.accept()
    hello, first, second = fake_file.read(3)
    assert isinstance(hello, ChannelHello)
    assert [first.request.id, second.request.id] == [1, 2], "the acquires waited in the backlog"
    assert fake_file.conn is not None
    fake_file.conn.setblocking(False)
    with pytest.raises(BlockingIOError):
        fake_file.conn.recv(1)  # the release has not gone: it waits for the welcome
    fake_file.conn.setblocking(True)
    fake_file.send(welcome_frame(transcript, 1))
    wait_readable(links)
    pump(links)
    links.flush()
    then = fake_file.read(2)
    assert [c.request.id for c in then] == [3, 4], "the rest after the welcome, in order"


def test_an_offer_naming_no_channel_answers_the_waiting_calls_and_routes_nothing_elsewhere(
    tmp_path: Path, transcript: str
) -> None:
    links, host = make(tmp_path)
    links.call(acquire(transcript, 1))
    links.call(acquire(transcript, 2))
    ask = host.opens()[-1]
    links.on_offer(ChannelOffer(path=ask.path, nonce=ask.nonce, canonical=transcript))
    errors = [r.message for r in host.delivered]
    assert [(e.id, e.code) for e in errors] == [(1, "unavailable"), (2, "unavailable")]
    assert not any(isinstance(m, LaneCall) for m in host.sent), "no call through the registry"
    links.call(acquire(transcript, 3))
    assert len(host.opens()) == 2, "the next call asks again"


def test_a_path_the_registry_refuses_is_answered_from_the_refusal_and_asked_again_next_time(
    tmp_path: Path,
) -> None:
    links, host = make(tmp_path)
    links.call(acquire("/etc/passwd.jsonl", 1))
    assert [type(m) for m in host.sent] == [OpenChannel], "the gateway resolves nothing itself"
    ask = host.opens()[-1]
    refusal = ChannelOffer(
        path=ask.path, nonce=ask.nonce, reason="outside the roots", code="path_not_allowed"
    )
    links.on_offer(refusal)
    (answer,) = host.delivered
    assert isinstance(answer.message, Error) and answer.message.code == "path_not_allowed"
    assert (answer.message.id, answer.message.detail) == (1, "outside the roots")
    links.call(acquire("/etc/passwd.jsonl", 2))
    assert [type(m) for m in host.sent] == [OpenChannel, OpenChannel], "no route but the offer"
    assert not any(isinstance(m, LaneCall) for m in host.sent)
    assert links.links == {}, "no canonical path: no link by one"


def test_an_abandon_on_a_path_without_a_link_is_answered_at_once_and_opens_nothing(
    tmp_path: Path, transcript: str
) -> None:
    links, host = make(tmp_path)
    ref = LaneRef(uid="a#1", name="a", address="gateway", priority="interactive")
    abandon = Abandon(id=7, lane="a", path=transcript)
    links.call(LaneCall(lane=ref, path=transcript, canonical=False, request=abandon))
    assert host.sent == [], "no channel is opened and no file started to abandon nothing"
    (answer,) = host.delivered
    assert answer.message == Abandoned(id=7, leases=[])


def test_two_spellings_of_one_file_share_the_link_the_registrys_answer_names(
    tmp_path: Path, transcript: str, fake_file: FakeFile
) -> None:
    links, host = make(tmp_path)
    other = str(tmp_path / "." / "s.jsonl")
    links.call(acquire(transcript, 1))
    open_channel(links, host, fake_file, transcript)
    links.flush()
    assert [c.request.id for c in fake_file.read(1)] == [1]
    links.call(acquire(other, 2, uid="b#1"))
    links.call(acquire(transcript, 3, uid="b#1"))
    ask = host.opens()[-1]
    assert ask.path == other, "an unknown spelling is asked about"
    links.on_offer(fake_file.offer(ask.nonce, ask.path, transcript))
    links.flush()
    assert [c.request.id for c in fake_file.read(2)] == [2, 3], "in order, on the one channel"
    assert list(links.links) == [transcript] and len(links.fds()) == 1


def test_an_idle_channel_is_closed_only_when_no_lane_uses_the_path(
    tmp_path: Path, transcript: str, fake_file: FakeFile
) -> None:
    clock = Clock()
    links, host = make(tmp_path, clock)
    links.call(acquire(transcript, 1))
    open_channel(links, host, fake_file, transcript)
    links.flush()
    fake_file.read(1)
    host.busy.add(transcript)  # a lane holds a lease there
    clock.now += 10_000
    links.tick()
    assert transcript in links.links
    due = links.next_due()
    assert due is not None and due > clock.now, "a link in use is looked at again later, not now"
    host.busy.clear()
    clock.now += 10_000
    links.tick()
    assert transcript not in links.links
    assert fake_file.conn is not None and fake_file.conn.recv(10) == b"", "channel closed"
    assert host.restarts == [], "closing an idle channel is not a restart"

    release = Release(id=9, lease="L-1")
    links.call(LaneCall(lane=lane(), path=transcript, canonical=True, request=release))
    assert len(host.opens()) == 2, "the next call opens a new channel"


def test_a_stale_offer_is_ignored(tmp_path: Path, transcript: str, fake_file: FakeFile) -> None:
    clock = Clock()
    links, host = make(tmp_path, clock)
    links.call(acquire(transcript, 1))
    first = host.opens()[-1]
    clock.now += 5_000
    links.tick()  # no offer in time: asked again
    second = host.opens()[-1]
    assert second.nonce != first.nonce
    links.on_offer(fake_file.offer(first.nonce, first.path, transcript))
    assert links.fds() == [], "the answer to the abandoned request is not used"
    open_channel(links, host, fake_file, transcript)
    assert links.fds() != []


def test_the_links_follow_the_one_lease_held_per_file_and_hand_it_over_when_the_file_is_lost(
    tmp_path: Path, transcript: str
) -> None:
    links, host = make(tmp_path)
    lease = f"{lease_route(transcript)}-1"

    def reply(message: Any, lane: str = "a#1") -> None:
        links.leases.observe(FileReply(path=transcript, message=message, lane=lane))

    granted = Granted(id=1, lease=lease, fence=1, path=transcript, purpose="prompt")
    reply(granted)
    reply(granted.model_copy(update={"id": 2}))  # reentrant: one more level
    assert links.route_of(lease) == transcript
    reply(Released(id=3, lease=lease), lane="c1.x/")
    assert links.leases.grants[transcript].lease == lease, "one level is still held"
    reply(Released(id=4, lease=lease), lane="c1.x/")
    assert transcript not in links.leases.grants

    for ending in (
        Revoked(lease=lease, path=transcript, reason="max_hold"),
        Abandoned(id=5, leases=[lease]),
    ):
        reply(granted)
        reply(ending)
        assert transcript not in links.leases.grants, ending

    reply(granted)
    second = f"{lease_route(transcript)}-2"
    reply(Granted(id=6, lease=second, fence=2, path=transcript, purpose="prompt"), lane="b#1")
    assert links.leases.grants[transcript].lane == "b#1", "one holder per path: the newer grant"
    links.on_restarted(FileRestarted(path=transcript, incarnation=1))
    assert host.restart_holders == [("b#1", second)], "the lost lease goes to its lane"
    assert transcript not in links.leases.grants


def test_an_append_that_released_its_lease_counts_as_its_release_for_its_lane_only(
    tmp_path: Path, transcript: str
) -> None:
    links, _ = make(tmp_path)
    lease, nxt = f"{lease_route(transcript)}-1", f"{lease_route(transcript)}-2"

    def reply(message: Any, lane: str) -> None:
        links.leases.observe(FileReply(path=transcript, message=message, lane=lane))

    def sent(rid: int, lease: str, lane: str, *, release: bool = True) -> None:
        append = Append(id=rid, lease=lease, fence=1, records=[{}], release=release)
        links.leases.sent(transcript, lane, append)

    granted = Granted(id=1, lease=lease, fence=1, path=transcript, purpose="prompt")
    reply(granted, "a#1")
    reply(granted.model_copy(update={"id": 2}), "a#1")  # reentrant: two levels
    sent(3, lease, "a#1")
    reply(Appended(id=3, offset=0, lines=1, fence=1, released=True), "a#1")
    assert links.leases.grants[transcript].depth == 1, "one level released"
    sent(4, lease, "a#1", release=False)
    reply(Appended(id=4, offset=9, lines=1, fence=1), "a#1")  # a plain append releases nothing
    assert links.leases.grants[transcript].depth == 1
    # The file grants the next waiter before it answers the append that released: the new
    # holder's grant is not the lease the append was sent under, and stays.
    sent(6, lease, "a#1")
    reply(Granted(id=5, lease=nxt, fence=2, path=transcript, purpose="prompt"), "b#1")
    reply(Appended(id=6, offset=18, lines=1, fence=1, released=True), "a#1")
    assert links.leases.grants[transcript].lease == nxt
    sent(7, nxt, "b#1")
    reply(Appended(id=7, offset=27, lines=1, fence=2, released=True), "b#1")
    assert transcript not in links.leases.grants


def test_one_appends_release_is_counted_once_however_many_answers_it_gets(
    tmp_path: Path, transcript: str, fake_file: FakeFile
) -> None:
    links, host = make(tmp_path)
    links.call(acquire(transcript, 1))
    open_channel(links, host, fake_file, transcript)
    links.call(acquire(transcript, 2))
    links.flush()
    fake_file.read(2)
    lease = f"{lease_route(transcript)}-1"
    for rid in (1, 2):  # a lease two levels deep
        granted = Granted(id=rid, lease=lease, fence=1, path=transcript, purpose="prompt")
        fake_file.send(reply_frame("a#1", granted))
    delivered(links, host, 2)

    def append(rid: int) -> None:
        request = Append(
            id=rid, lease=lease, fence=1, records=[{}], aid="aid-00000001", release=True
        )
        links.call(LaneCall(lane=lane(), path=transcript, canonical=False, request=request))
        links.flush()
        fake_file.read(1)

    def answer(rid: int) -> None:
        released = Appended(id=rid, offset=0, lines=1, fence=1, released=True)
        fake_file.send(reply_frame("a#1", released))
        delivered(links, host, len(host.delivered) + 1)

    append(3)
    answer(3)
    assert links.leases.grants[transcript].depth == 1, "one level released"
    answer(3)  # the same answer once more
    append(4)  # the append resent (its answer was lost), answered again as written
    answer(4)
    grant = links.leases.grants.get(transcript)
    assert grant is not None and grant.depth == 1, "the outer level is still held"
    assert grant.releasing == {}, "nothing kept once answered"


# Carried channels: the same frames in thespian messages ----------------------------------


def carried_offer(links: Links, host: FakeHost, transcript: str, incarnation: int = 1) -> None:
    ask = host.opens()[-1]
    offer = ChannelOffer(
        path=ask.path,
        nonce=ask.nonce,
        canonical=transcript,
        file="file-actor",
        token="tok",
        incarnation=incarnation,
    )
    links.on_offer(offer)
    links.flush()


def carried_frames(host: FakeHost) -> list[Any]:
    """The frames the links carried to the file since the last look, decoded."""
    sent, host.to_files = host.to_files, []
    frames = []
    for target, message in sent:
        assert target == "file-actor" and isinstance(message, CarriedCalls)
        frames += [decode_from_gateway(body) for body in split_frames(message.frames)]
    return frames


def test_a_carried_offer_opens_a_channel_whose_frames_go_in_messages(
    tmp_path: Path, transcript: str
) -> None:
    links, host = make(tmp_path)
    links.call(acquire(transcript, 1))
    carried_offer(links, host, transcript)
    (hello,) = carried_frames(host)
    assert hello == ChannelHello(token="tok")
    assert links.fds() == [], "nothing to watch"
    links.on_carried(CarriedReplies(transcript, 1, welcome_frame(transcript, 1)))
    links.flush()
    (call,) = carried_frames(host)
    assert isinstance(call, ChannelCall) and call.request.id == 1
    granted = Granted(
        id=1, lease=lease_route(transcript) + "-1", fence=1, path=transcript, purpose="prompt"
    )
    links.on_carried(CarriedReplies(transcript, 1, reply_frame("a#1", granted)))
    assert [r.message for r in host.delivered] == [granted]
    release = Release(id=2, lease=granted.lease)
    links.call(LaneCall(lane=lane(), path=transcript, canonical=True, request=release))
    links.flush()
    assert [f.request.id for f in carried_frames(host)] == [2], "one message per turn"


def test_a_carried_channel_the_file_closes_loses_the_lease_and_asks_again(
    tmp_path: Path, transcript: str
) -> None:
    links, host = make(tmp_path)
    links.call(acquire(transcript, 1))
    carried_offer(links, host, transcript)
    links.on_carried(CarriedReplies(transcript, 1, welcome_frame(transcript, 1)))
    granted = Granted(
        id=1, lease=lease_route(transcript) + "-1", fence=1, path=transcript, purpose="prompt"
    )
    links.on_carried(CarriedReplies(transcript, 1, reply_frame("a#1", granted)))
    asked = len(host.opens())
    links.on_carried(CarriedReplies(transcript, 1, b"", closed="the file's actor is exiting"))
    (lost,) = host.losses
    assert lost.holder == ("a#1", granted.lease) and lost.incarnation == 1
    assert len(host.opens()) == asked + 1
    links.on_carried(CarriedReplies(transcript, 1, reply_frame("a#1", granted)))
    assert len(host.delivered) == 1, "frames of a channel given up on answer nothing"


def test_a_carried_hello_refused_by_a_retiring_file_is_asked_again_without_a_loss(
    tmp_path: Path, transcript: str
) -> None:
    clock = Clock()
    links, host = make(tmp_path, clock)
    links.call(acquire(transcript, 1))
    carried_offer(links, host, transcript)
    carried_frames(host)
    links.on_carried(CarriedReplies(transcript, 1, b"", closed="not accepting"))
    assert host.losses == [] and host.delivered == []
    clock.now += 25
    links.tick()
    carried_offer(links, host, transcript, incarnation=1)
    assert isinstance(carried_frames(host)[-1], ChannelHello)
    links.on_carried(CarriedReplies(transcript, 1, welcome_frame(transcript, 1)))
    links.flush()
    (call,) = carried_frames(host)
    assert call.request.id == 1, "the queued call went out once, after the welcome"


def test_frames_of_an_earlier_incarnation_are_ignored_and_a_bad_frame_loses_the_channel(
    tmp_path: Path, transcript: str
) -> None:
    links, host = make(tmp_path)
    links.call(acquire(transcript, 1))
    carried_offer(links, host, transcript, incarnation=2)
    links.on_carried(CarriedReplies(transcript, 1, welcome_frame(transcript, 1)))
    links.on_carried(CarriedReplies(transcript, 2, welcome_frame(transcript, 2)))
    links.on_carried(CarriedReplies(transcript, 2, b"\x00\x00\x00\x02ab"))
    (lost,) = host.losses
    assert lost.reason == "bad frame"


def test_an_idle_carried_channel_closes_by_telling_the_file(
    tmp_path: Path, transcript: str
) -> None:
    clock = Clock()
    links, host = make(tmp_path, clock)
    links.call(acquire(transcript, 1))
    carried_offer(links, host, transcript)
    links.on_carried(CarriedReplies(transcript, 1, welcome_frame(transcript, 1)))
    links.flush()
    host.to_files.clear()
    links.on_carried(
        CarriedReplies(transcript, 1, reply_frame("a#1", Error(id=1, code="unavailable")))
    )
    clock.now += 10_000
    links.tick()
    ((target, closing),) = host.to_files
    assert target == "file-actor" and closing == CarriedCalls(transcript, b"", closing=True)


def test_carried_frames_thespian_could_not_deliver_lose_the_channel(
    tmp_path: Path, transcript: str
) -> None:
    links, host = make(tmp_path)
    links.call(acquire(transcript, 1))
    carried_offer(links, host, transcript)
    links.on_carried(CarriedReplies(transcript, 1, welcome_frame(transcript, 1)))
    links.flush()
    ((_, sent),) = [m for m in host.to_files if not m[1].closing][-1:]
    links.undeliverable(sent)
    (lost,) = host.losses
    assert "could not be delivered" in lost.reason
    assert len(host.opens()) == 2, "asked again"


def test_past_the_spelling_cap_resolved_spellings_are_forgotten_and_unresolved_ones_refuse(
    tmp_path: Path, transcript: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(links_module, "_MAX_SPELLINGS", 2)
    links, host = make(tmp_path)
    spelled = [f"{tmp_path}/{'./' * i}s.jsonl" for i in range(4)]
    links.call(acquire(spelled[0], 1))
    ask = host.opens()[-1]
    carried = dict(file="file-actor", token="tok", incarnation=1)
    links.on_offer(ChannelOffer(path=ask.path, nonce=ask.nonce, canonical=transcript, **carried))
    links.call(acquire(spelled[1], 2, uid="b#1"))  # unresolved: waits for its offer
    assert len(links.spellings) == 2
    links.call(acquire(spelled[2], 3, uid="c#1"))  # the resolved spelling is forgotten
    assert set(links.spellings) == {spelled[1], spelled[2]} and len(host.opens()) == 3
    links.call(acquire(spelled[3], 4, uid="d#1"))  # two unresolved: refused, not routed
    (refused,) = host.delivered
    assert (refused.lane, refused.message.code) == ("d#1", "unavailable")
    assert len(host.opens()) == 3


def reclaim(path: str, rid: str = "_reclaim1", uid: str = "a#1") -> LaneCall:
    ticket = ReclaimTicket(lease=f"{lease_route(path)}-1", fence=1, secret="s" * 32)
    req = Acquire(id=rid, lane="a", path=path, purpose="prompt", reclaim=ticket)
    return LaneCall(lane=lane(uid), path=path, canonical=True, request=req)


def test_a_channel_the_registry_reports_gone_is_asked_again_saying_a_reclaim_waits(
    tmp_path: Path, transcript: str
) -> None:
    links, host = make(tmp_path)
    links.call(acquire(transcript, 1))
    carried_offer(links, host, transcript)
    assert host.opens()[-1].reclaim is False
    links.on_carried(CarriedReplies(transcript, 1, welcome_frame(transcript, 1)))
    granted = Granted(
        id=1, lease=lease_route(transcript) + "-1", fence=1, path=transcript, purpose="prompt"
    )
    links.on_carried(CarriedReplies(transcript, 1, reply_frame("a#1", granted)))
    host.reclaims_on_restart = [reclaim(transcript)]  # what the lane does when told
    links.on_restarted(FileRestarted(path=transcript, owner_lost=True))
    (told,) = host.restarts
    assert told.owner_lost and host.restart_holders == [("a#1", granted.lease)]
    assert host.opens()[-1].reclaim is True, "asked after the lane queued its reclaim"


def test_a_reclaim_queued_after_a_plain_ask_asks_again_and_an_abandon_withdraws_it(
    tmp_path: Path, transcript: str
) -> None:
    links, host = make(tmp_path)
    links.call(acquire(transcript, 1, uid="b#1"))
    assert [o.reclaim for o in host.opens()] == [False]
    links.call(reclaim(transcript))
    assert [o.reclaim for o in host.opens()] == [False, True]
    gone = Abandon(id="_gone1", lane="a", path=transcript)
    links.call(LaneCall(lane=lane(), path=transcript, canonical=True, request=gone))
    (refused,) = host.delivered
    assert (refused.lane, refused.message.id, refused.message.code) == (
        "a#1",
        "_reclaim1",
        "unavailable",
    )
    assert [o.reclaim for o in host.opens()] == [False, True, False], "the hold is let go"


def _direct(path: str, rid: int, uid: str = "a#1", peer_uid: int | None = 1000) -> LaneCall:
    request = Direct(id=rid, lane=uid.split("#")[0], path=path, peer_uid=peer_uid)
    if peer_uid is not None:
        request = request.model_copy(update={"max_frame_bytes": 65536})
    return LaneCall(lane=lane(uid), path=path, canonical=False, request=request)


def test_a_direct_that_opens_a_link_is_asked_with_it_and_answered_from_the_offers_ticket(
    tmp_path: Path, transcript: str, fake_file: FakeFile
) -> None:
    links, host = make(tmp_path)
    links.call(_direct(transcript, 1))
    links.call(acquire(transcript, 2, uid="b#1"))
    ask = host.opens()[-1]
    assert ask.direct is not None and ask.direct.gateway_lane == "a#1"
    assert ask.direct.request.peer_uid == 1000 and ask.direct.ticket == ""
    offer = fake_file.offer(ask.nonce, ask.path, transcript)
    links.on_offer(offer.model_copy(update={"direct_ticket": "minted"}))
    # Answered at once from the offer, before any welcome...
    [answer] = host.delivered
    assert answer.lane == "a#1" and isinstance(answer.message, DirectOffer)
    assert (answer.message.id, answer.message.ticket) == (1, "minted")
    assert (answer.message.address, answer.message.path) == (fake_file.address, transcript)
    # ...and never sent to the file: the hello and the other lane's acquire go, not the direct.
    links.flush()
    fake_file.accept()
    hello, call = fake_file.read(2)
    assert isinstance(hello, ChannelHello) and isinstance(call, ChannelCall)
    assert call.request.id == 2


def test_a_direct_is_sent_to_the_file_when_the_offer_brings_no_ticket_or_it_was_not_filled(
    tmp_path: Path, transcript: str, fake_file: FakeFile
) -> None:
    links, host = make(tmp_path)
    links.call(_direct(transcript, 1, peer_uid=None))  # not filled in by the gateway
    ask = host.opens()[-1]
    assert ask.direct is None
    links.on_offer(fake_file.offer(ask.nonce, ask.path, transcript))  # and no ticket offered
    assert host.delivered == []
    links.flush()
    fake_file.accept()
    _, call = fake_file.read(2)
    assert isinstance(call.request, Direct) and call.request.id == 1
