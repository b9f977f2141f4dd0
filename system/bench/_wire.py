"""A lean synchronous wire client and an echo server that speaks the same framing.

The gateway suite measures the gateway, not the Python client's threads: ``FramedClient``
sends one frame and reads until the reply with its id arrives, on the calling thread. The
``EchoServer`` peer is the least a Python server can do per request with the same codec (a
``selectors`` loop in its own process that decodes each frame and answers ``welcome`` or
``alive``), so the gateway's numbers can be read against a floor measured in the same run.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import selectors
import socket
from collections import deque
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any, Self

from sessionlane.messages.codec import FrameReader, decode_reply, decode_request, frame
from sessionlane.messages.wire import Alive, Hello, Keepalive, Reply, Welcome
from sessionlane.system.bench._pool import BenchError
from sessionlane.system.client._core import parse_address

__all__ = ["EchoServer", "FramedClient"]

_RECV_BYTES = 256 * 1024
_MAX_FRAME = 64 * 1024 * 1024
_START_TIMEOUT_S = 30.0
_STOP_S = 2.0


class FramedClient:
    """One connection, one request in flight, replies matched by id (events skipped)."""

    def __init__(self, address: str, *, timeout: float = 60.0) -> None:
        kind, where = parse_address(address)
        if kind != "tcp":
            raise ValueError("the bench client speaks TCP only")
        self.sock = socket.create_connection(where, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = FrameReader(_MAX_FRAME)
        self.bodies: deque[bytes] = deque()
        self.ids = itertools.count(1)
        self.call(Hello(client="sessionlane-bench"))

    def next_id(self) -> int:
        return next(self.ids)

    def call(self, message: Any) -> Reply:
        """Send ``message`` (its ``id`` is replaced) and return the reply with that id."""
        rid = self.next_id()
        self.sock.sendall(frame(message.model_copy(update={"id": rid})))
        while True:
            while self.bodies:
                reply = decode_reply(self.bodies.popleft())
                if reply.id == rid:
                    return reply
            data = self.sock.recv(_RECV_BYTES)
            if not data:
                raise BenchError("the server closed the connection")
            self.bodies.extend(self.reader.feed(data))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class EchoServer:
    """A spawned process answering ``hello`` and ``keepalive`` frames; killed on exit."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._parent, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_echo_main, args=(child,), name="sessionlane-bench-echo", daemon=True
        )
        self.address = ""

    def __enter__(self) -> Self:
        self._proc.start()
        try:
            if not self._parent.poll(_START_TIMEOUT_S):
                raise BenchError("the echo server did not start")
            self.address = f"tcp://127.0.0.1:{self._parent.recv()}"
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(_STOP_S)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(_STOP_S)
        self._parent.close()


def _echo_main(conn: Connection) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    conn.send(listener.getsockname()[1])
    conn.close()
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    readers: dict[socket.socket, FrameReader] = {}
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                client, _ = listener.accept()
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                readers[client] = FrameReader(_MAX_FRAME)
                selector.register(client, selectors.EVENT_READ)
                continue
            data = sock.recv(_RECV_BYTES)
            if not data:
                selector.unregister(sock)
                readers.pop(sock, None)
                sock.close()
                continue
            out = bytearray()
            for body in readers[sock].feed(data):
                request = decode_request(body)
                if isinstance(request, Hello):
                    out += frame(Welcome(id=request.id, server="echo", protocol=1))
                elif isinstance(request, Keepalive):
                    out += frame(Alive(id=request.id))
            sock.sendall(out)
