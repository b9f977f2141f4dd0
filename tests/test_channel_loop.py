"""The channel loop (``docs/channel-loop.md``): a file's process serves its channel sockets in its
own turn while thespian has nothing to do, and gives the turn back the moment it may.

One wait of the loop against a stand-in for thespian's transport with real sockets; a
SessionFile driven by hand with real channel sockets (group commit in a held turn, and no hold
while a carried connection is open); then real services, real sockets, the Python client on
direct channels. The file's status counters
say which way each frame went: ``deliveries`` (messages thespian's loop delivered to the actor),
``loop_rounds`` (channel input served in the actor's own turn) and ``loop_returned_<why>`` (turns
given back to thespian, by reason). The services that check promptness hold a turn as long as
the setting allows (1 s), so a message or a timer the loop failed to notice would wait for the
hold to run out, and its reason would be ``held``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from processes import file_processes
from test_file_hot_path import Driven, append_of
from test_gateway import records_of
from thespian.actors import WatchMessage
from thespian.system.timing import ExpirationTimer
from thespian.system.transport.TCPTransport import ActorAddress, TCPIncomingPersistent

from sessionlane.actors import channel_loop, procfs
from sessionlane.actors.channel_loop import ChannelLoop
from sessionlane.actors.session_file import SessionFile
from sessionlane.messages.carried import CarriedCalls
from sessionlane.messages.channel import hello_frame
from sessionlane.messages.errors import LeaseRevoked, UnknownOutcome
from sessionlane.messages.wire import Appended
from sessionlane.system.client import connect
from sessionlane.system.runtime.service import Service, embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(120)]

LONGEST_HOLD_MS = 1_000
"""The most ``channel_loop_ms`` allows: a missed wake-up would show as a second's wait."""


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loop") / "sessions"
    root.mkdir()
    return root


@pytest.fixture(scope="module")
def held(roots: Path) -> Iterator[Service]:
    """A service whose files hold a turn as long as they may."""
    with embedded_service(
        [str(roots)], log_file=roots.parent / "held.log", channel_loop_ms=LONGEST_HOLD_MS
    ) as svc:
        yield svc


@pytest.fixture(scope="module")
def expiring(roots: Path) -> Iterator[Service]:
    """The same, revoking a lease held 400 ms."""
    with embedded_service(
        [str(roots)],
        log_file=roots.parent / "expiring.log",
        channel_loop_ms=LONGEST_HOLD_MS,
        max_hold_ms=400,
    ) as svc:
        yield svc


@pytest.fixture(scope="module")
def off(roots: Path) -> Iterator[Service]:
    with embedded_service(
        [str(roots)], log_file=roots.parent / "off.log", channel_loop_ms=0
    ) as svc:
        yield svc


@pytest.fixture
def transcript(roots: Path, request: pytest.FixtureRequest) -> Path:
    return roots / f"{request.node.name}.jsonl"


def counters(sl: Any, path: Path) -> dict[str, int]:
    (found,) = sl.status(str(path)).files
    return dict(found.counters)


