"""Carried channels (``sessionlane.actors.carried``): the channel protocol in thespian messages.

The file's end (``CarriedPeers``) is driven directly, with made-up sender addresses; then a
real SessionFile on ``simpleSystemBase`` (which cannot watch sockets, so it offers only a
carried channel) is reached through it, the test being the link's actor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from driver import file_settings
from thespian.actors import Actor

from sessionlane.actors.carried import CarriedEnd, CarriedPeers, CarriedRef, split_frames
from sessionlane.actors.file_channels import ChannelCallEvent, ChannelClosed, ChannelRef
from sessionlane.actors.session_file import SessionFile
from sessionlane.messages.carried import CarriedCalls, CarriedLost, CarriedReplies
from sessionlane.messages.channel import (
    ChannelReply,
    ChannelWelcome,
    call_frame,
    decode_from_file,
    hello_frame,
)
from sessionlane.messages.codec import FrameDecodeError
from sessionlane.messages.internal import (
    ChannelOffer,
    FileInit,
    FileStatusAnswer,
    FileStatusQuery,
    OpenChannel,
)
from sessionlane.messages.wire import Acquire, Append, Appended, Granted, Queued, Release

TIMEOUT = 5.0
PATH = "/srv/s.jsonl"


def acquire(lane: str) -> bytes:
    return call_frame(
        lane, lane, "interactive", Acquire(id=1, lane=lane, path=PATH, purpose="prompt")
    )


def frames_of(message: CarriedReplies) -> list[Any]:
    return [decode_from_file(body) for body in split_frames(message.frames)]


@pytest.fixture
def peers() -> CarriedPeers:
    return CarriedPeers(PATH, 3, str)


def test_a_hello_with_the_token_is_welcomed_and_its_calls_follow_in_one_message(
    peers: CarriedPeers,
) -> None:
    events = peers.on_message(CarriedCalls(PATH, hello_frame(peers.token) + acquire("a")), "A")
    assert len(events) == 1 and isinstance(events[0], ChannelCallEvent)
    assert events[0].call.uid == "a" and isinstance(events[0].conn, CarriedRef)
    assert peers.connections() == 1
    ((address, message),) = peers.take_output()
    assert address == "A" and frames_of(message) == [ChannelWelcome(PATH, 3)]
    assert peers.take_output() == [], "sent once"


@pytest.mark.parametrize(
    "frames",
    [hello_frame("wrong") + acquire("a"), acquire("a"), b"\x00\x00\x00\x09abc"],
    ids=["wrong token", "a call before the hello", "a message ending inside a frame"],
)
def test_a_peer_breaking_the_hello_rule_is_served_nothing_and_told(
    peers: CarriedPeers, frames: bytes
) -> None:
    assert peers.on_message(CarriedCalls(PATH, frames), "A") == []
    assert peers.connections() == 0
    ((address, message),) = peers.take_output()
    assert address == "A" and message.frames == b"" and message.closed


def test_a_second_hello_closes_the_connection_and_reports_it(peers: CarriedPeers) -> None:
    peers.on_message(CarriedCalls(PATH, hello_frame(peers.token)), "A")
    events = peers.on_message(CarriedCalls(PATH, hello_frame(peers.token)), "A")
    assert [type(e) for e in events] == [ChannelClosed] and peers.connections() == 0


def test_frames_for_another_path_are_refused(peers: CarriedPeers) -> None:
    assert peers.on_message(CarriedCalls("/srv/other.jsonl", hello_frame(peers.token)), "A") == []
    assert peers.take_output()[0][1].closed


def test_a_passivating_file_closes_a_hello_without_a_welcome() -> None:
    peers = CarriedPeers(PATH, 1, str, accepting=lambda: False)
    assert peers.on_message(CarriedCalls(PATH, hello_frame(peers.token)), "A") == []
    ((_, message),) = peers.take_output()
    assert message.frames == b"" and "passivated" in message.closed


def test_each_sender_is_its_own_connection_and_replies_are_batched_per_peer(
    peers: CarriedPeers,
) -> None:
    a = peers.on_message(CarriedCalls(PATH, hello_frame(peers.token) + acquire("a")), "A")
    b = peers.on_message(CarriedCalls(PATH, hello_frame(peers.token) + acquire("b")), "B")
    ref_a, ref_b = a[0].conn, b[0].conn  # type: ignore[union-attr]
    assert ref_a != ref_b and ref_a != ChannelRef(ref_a.serial), "never a socket's ref"
    peers.take_output()
    peers.send(ref_a, b"x")
    peers.send(ref_a, b"y")
    assert [(addr, m.frames) for addr, m in peers.take_output()] == [("A", b"xy")]


def test_a_closing_message_closes_after_its_frames(peers: CarriedPeers) -> None:
    peers.on_message(CarriedCalls(PATH, hello_frame(peers.token)), "A")
    events = peers.on_message(CarriedCalls(PATH, acquire("a"), closing=True), "A")
    assert [type(e) for e in events] == [ChannelCallEvent, ChannelClosed]
    assert peers.connections() == 0
    assert peers.on_message(CarriedCalls(PATH, b"", closing=True), "A") == [], "once"


def test_close_gives_every_peer_its_last_output_and_the_reason(peers: CarriedPeers) -> None:
    events = peers.on_message(CarriedCalls(PATH, hello_frame(peers.token) + acquire("a")), "A")
    peers.send(events[0].conn, b"last")  # type: ignore[arg-type, union-attr]
    ((address, message),) = peers.close("exiting")
    assert address == "A" and message.frames.endswith(b"last") and message.closed == "exiting"


def test_the_link_end_sends_once_per_flush_and_says_when_it_closes() -> None:
    sent: list[tuple[Any, Any]] = []
    end = CarriedEnd("F", PATH, lambda target, message: sent.append((target, message)))
    end.queue(b"a")
    end.queue(b"b")
    end.flush()
    end.flush()
    end.queue(b"c")
    end.close()
    end.close()
    assert sent == [("F", CarriedCalls(PATH, b"ab")), ("F", CarriedCalls(PATH, b"c", True))]


def test_split_frames_refuses_a_frame_over_the_limit() -> None:
    with pytest.raises(FrameDecodeError):
        split_frames(hello_frame("t"), max_bytes=4)


# A SessionFile on simpleSystemBase, the test playing the link's actor ----------------------


class CarriedFile:
    def __init__(self, asys: Any, path: Path) -> None:
        self.asys = asys
        self.path = str(path)
        self.actor = asys.createActor(SessionFile)
        asys.tell(self.actor, FileInit(path=self.path, settings=file_settings(), incarnation=1))
        offer = asys.ask(self.actor, OpenChannel(path=self.path, nonce=1), TIMEOUT)
        assert isinstance(offer, ChannelOffer) and offer.file is not None, offer
        self.offer = offer

    def carry(self, frames: bytes, *, closing: bool = False) -> list[Any]:
        message = CarriedCalls(self.path, frames, closing=closing)
        answer = self.asys.ask(self.offer.file, message, TIMEOUT)
        assert isinstance(answer, CarriedReplies), answer
        return [decode_from_file(body) for body in split_frames(answer.frames)]

    def call(self, lane: str, request: Any) -> bytes:
        return call_frame(lane, lane, "interactive", request)

    def status(self) -> Any:
        answer = self.asys.ask(self.actor, FileStatusQuery(query=1), TIMEOUT)
        assert isinstance(answer, FileStatusAnswer)
        return answer.status


def test_a_file_serves_carried_frames_exactly_as_socket_frames(
    simple_asys: Any, tmp_path: Path
) -> None:
    f = CarriedFile(simple_asys, tmp_path / "s.jsonl")
    got = f.carry(
        hello_frame(f.offer.token)
        + f.call("a", Acquire(id=1, lane="a", path=f.path, purpose="prompt"))
    )
    welcome, reply = got
    assert welcome == ChannelWelcome(f.path, 1)
    assert isinstance(reply, ChannelReply) and isinstance(reply.message, Granted)
    lease, fence = reply.message.lease, reply.message.fence
    append = Append(id=2, lease=lease, fence=fence, records=[{"n": 1}])
    (appended,) = f.carry(f.call("a", append))
    assert isinstance(appended.message, Appended) and appended.uid == "a"
    assert (Path(f.path).read_text()).count("\n") == 1
    status = f.status()
    assert status.counters["channel_calls"] == 2 and status.counters["channels"] == 1
    (released,) = f.carry(f.call("a", Release(id=3, lease=lease)))
    assert released.message.lease == lease


def test_a_carried_channel_that_closes_abandons_its_lanes(simple_asys: Any, tmp_path: Path) -> None:
    f = CarriedFile(simple_asys, tmp_path / "s.jsonl")
    _, granted = f.carry(
        hello_frame(f.offer.token)
        + f.call("a", Acquire(id=1, lane="a", path=f.path, purpose="prompt"))
    )
    assert isinstance(granted.message, Granted)
    simple_asys.tell(f.offer.file, CarriedCalls(f.path, b"", closing=True))
    status = f.status()
    assert status.holder is None and status.counters["channels"] == 0
    assert status.counters["abandons"] == 1


def test_a_wrong_token_gets_a_close_and_changes_nothing(simple_asys: Any, tmp_path: Path) -> None:
    f = CarriedFile(simple_asys, tmp_path / "s.jsonl")
    message = CarriedCalls(
        f.path,
        hello_frame("not-the-token")
        + f.call("a", Acquire(id=1, lane="a", path=f.path, purpose="prompt")),
    )
    answer = simple_asys.ask(f.offer.file, message, TIMEOUT)
    assert isinstance(answer, CarriedReplies) and answer.frames == b"" and answer.closed
    assert f.status().holder is None and f.status().counters["channels"] == 0


def test_lanes_on_one_carried_channel_contend_and_the_waiter_is_granted_on_release(
    simple_asys: Any, tmp_path: Path
) -> None:
    f = CarriedFile(simple_asys, tmp_path / "s.jsonl")
    _, first = f.carry(
        hello_frame(f.offer.token)
        + f.call("a", Acquire(id=1, lane="a", path=f.path, purpose="prompt"))
    )
    (queued,) = f.carry(f.call("b", Acquire(id=1, lane="b", path=f.path, purpose="prompt")))
    assert isinstance(queued.message, Queued)
    got = f.carry(f.call("a", Release(id=2, lease=first.message.lease)))
    kinds = {(r.uid, type(r.message).__name__) for r in got}
    assert ("b", "Granted") in kinds and ("a", "Released") in kinds


def test_dropping_a_lost_members_peers_closes_their_channels_and_tells_them(
    peers: CarriedPeers,
) -> None:
    peers.on_message(CarriedCalls(PATH, hello_frame(peers.token)), "A")
    peers.on_message(CarriedCalls(PATH, hello_frame(peers.token)), "B")
    peers.take_output()
    (ref,) = peers.close_peers(["A", "nobody"], "member lost: silent")
    assert peers.connections() == 1
    peers.send(ref, b"the abandons")
    ((address, message),) = peers.take_output()
    assert (address, message.frames, message.closed) == (
        "A",
        b"the abandons",
        "member lost: silent",
    )
    peers.send(ref, b"late")
    assert peers.take_output() == [], "gone once told"
    later = peers.on_message(CarriedCalls(PATH, acquire("a")), "A")
    assert later == [], "a dropped peer must say hello again: its old lanes are gone"


class LinkActor(Actor):  # type: ignore[misc]
    """Plays a link's actor: carries the test's frames to the file, and the file's back."""

    def receiveMessage(self, msg: Any, sender: Any) -> None:
        if isinstance(msg, tuple):
            self.test, (file, carried) = sender, msg
            self.send(file, carried)
        elif isinstance(msg, CarriedReplies):
            self.send(self.test, msg)


