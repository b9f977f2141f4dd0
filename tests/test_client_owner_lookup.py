"""The clients look again for the owner of the service's end of a TCP connection.

``connect`` returns once the client's end of the handshake is done; until the kernel has
processed the client's last handshake packet, the service's end is a request socket that no
table shows with its owner. On a loaded machine a client that looked once then refused a
real service of its own user ("cannot tell which user runs the service"), which a restart
test caught. These tests hold the kernel's answer back for the first looks (the lookup is the
one thing replaced; the service, the socket and the rest of the check are real) and check
that the client waits for it, and still refuses when the owner can never be told.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ports import listen_port
from waiting import eventually

from sessionlane.system.client import Unauthorized, Unavailable, connect, connect_async
from sessionlane.system.client import _sync as sync_client
from sessionlane.system.client._verify import OWNER_LOOKUP_DELAYS, peer_gone
from sessionlane.system.gateway import peercred
from sessionlane.system.runtime.service import embedded_service

pytestmark = pytest.mark.skipif(
    not peercred.identifies_peers(), reason="the owner of a TCP peer is told on Linux only"
)


@pytest.fixture
def address(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "sessions"
    root.mkdir()
    with embedded_service([str(root)], log_file=tmp_path / "actors.log") as svc:
        yield svc.address


def late_owner(monkeypatch: pytest.MonkeyPatch, unknown_for: int) -> list[int | None]:
    """Make the first ``unknown_for`` looks find no owner, as before the handshake settles."""
    real: Callable[..., int | None] = peercred.peer_uid
    seen: list[int | None] = []

    def look(sock: object) -> int | None:
        owner = None if len(seen) < unknown_for else real(sock)
        seen.append(owner)
        return owner

    monkeypatch.setattr(peercred, "peer_uid", look)
    return seen


def test_the_sync_client_waits_for_the_owner_of_a_handshake_still_settling(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = late_owner(monkeypatch, unknown_for=3)
    with connect(address) as sl:
        assert sl.status() is not None
    assert seen[:3] == [None, None, None] and isinstance(seen[3], int), seen


def test_the_async_client_waits_for_the_owner_of_a_handshake_still_settling(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = late_owner(monkeypatch, unknown_for=3)

    async def run() -> None:
        async with connect_async(address) as sl:
            assert await sl.status() is not None

    asyncio.run(run())
    assert seen[:3] == [None, None, None] and isinstance(seen[3], int), seen


def test_an_owner_that_can_never_be_told_is_still_refused_after_a_bounded_wait(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = late_owner(monkeypatch, unknown_for=10**6)
    with pytest.raises(Unauthorized, match="cannot tell which user runs"):
        connect(address).close()
    assert len(seen) == len(OWNER_LOOKUP_DELAYS) + 1
    assert sum(OWNER_LOOKUP_DELAYS) < 0.5


def test_a_connection_the_service_dropped_before_it_was_identified_is_unreachable_not_untrusted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A service killed or restarting as the client connects: the connection is reset or
    closed before its owner could be told. That is ``Unavailable`` (and retried with
    ``reconnect_for``), never ``Unauthorized`` (which says to configure trust)."""
    dropped = threading.Semaphore(0)
    looked: set[int] = set()

    def look(sock: socket.socket) -> None:
        if sock.fileno() not in looked:  # the first look waits for the service's close
            looked.add(sock.fileno())
            assert dropped.acquire(timeout=30)
        return None

    monkeypatch.setattr(peercred, "peer_uid", look)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = f"127.0.0.1:{listener.getsockname()[1]}"

        def drop_each() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                conn.close()  # the service's end is gone before its owner was told
                dropped.release()

        dropper = threading.Thread(target=drop_each, daemon=True)
        dropper.start()
        with pytest.raises(Unavailable, match="closed the connection before it was identified"):
            connect(address).close()
        looked.clear()

        async def run() -> None:
            async with connect_async(address):
                pass  # pragma: no cover - refused before

        with pytest.raises(Unavailable, match="closed the connection before it was identified"):
            asyncio.run(run())
        dropper.join(timeout=10)


def test_peer_gone_tells_a_closed_or_reset_connection_from_a_live_one() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        with socket.create_connection(listener.getsockname()) as live:
            served, _ = listener.accept()
            assert not peer_gone(live)
            served.close()  # its FIN reaches the client's end
            eventually(lambda: peer_gone(live), "the client's end sees the close")


def self_connected_to(port: int) -> socket.socket:
    """A socket connected to itself on loopback ``port``, as a connect to a port nobody
    listens on gets when the kernel happens to pick that same port for the client's end."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", port))
    sock.connect(("127.0.0.1", port))  # TCP's simultaneous open: the socket meets itself
    assert sock.getsockname() == sock.getpeername()
    return sock


@pytest.mark.parametrize("surface", ["sync", "async"])
def test_a_connect_that_met_itself_is_a_refusal_retried_and_frees_the_services_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, surface: str
) -> None:
    """A reconnecting client hitting a restarting service's port in the gap can connect to
    itself: its "service" is then its own user, and it holds the port the service needs. The
    kernel's pick of the client's port is the one thing forced here (first attempt only)."""
    port = listen_port()
    met_itself: list[socket.socket] = []
    if surface == "sync":
        real_dial = sync_client._dial

        def dial(settings: Any) -> socket.socket:
            if met_itself:
                return real_dial(settings)
            met_itself.append(self_connected_to(port))
            return met_itself[0]

        monkeypatch.setattr(sync_client, "_dial", dial)
    else:
        real_open = asyncio.open_connection

        async def open_connection(*args: Any, **kw: Any) -> Any:
            if met_itself:
                return await real_open(*args, **kw)
            met_itself.append(self_connected_to(port))
            return await real_open(sock=met_itself[0])

        monkeypatch.setattr(asyncio, "open_connection", open_connection)

    address = f"tcp://127.0.0.1:{port}"
    outcome: dict[str, Any] = {}

    def connect_and_ask() -> None:
        try:
            if surface == "sync":
                with connect(address, reconnect_for=60) as sl:
                    outcome["status"] = sl.status()
            else:

                async def ask() -> Any:
                    async with await connect_async(address, reconnect_for=60) as sl:
                        return await sl.status()

                outcome["status"] = asyncio.run(ask())
        except Exception as exc:  # the assertion below names it
            outcome["error"] = exc

    client = threading.Thread(target=connect_and_ask)
    client.start()
    try:
        eventually(lambda: met_itself and met_itself[0].fileno() == -1, "the first attempt closed")
        root = tmp_path / "sessions"
        root.mkdir()
        # The port is free again: the service binds it, and the client's retries reach it.
        with embedded_service([str(root)], listen=address, log_file=tmp_path / "a.log"):
            client.join(60)
    finally:
        client.join(60)
    assert "error" not in outcome, outcome
    assert outcome["status"] is not None