def grew(after: dict[str, int], before: dict[str, int], key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


CYCLES = 40


def cycles(sl: Any, path: Path, first: int = 0) -> None:
    lane = sl.lane("agent")
    for n in range(first, first + CYCLES):
        with lane.lease(path, purpose="write") as lease:
            assert lease is not None
            lease.append({"n": n})


def test_the_thespian_internals_it_reads_are_those_of_the_pinned_version() -> None:
    assert channel_loop.unsupported() is None


def test_an_actor_outside_a_tcp_actor_system_or_with_the_loop_off_gets_no_loop() -> None:
    actor = SessionFile({"Thespian Watch Supported": True})  # driven by hand, as tests do
    assert ChannelLoop.attach(actor, 50) is None
    assert ChannelLoop.attach(actor, 0) is None


# One wait, against a transport's state -----------------------------------------------------


class _Transport:
    """The attributes of thespian 4.0.1's ``TCPTransport`` that ``ChannelLoop`` reads, with
    real sockets: its listener's stand-in and one open socket."""

    def __init__(self, listener: socket.socket, open_socket: socket.socket) -> None:
        self.socket = listener
        self._openSockets = {"peer": SimpleNamespace(socket=open_socket)}
        self._incomingSockets: dict[int, Any] = {}
        self._transmitIntents: dict[int, Any] = {}
        self._waitingTransmits: list[Any] = []
        self._finished_intents: list[Any] = []
        self._incomingEnvelopes: list[Any] = []
        self._aTB_queuedPendingTransmits: list[Any] = []
        self._shutdownSignalled = self._checkChildren = False
        self.run_time = ExpirationTimer(None)


@pytest.fixture
def wired() -> Iterator[tuple[ChannelLoop, _Transport, list[socket.socket]]]:
    """A loop over a stand-in transport (listener, open socket) and one channel (socketpair):
    ``ends`` are the far ends: [listener's, open socket's, channel's], then the channel."""
    pairs = [socket.socketpair() for _ in range(3)]
    transport = _Transport(pairs[0][0], pairs[1][0])
    loop = ChannelLoop(SimpleNamespace(_receiveQueue=[]), transport, hold_ms=60_000)
    try:
        yield loop, transport, [pairs[0][1], pairs[1][1], pairs[2][1], pairs[2][0]]
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_a_readable_channel_is_served_and_thespians_own_socket_ends_the_wait(
    wired: tuple[ChannelLoop, _Transport, list[socket.socket]],
) -> None:
    loop, _, (listener, peer, channel_peer, channel) = wired
    channel_peer.send(b"x")
    assert loop.wait([channel.fileno()], None, loop.until()) == [channel.fileno()]
    listener.send(b"c")  # a connection to thespian's listener, the channel still readable
    assert loop.wait([channel.fileno()], None, loop.until()) is None
    loop.transport.socket.recv(1)
    peer.send(b"a message for the actor")  # on a socket thespian keeps open
    assert loop.wait([channel.fileno()], None, loop.until()) is None
    assert loop.counters() == {"loop_rounds": 1, "loop_returned_thespian": 2}


def test_queued_work_or_a_due_timer_ends_the_turn_without_waiting(
    wired: tuple[ChannelLoop, _Transport, list[socket.socket]],
) -> None:
    loop, transport, (*_, channel) = wired
    fds = [channel.fileno()]  # nothing readable: a wait would last the minute's hold
    transport._transmitIntents[99] = object()  # the actor sent a message in its turn
    assert loop.wait(fds, None, loop.until()) is None
    transport._transmitIntents.clear()
    manager_queue = loop.manager._receiveQueue
    manager_queue.append(object())
    assert loop.wait(fds, None, loop.until()) is None
    manager_queue.clear()
    transport.run_time = ExpirationTimer(0)  # a wakeupAfter is due
    assert loop.wait(fds, None, loop.until()) is None
    assert loop.counters() == {
        "loop_rounds": 0,
        "loop_returned_sending": 2,
        "loop_returned_timer": 1,
    }


BUSY: list[tuple[str, str, Any, str]] = [
    # (on the transport or the manager, attribute, a value that means work, the reason)
    ("transport", "_incomingEnvelopes", [object()], "received"),
    ("transport", "_activeWakeups", [object()], "received"),
    ("transport", "_transmitIntents", {99: object()}, "sending"),
    ("transport", "_waitingTransmits", [object()], "sending"),
    ("transport", "_finished_intents", [object()], "sending"),
    ("transport", "_aTB_queuedPendingTransmits", [object()], "sending"),
    ("manager", "_receiveQueue", [object()], "sending"),
    ("transport", "_shutdownSignalled", True, "signalled"),
    ("transport", "_checkChildren", True, "signalled"),
    ("manager", "_exiting", True, "signalled"),
    ("transport", "_aborting_run", True, "signalled"),
]


@pytest.mark.parametrize(
    ("owner", "name", "value", "why"), BUSY, ids=[f"{o}.{n}" for o, n, _, _ in BUSY]
)
def test_each_queue_or_flag_of_thespians_ends_the_turn_though_a_channel_is_readable(
    wired: tuple[ChannelLoop, _Transport, list[socket.socket]],
    owner: str,
    name: str,
    value: Any,
    why: str,
) -> None:
    loop, transport, (*_, channel_peer, channel) = wired
    channel_peer.send(b"x")  # a round would be served at once but for thespian's work
    setattr(transport if owner == "transport" else loop.manager, name, value)
    assert loop.wait([channel.fileno()], None, loop.until()) is None
    assert loop.counters() == {"loop_rounds": 0, f"loop_returned_{why}": 1}


def _incoming(sock: socket.socket, expires_s: float) -> Any:
    """thespian's own record of an accepted connection not past its first message (a
    stranger's idle one: ``connection_auth`` gives it ``expires_s`` to prove the key)."""
    inc = TCPIncomingPersistent(ActorAddress(None), sock)
    inc._expires = ExpirationTimer(timedelta(seconds=expires_s))
    return inc


def test_an_idle_incoming_connection_does_not_end_the_turn_but_its_input_does(
    wired: tuple[ChannelLoop, _Transport, list[socket.socket]],
) -> None:
    loop, transport, (*_, channel_peer, channel) = wired
    stranger, ours = socket.socketpair()
    try:
        transport._incomingSockets[ours.fileno()] = _incoming(ours, 60.0)
        channel_peer.send(b"x")
        assert loop.wait([channel.fileno()], None, loop.until()) == [channel.fileno()]
        stranger.send(b"0")  # a byte of a message (or a hello) on it: thespian's to read
        assert loop.wait([channel.fileno()], None, loop.until()) is None
        assert loop.counters() == {"loop_rounds": 1, "loop_returned_thespian": 1}
    finally:
        stranger.close()
        ours.close()


def test_an_incoming_connection_that_is_due_or_paused_is_left_to_thespian(
    wired: tuple[ChannelLoop, _Transport, list[socket.socket]],
) -> None:
    loop, transport, (*_, channel_peer, channel) = wired
    stranger, ours = socket.socketpair()
    try:
        due = _incoming(ours, 0.0)  # its deadline passed: thespian closes it in its pass
        transport._incomingSockets[ours.fileno()] = due
        channel_peer.send(b"x")
        assert loop.wait([channel.fileno()], None, loop.until()) is None
        paused = _incoming(ours, 60.0)
        paused._pauseUntil = ExpirationTimer(timedelta(seconds=60))  # as ``backoffPause(True)``
        transport._incomingSockets[ours.fileno()] = paused
        stranger.send(b"0")  # thespian does not read it while it pauses: not waited for
        assert loop.wait([channel.fileno()], None, loop.until()) == [channel.fileno()]
        paused._pauseUntil = ExpirationTimer(timedelta(0))  # its pause is over: thespian's
        assert loop.wait([channel.fileno()], None, loop.until()) is None
        assert loop.counters() == {
            "loop_rounds": 1,
            "loop_returned_receiving": 1,
            "loop_returned_thespian": 1,
        }
    finally:
        stranger.close()
        ours.close()


def test_a_closed_socket_of_thespians_is_left_to_its_pass_and_a_raising_wait_counts_as_error(
    wired: tuple[ChannelLoop, _Transport, list[socket.socket]],
) -> None:
    loop, transport, (*_, channel_peer, channel) = wired
    gone = socket.socket()
    gone.close()  # fileno -1: poll.register would raise ValueError
    transport._openSockets["gone"] = SimpleNamespace(socket=gone)
    channel_peer.send(b"x")
    assert loop.wait([channel.fileno()], None, loop.until()) == [channel.fileno()]
    loop.failed()
    assert loop.counters() == {"loop_rounds": 1, "loop_returned_error": 1}


def test_the_pipe_of_a_pass_that_ends_is_reported_at_once_with_what_is_readable(
    wired: tuple[ChannelLoop, _Transport, list[socket.socket]],
) -> None:
    loop, _, (*_, channel_peer, channel) = wired
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"!")
        fds = [channel.fileno(), read_end]
        assert loop.wait(fds, read_end, loop.until()) == [read_end]  # nothing waited for
        channel_peer.send(b"x")
        assert loop.wait(fds, read_end, loop.until()) == [channel.fileno(), read_end]
    finally:
        os.close(read_end)
        os.close(write_end)


