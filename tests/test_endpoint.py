"""The one framed-socket endpoint (``sessionlane.actors.endpoint``), on real Unix socket pairs.

Unix stream sockets hand data over synchronously: once ``sendall`` returned, the bytes are
readable on the other end, so nothing here waits on time.
"""

from __future__ import annotations

import errno
import secrets
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from sessionlane.actors.endpoint import AcceptBackoff, Acceptor, FramedSocket, connect_unix
from sessionlane.messages.codec import HEADER


def framed(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield ours, theirs
    ours.close()
    theirs.close()


def test_a_read_takes_at_most_its_budget_and_leaves_the_rest_for_the_next_wake_up(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    end = FramedSocket(ours, 1 << 20, read_budget=1000)
    frames = [framed(bytes([i]) * 400) for i in range(5)]
    theirs.sendall(b"".join(frames))
    first = end.read()
    assert first.received <= 1000 and len(first.bodies) == 2
    rest: list[bytes] = []
    while len(first.bodies) + len(rest) < 5:
        rest += end.read().bodies
    assert first.bodies + rest == [bytes([i]) * 400 for i in range(5)]


def test_before_its_first_frame_is_whole_a_peer_cannot_make_it_buffer_more_than_that_frame(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    end = FramedSocket(ours, 1 << 20, first_frame=100)
    theirs.sendall(framed(b"h" * 100) + framed(b"x" * 50_000))
    got = end.read()
    assert got.bodies == [b"h" * 100]
    assert got.received == HEADER.size + 100, "nothing past the first frame until it is judged"
    assert end.read().bodies == [b"x" * 50_000], "then the frame limit applies"


def test_a_first_frame_over_its_cap_is_refused_from_its_header_alone(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    end = FramedSocket(ours, 1 << 20, first_frame=100)
    theirs.sendall(HEADER.pack(101) + b"x" * 10)
    got = end.read()
    assert got.bodies == [] and got.too_large is not None
    assert "101 bytes exceeds the 100 allowed here" in got.too_large.detail


def test_the_stream_ending_is_reported_after_the_frames_that_came_before_it(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    end = FramedSocket(ours, 1 << 20)
    theirs.sendall(framed(b"last words"))
    theirs.close()
    bodies: list[bytes] = []
    for _ in range(3):  # a short read may end one wake-up; the end is seen by the next
        got = end.read()
        bodies += got.bodies
        if got.ended is not None:
            break
    assert bodies == [b"last words"]
    assert (got.ended, got.error) == ("connection closed", None)


def test_output_over_the_limit_is_reported_so_the_owner_can_close(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    end = FramedSocket(ours, 1 << 20, max_output=1000)
    assert end.queue(b"x" * 1000)
    assert not end.queue(b"x"), "one byte over"


def test_finish_writes_what_is_queued_without_blocking_then_closes(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    end = FramedSocket(ours, 1 << 20)
    payload = framed(b"e" * (4 << 20))  # far more than a socket buffer holds
    end.queue(payload)
    assert end.finish("refused") is False, "the peer has not read yet: nothing blocks"
    received = bytearray()
    while not end.closed:
        received += theirs.recv(1 << 20)
        end.flush()
    theirs.settimeout(5)
    while chunk := theirs.recv(1 << 20):
        received += chunk
    assert bytes(received) == payload, "every byte, then the close"


def test_a_peer_gone_while_writing_is_reported_by_flush(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    end = FramedSocket(ours, 1 << 20)
    theirs.close()
    end.queue(b"x" * 10)
    error = end.flush()
    assert error is not None and error.errno in (errno.EPIPE, errno.ECONNRESET)
    assert end.out == bytearray()


class _ExhaustedListener:
    """A listening socket's stand-in whose ``accept`` fails for want of descriptors."""

    def __init__(self) -> None:
        self.calls = 0

    def setblocking(self, flag: bool) -> None:
        pass

    def fileno(self) -> int:
        return 99

    def accept(self) -> Any:
        self.calls += 1
        raise OSError(errno.EMFILE, "Too many open files")


def test_an_acceptor_out_of_descriptors_pauses_with_a_growing_back_off() -> None:
    listener = _ExhaustedListener()
    acceptor = Acceptor(listener, budget=64, backoff=AcceptBackoff(first_s=0.05, max_s=2.0))  # type: ignore[arg-type]
    first = acceptor.accept(lambda sock, peer: None)
    assert (first.count, first.pause_s, first.first_pause) == (0, 0.05, True)
    assert acceptor.paused and listener.calls == 1, "no spinning on a listener that stays ready"
    acceptor.resume()
    second = acceptor.accept(lambda sock, peer: None)
    assert (second.pause_s, second.first_pause) == (0.1, False)


def test_an_acceptor_hands_over_each_socket_before_accepting_the_next_and_keeps_its_budget() -> (
    None
):
    name = "sessionlane-test-" + secrets.token_hex(6)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(8)
    peers = [connect_unix(name) for _ in range(3)]
    taken: list[socket.socket] = []
    try:
        acceptor = Acceptor(listener, budget=2)
        first = acceptor.accept(lambda sock, peer: taken.append(sock))
        assert first.count == 2 and len(taken) == 2
        second = acceptor.accept(lambda sock, peer: taken.append(sock))
        assert second.count == 1 and len(taken) == 3
        assert acceptor.accept(lambda sock, peer: taken.append(sock)).count == 0
    finally:
        for sock in [*peers, *taken, listener]:
            sock.close()


def test_connecting_to_a_name_nobody_listens_on_fails_at_once() -> None:
    with pytest.raises(ConnectionRefusedError):
        connect_unix("sessionlane-test-" + secrets.token_hex(6))