def test_a_lost_members_channel_is_closed_by_the_registry_and_its_lease_abandoned(
    simple_asys: Any, tmp_path: Path
) -> None:
    f = CarriedFile(simple_asys, tmp_path / "s.jsonl")
    link = simple_asys.createActor(LinkActor)
    frames = hello_frame(f.offer.token) + f.call(
        "a", Acquire(id=1, lane="a", path=f.path, purpose="prompt")
    )
    answer = simple_asys.ask(link, (f.offer.file, CarriedCalls(f.path, frames)), TIMEOUT)
    assert isinstance(answer, CarriedReplies)
    assert isinstance(frames_of(answer)[-1].message, Granted)
    lost = CarriedLost(path=f.path, peers=(link,), reason="member lost: silent")
    simple_asys.tell(f.actor, lost)
    told = simple_asys.listen(TIMEOUT)
    assert isinstance(told, CarriedReplies) and told.closed == "member lost: silent"
    (abandoned,) = frames_of(told)
    assert abandoned.uid == "a" and abandoned.message.id is None, "an event: revoked to the agent"
    assert abandoned.message.leases == [frames_of(answer)[-1].message.lease]
    status = f.status()
    assert status.holder is None and status.counters["channels"] == 0
    assert status.counters["abandons"] == 1