# A file's held turn, driven by hand -----------------------------------------------------------


@pytest.fixture
def driven(
    tmp_path: Path, wired: tuple[ChannelLoop, _Transport, list[socket.socket]]
) -> Iterator[Driven]:
    """A SessionFile outside any actor system (``test_file_hot_path``) given the loop over the
    stand-in transport, holding a turn 5 ms at most by a clock that does not move: a wait with
    nothing readable lasts 5 ms, however late the process runs, and the time is never spent
    before a readable socket is seen."""
    made = Driven(tmp_path / "t.jsonl")
    loop, transport, _ = wired
    made.actor.loop = ChannelLoop(loop.manager, transport, hold_ms=5, clock=lambda: 0.0)
    try:
        yield made
    finally:
        made.close()


def test_a_frame_that_arrives_while_a_pass_ends_joins_it_in_the_same_turn_and_sync(
    driven: Driven,
) -> None:
    a, b = driven.channel(), driven.channel()
    loop = driven.actor.loop
    assert loop is not None
    rounds, before = loop.rounds, driven.syncs()
    a.call("a", append_of(driven.path, "a", 1))
    b.call("b", append_of(driven.path, "b", 1))
    first = driven.serving.channels.fds()[1]
    watch = driven.pump([first])  # one delivery: a's frame; b's is read in the held turn
    assert watch is not None and driven.serving.ready_fd not in watch.filenos
    assert loop.rounds == rounds + 1
    assert driven.syncs() == before + 1, "both appends in one fdatasync"
    for peer in (a, b):
        assert isinstance(peer.reply().message, Appended)
    assert driven.readable() == []


