"""The file process's hot path on socket channels: a pass's end, the lanes of its calls.

A group-commit pass on socket channels ends in the turn that found no more input.

A SessionFile instance driven by hand (its thespian ``send`` recorded, the transport's
``WatchMessage``s delivered by the test) with real channel sockets: Unix stream sockets hand
data over synchronously, so what a peer sent is readable when ``sendall`` returns and nothing
needs a sleep. With no socket readable, the append is synced and answered in the turn that
read it (no thespian pass over the always-readable pipe); with another channel's frame
waiting, the pass waits for the transport, and both appends share one fdatasync. A lane's
calls on one channel share one ``LaneRef``. A grant is written before the turn's other replies.
"""

from __future__ import annotations

import select
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from driver import file_settings
from test_file_channels import Peer
from thespian.actors import ActorExitRequest, ThespianWatch, WatchMessage

from sessionlane.actors.endpoint import FramedSocket
from sessionlane.actors.file_channels import ChannelRef, ChannelServer
from sessionlane.actors.session_file import SessionFile
from sessionlane.actors.session_file_channels import channel_call
from sessionlane.actors.session_file_serving import Serving
from sessionlane.messages.channel import ChannelCall, ChannelWelcome, hello_frame, reply_frame
from sessionlane.messages.internal import FileInit, LaneRef, OpenChannel
from sessionlane.messages.wire import Append, Appended, Queued, Released


class Driven:
    """One SessionFile outside any actor system, with socket channels."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.actor = SessionFile({"Thespian Watch Supported": True})
        self.actor.send = lambda _to, _message: None
        self.actor.wakeupAfter = lambda *_a, **_k: None
        self.actor.receiveMessage(
            FileInit(path=self.path, settings=file_settings(), incarnation=1), "registry"
        )
        self.peers: list[Peer] = []

    @property
    def serving(self) -> Serving:
        state = self.actor.state
        assert isinstance(state, Serving)
        return state

    def channel(self) -> Peer:
        # What ``on_open_channel`` answers (its ``myAddress`` needs an actor system).
        offer = self.serving.channels.offer(OpenChannel(path=self.path, nonce=1), None)
        assert offer.address is not None and offer.token is not None, offer
        peer = Peer(offer.address)
        self.peers.append(peer)
        peer.send(hello_frame(offer.token))
        assert self.pump() is not None
        assert isinstance(peer.next(), ChannelWelcome)
        return peer

    def readable(self) -> list[int]:
        fds = self.serving.channels.fds()
        return select.select(fds, [], [], 0)[0] if fds else []

    def pump(self, ready: list[int] | None = None) -> ThespianWatch | None:
        """One ``WatchMessage`` of ``ready`` (default: every readable channel fd)."""
        watch: ThespianWatch | None = self.actor.receiveMessage(
            WatchMessage(self.readable() if ready is None else ready), None
        )
        return watch

    def syncs(self) -> int:
        return int(self.actor.status().counters["syncs"])

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.actor.receiveMessage(ActorExitRequest(), "registry")


@pytest.fixture
def driven(tmp_path: Path) -> Iterator[Driven]:
    made = Driven(tmp_path / "t.jsonl")
    try:
        yield made
    finally:
        made.close()


def append_of(path: str, lane: str, rid: int) -> Append:
    """An append of one record, tagged with its lane and id."""
    return Append(id=rid, lane=lane, path=path, records=[{"lane": lane, "i": rid}])


def test_an_append_with_nothing_else_to_read_is_synced_and_answered_in_its_own_turn(
    driven: Driven,
) -> None:
    peer = driven.channel()
    before = driven.syncs()
    peer.call("a", append_of(driven.path, "a", 1))
    watch = driven.pump()
    assert driven.readable() == []
    assert watch is not None and driven.serving.ready_fd not in watch.filenos
    reply = peer.reply()
    assert isinstance(reply.message, Appended) and reply.message.id == 1
    assert driven.syncs() == before + 1


def test_a_pass_with_another_channels_frame_waiting_waits_for_it_and_shares_the_sync(
    driven: Driven,
) -> None:
    a, b = driven.channel(), driven.channel()
    before = driven.syncs()
    a.call("a", append_of(driven.path, "a", 1))
    b.call("b", append_of(driven.path, "b", 1))
    first = [fd for fd in driven.readable() if fd == driven.serving.channels.fds()[1]]
    watch = driven.pump(first)  # a's frame only: b's is still readable
    ready_fd = driven.serving.ready_fd
    assert watch is not None and ready_fd in watch.filenos, "the pass waits for the transport"
    assert driven.syncs() == before
    # b's frame joins the pass; the pass it asks for then finds nothing to read: one sync for
    # both, in this turn.
    watch = driven.pump([*driven.readable(), ready_fd])
    assert watch is not None and ready_fd not in watch.filenos
    assert driven.syncs() == before + 1
    for peer in (a, b):
        assert isinstance(peer.reply().message, Appended)


def test_the_calls_of_one_lane_on_one_channel_share_its_lane_ref() -> None:
    refs: dict[tuple[Any, ...], LaneRef] = {}
    append = append_of("/s.jsonl", "a", 1)
    first = channel_call(
        "/s.jsonl", ChannelRef(1), ChannelCall("u", "a", "interactive", append), refs
    )
    again = channel_call(
        "/s.jsonl", ChannelRef(1), ChannelCall("u", "a", "interactive", append), refs
    )
    assert again.lane is first.lane and again.request is append
    assert first.lane == LaneRef(uid="u", name="a", address=ChannelRef(1), priority="interactive")
    other_conn = channel_call(
        "/s.jsonl", ChannelRef(2), ChannelCall("u", "a", "interactive", append), refs
    )
    other_class = channel_call(
        "/s.jsonl", ChannelRef(1), ChannelCall("u", "a", "background", append), refs
    )
    assert other_conn.lane.address == ChannelRef(2) and other_class.lane.priority == "background"
    assert len(refs) == 3


def test_a_grant_is_written_before_the_turns_other_replies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = ChannelServer.open(str(tmp_path / "s.jsonl"), incarnation=1)
    peers: list[Peer] = []
    try:
        for _ in range(3):
            peer = Peer(server.address)
            peers.append(peer)
            peer.send(hello_frame(server.token))
            server.on_ready(select.select(server.fds(), [], [], 1)[0])
        server.flush()
        for peer in peers:
            assert isinstance(peer.next(), ChannelWelcome)
        a, b, c = (ChannelRef(serial) for serial in (1, 2, 3))
        written: list[int] = []
        flush = FramedSocket.flush

        def spy(end: FramedSocket) -> Any:
            written.append(end.fd)
            return flush(end)

        monkeypatch.setattr(FramedSocket, "flush", spy)
        fds = server.fds()[1:]
        server.send(a, reply_frame("a", Released(id=1, lease="l1")))
        server.send(c, reply_frame("c", Queued(id=1, position=1)))
        server.send(b, reply_frame("b", Queued(id=2, position=1)), first=True)
        server.send(a, reply_frame("a", Queued(id=3, position=2)))
        server.flush()
        assert written == [fds[1], fds[0], fds[2]], "b first, then in the order queued"
        assert [peers[0].reply().message.id for _ in range(2)] == [1, 3]  # a's own order kept
    finally:
        for peer in peers:
            peer.close()
        server.close()