def test_a_file_with_a_carried_connection_open_does_not_hold_its_turn(driven: Driven) -> None:
    carried = driven.serving.channels.carried
    driven.actor.receiveMessage(CarriedCalls(driven.path, hello_frame(carried.token)), "member")
    assert carried.connections() == 1
    peer = driven.channel()  # a socket channel too: its frames alone could be waited for
    loop = driven.actor.loop
    assert loop is not None
    waited = dict(loop.counters())
    peer.call("a", append_of(driven.path, "a", 1))
    ready_fd = driven.serving.ready_fd
    watch = driven.pump()
    # The pass waits for thespian (a carried frame may join it), which reports the pipe:
    assert watch is not None and ready_fd in watch.filenos
    driven.pump([ready_fd])
    assert isinstance(peer.reply().message, Appended)
    assert loop.counters() == waited, "no wait: its frames come in thespian's messages"


def test_a_wait_that_raises_gives_the_turn_back_with_the_watch_not_the_message_again(
    driven: Driven, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = driven.actor.loop
    assert loop is not None
    peer = driven.channel()
    peer.call("a", append_of(driven.path, "a", 1))

    def broken_poll(channel: list[int]) -> Any:
        raise ValueError("a descriptor poll cannot take")

    monkeypatch.setattr(loop, "_poller", broken_poll)
    (fd,) = driven.readable()
    watch = driven.actor.receiveMessage(WatchMessage([fd]), None)  # it does not raise
    assert watch is not None and fd in watch.filenos
    assert loop.counters()["loop_returned_error"] == 1
    if driven.serving.ready_fd in watch.filenos:  # the pass of the held ack still ends
        driven.pump([driven.serving.ready_fd])
    assert isinstance(peer.reply().message, Appended)


def test_a_round_that_raises_returns_a_watch_with_the_pipe_so_the_held_ack_still_leaves(
    driven: Driven, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = driven.actor.loop
    assert loop is not None
    peer = driven.channel()
    send_carried = driven.actor.send_carried

    def raising_in_a_round(s: Any) -> None:
        if loop.rounds:  # the first turn ends as ever; the round's end raises
            raise RuntimeError("the end of a round failed")
        send_carried(s)

    monkeypatch.setattr(driven.actor, "send_carried", raising_in_a_round)
    peer.call("a", append_of(driven.path, "a", 1))
    # A turn with nothing held (its watch has no pipe); the frame is read in a round of its
    # hold, whose end raises with the append's ack held:
    watch = driven.pump([])
    assert loop.counters()["loop_returned_error"] == 1
    ready_fd = driven.serving.ready_fd
    assert watch is not None and ready_fd in watch.filenos, "the ack is held: its pass must end"
    monkeypatch.setattr(driven.actor, "send_carried", send_carried)
    driven.pump([ready_fd])
    assert isinstance(peer.reply().message, Appended)


# The real thing ---------------------------------------------------------------------------


def test_a_direct_clients_cycles_take_thespian_passes_only_with_the_loop_off(
    held: Service, off: Service, transcript: Path
) -> None:
    with connect(held.address) as sl:
        cycles(sl, transcript)  # the channel opened, the file warm
        before = counters(sl, transcript)
        cycles(sl, transcript, CYCLES)
        after = counters(sl, transcript)
    # Three frames a cycle (acquire, append, release), served in the file's turn: thespian
    # delivers the status queries and little else.
    assert grew(after, before, "loop_rounds") >= 2 * CYCLES
    assert grew(after, before, "deliveries") <= CYCLES // 4
    assert grew(after, before, "loop_returned_held") == 0

    other = transcript.with_name(f"off-{transcript.name}")
    with connect(off.address) as sl:
        cycles(sl, other)
        before = counters(sl, other)
        cycles(sl, other, CYCLES)
        after = counters(sl, other)
    assert grew(after, before, "deliveries") >= 2 * CYCLES, "a pass for every frame"
    assert after["loop_rounds"] == 0
    assert (
        records_of(transcript) == records_of(other) == [f'{{"n":{n}}}' for n in range(2 * CYCLES)]
    )


def test_a_message_for_a_file_holding_its_turn_is_answered_at_once(
    held: Service, transcript: Path
) -> None:
    with connect(held.address) as sl:
        lane = sl.lane("agent")
        lease = lane.acquire(transcript, purpose="write")
        assert lease is not None
        before = counters(sl, transcript)
        for n in range(5):
            # The append is answered in a turn that then waits for the channel again, up to a
            # second; the status query (gateway, Registry, then a thespian message to the file)
            # ends that wait: it is answered before the next frame is sent.
            lease.append({"n": n})
            counters(sl, transcript)
        after = counters(sl, transcript)
        lease.release()
    # Each query ended a wait of the file's (or came while its answer's send was still in
    # flight, which ends a turn too): the counters say why each turn went back, and none was
    # the hold running out (a second: the client waits for each answer before it sends on,
    # so a missed message would have left the file waiting in its hold that long).
    assert grew(after, before, "loop_returned_thespian") >= 1
    assert grew(after, before, "loop_returned_held") == 0
    assert (
        grew(after, before, "loop_returned_thespian") + grew(after, before, "loop_returned_sending")
        >= 5
    )
    assert records_of(transcript) == [f'{{"n":{n}}}' for n in range(5)]


def test_a_strangers_idle_connection_to_the_files_port_does_not_turn_the_loop_off(
    held: Service, roots: Path
) -> None:
    """Any local user may connect to a file's thespian port and say nothing (it has
    ``HELLO_DEADLINE_S`` to prove the key, and may connect again): thespian keeps the
    connection among its incoming sockets, which the loop waits for as thespian would."""
    transcript = roots / "stranger.jsonl"  # a short name: the whole of it in the title
    with connect(held.address) as sl:
        cycles(sl, transcript)  # the channel opened, the file warm
        system = held.running.system
        titles = {p: procfs.command_line(p) for p in file_processes(system)}
        (pid,) = [p for p, title in titles.items() if title.endswith(f"/{transcript.name}")]
        ports = [p for _, p, owner in system.listening_addresses() if owner == pid]
        strangers = [socket.create_connection(("127.0.0.1", port)) for port in ports]
        try:
            # thespian accepts them in its next pass (the listener readable ends a hold)
            cycles(sl, transcript, CYCLES)
            before = counters(sl, transcript)
            cycles(sl, transcript, 2 * CYCLES)
            after = counters(sl, transcript)
            # and a message still ends a hold at once while the stranger waits
            lease = sl.lane("agent").acquire(transcript, purpose="write")
            assert lease is not None
            n = 3 * CYCLES
            for _ in range(5):
                lease.append({"n": n})
                n += 1
                counters(sl, transcript)
            last = counters(sl, transcript)
            # An append answered in the file's turn, which then holds it for the channel: a
            # byte on the stranger's connection (not the hello's magic) ends that hold at once,
            # thespian reads it and closes the connection. Unless the turn went back before
            # the byte came (the file sent a message of its own: ``sending``), then thespian
            # read it in its own pass: new strangers, and again (bounded).
            for attempt in range(5):
                if attempt:
                    strangers += [socket.create_connection(("127.0.0.1", p)) for p in ports]
                    for _ in range(5):  # thespian accepts them in its next pass
                        lease.append({"n": n})
                        n += 1
                        counters(sl, transcript)
                    last = counters(sl, transcript)
                lease.append({"n": n})
                n += 1
                for stranger in strangers[-len(ports) :]:
                    stranger.sendall(b"X")
                for stranger in strangers[-len(ports) :]:
                    stranger.settimeout(60.0)
                    with contextlib.suppress(ConnectionResetError):
                        assert stranger.recv(1) == b""
                refused = counters(sl, transcript)
                assert grew(refused, last, "loop_returned_held") == 0, "the byte unseen"
                if grew(refused, last, "loop_returned_thespian") >= 1:
                    break
            lease.release()
        finally:
            for stranger in strangers:
                stranger.close()
    assert ports, "the file's thespian port"
    assert grew(refused, last, "loop_returned_thespian") >= 1, "no hold was ended by the byte"
    assert grew(after, before, "loop_rounds") >= 2 * CYCLES
    assert grew(after, before, "deliveries") <= CYCLES // 4
    assert grew(last, before, "loop_returned_held") == 0
    assert records_of(transcript) == [f'{{"n":{k}}}' for k in range(n)]


def test_a_leases_expiry_fires_on_time_while_its_holder_keeps_the_file_busy(
    expiring: Service, transcript: Path
) -> None:
    with connect(expiring.address) as sl:
        lease = sl.lane("agent").acquire(transcript, purpose="write")
        assert lease is not None
        before = counters(sl, transcript)
        written = 0
        with pytest.raises((LeaseRevoked, UnknownOutcome)):
            for n in range(100_000):  # bounded; max_hold_ms (400) ends it long before
                lease.append({"n": n})
                written += 1
        assert lease.revoked == "max_hold"
        after = counters(sl, transcript)
    assert written > 0
    assert grew(after, before, "revoked_max_hold") == 1
    # The wakeup was due while the file served the appends in its turn: the turn went back for
    # it, not when the hold ran out.
    assert grew(after, before, "loop_returned_timer") >= 1
    assert grew(after, before, "loop_returned_held") == 0
    assert grew(after, before, "loop_rounds") >= written // 2
    assert len(records_of(transcript)) == written
