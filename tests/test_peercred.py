"""``sessionlane.system.gateway.peercred``: the table parsing on literal text, and real connections
of real users.

The root-only tests fork a child that becomes uid 65534 before it opens its socket, so the
kernel's answer is checked against a peer that really is someone else.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import shutil
import socket
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessionlane.system.gateway import peercred

STRANGER = 65534
needs_linux = pytest.mark.skipif(sys.platform != "linux", reason="peer owners are Linux-only")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")

# /proc/net/tcp as the kernel prints it: a listener on 127.0.0.1:7420, one accepted
# connection (our end, then the client's end, owned by uid 1000), and a TIME_WAIT leftover.
TABLE = b"""\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1CFC 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1
   1: 0100007F:1CFC 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4243 1
   2: 0100007F:D431 0100007F:1CFC 01 00000000:00000000 00:00000000 00000000  1000        0 4244 1
   3: 0100007F:D432 0100007F:1CFC 06 00000000:00000000 03:00000F9F 00000000     0        0 0 3
"""
SERVICE = peercred.proc_address(ipaddress.ip_address("127.0.0.1"), 7420)
CLIENT = peercred.proc_address(ipaddress.ip_address("127.0.0.1"), 0xD431)


@pytest.mark.skipif(sys.byteorder != "little", reason="the literal table is a little-endian one")
def test_addresses_are_printed_as_proc_net_tcp_prints_them() -> None:
    assert SERVICE == b"0100007F:1CFC"
    v6 = peercred.proc_address(ipaddress.ip_address("::1"), 7420)
    assert v6 == b"00000000000000000000000001000000:1CFC"


@pytest.mark.skipif(sys.byteorder != "little", reason="the literal table is a little-endian one")
def test_the_owner_is_the_uid_on_the_line_of_the_peers_end_not_ours() -> None:
    assert peercred.owner_in_table(TABLE, CLIENT, SERVICE) == 1000
    assert peercred.owner_in_table(TABLE, SERVICE, CLIENT) == 0, "our own end is ours"


@pytest.mark.skipif(sys.byteorder != "little", reason="the literal table is a little-endian one")
def test_a_time_wait_line_or_no_line_is_unknown_never_uid_0() -> None:
    gone = peercred.proc_address(ipaddress.ip_address("127.0.0.1"), 0xD432)
    assert peercred.owner_in_table(TABLE, gone, SERVICE) is None
    absent = peercred.proc_address(ipaddress.ip_address("127.0.0.1"), 0xD433)
    assert peercred.owner_in_table(TABLE, absent, SERVICE) is None
    assert peercred.owner_in_table(b"", CLIENT, SERVICE) is None


def test_a_sock_diag_error_is_not_found_for_enoent_and_a_fallback_otherwise() -> None:
    def error_reply(code: int) -> bytes:
        return struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -code) + bytes(16)

    assert peercred._parse_diag_reply(error_reply(errno.ENOENT), b"") is None
    assert peercred._parse_diag_reply(error_reply(errno.EINVAL), b"") is peercred._NO_DIAG
    assert peercred._parse_diag_reply(b"short", b"") is peercred._NO_DIAG


def test_only_linux_identifies_peers() -> None:
    assert peercred.identifies_peers("linux")
    assert not peercred.identifies_peers("darwin")
    assert not peercred.identifies_peers("win32")


# Real sockets --------------------------------------------------------------------------------


@contextlib.contextmanager
def listener(family: int, host: str) -> Iterator[socket.socket]:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(8)
        yield sock
    finally:
        sock.close()


def accepted_from(server: socket.socket, host: str) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection((host, server.getsockname()[1]), timeout=5)
    conn, _ = server.accept()
    return client, conn


@needs_linux
@pytest.mark.parametrize(
    ("family", "bind", "connect"),
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
        (socket.AF_INET6, "::1", "::1"),
        (socket.AF_INET6, "::", "127.0.0.1"),  # an IPv4 client on a dual-stack listener
    ],
    ids=["ipv4", "ipv6", "ipv4-mapped"],
)
@pytest.mark.parametrize("via", ["sock_diag", "proc"])
def test_a_loopback_peer_of_our_own_user_is_reported_as_us(
    family: int, bind: str, connect: str, via: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if via == "proc":
        monkeypatch.setattr(peercred, "_diag_lookup", lambda *a: peercred._NO_DIAG)
    with listener(family, bind) as server:
        client, conn = accepted_from(server, connect)
        with client, conn:
            assert peercred.peer_uid(conn) == os.geteuid()


@needs_linux
def test_a_tcp_peer_that_is_not_a_socket_here_is_unknown() -> None:
    with listener(socket.AF_INET, "127.0.0.1") as server:
        local = server.getsockname()
        assert peercred.tcp_peer_uid(("127.0.0.1", 1), (local[0], local[1])) is None
        assert peercred.tcp_peer_uid(("192.0.2.1", 40000), (local[0], local[1])) is None


@needs_linux
def test_a_unix_peer_is_reported_by_so_peercred() -> None:
    with tempfile.TemporaryDirectory(prefix="sl-", dir="/tmp") as tmp:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with server:
            server.bind(f"{tmp}/s")
            server.listen(1)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(f"{tmp}/s")
            conn, _ = server.accept()
            with client, conn:
                assert peercred.peer_uid(conn) == os.geteuid()


def stranger_connects(address: str | tuple[str, int], family: int) -> int:
    """Fork a child that becomes uid 65534, then connects to ``address`` and waits; its pid."""
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, only os._exit
        code = 1
        try:
            os.setgid(STRANGER)
            os.setuid(STRANGER)
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(address)
            sock.recv(1)  # until the parent closes its end
            code = 0
        finally:
            os._exit(code)
    return pid


def reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.kill(pid, 9)
        os.waitpid(pid, 0)


@needs_linux
@needs_root
@pytest.mark.parametrize("via", ["sock_diag", "proc"])
def test_a_tcp_peer_running_as_another_user_is_reported_as_that_user(
    via: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if via == "proc":
        monkeypatch.setattr(peercred, "_diag_lookup", lambda *a: peercred._NO_DIAG)
    with listener(socket.AF_INET, "127.0.0.1") as server:
        server.settimeout(10)
        pid = stranger_connects(("127.0.0.1", server.getsockname()[1]), socket.AF_INET)
        try:
            conn, _ = server.accept()
            with conn:
                assert peercred.peer_uid(conn) == STRANGER
        finally:
            reap(pid)


@needs_linux
@needs_root
def test_a_unix_peer_running_as_another_user_is_reported_as_that_user() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="sl-", dir="/tmp"))
    try:
        tmp.chmod(0o755)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with server:
            server.bind(str(tmp / "s"))
            (tmp / "s").chmod(0o666)
            server.listen(1)
            server.settimeout(10)
            pid = stranger_connects(str(tmp / "s"), socket.AF_UNIX)
            try:
                conn, _ = server.accept()
                with conn:
                    assert peercred.peer_uid(conn) == STRANGER
            finally:
                reap(pid)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
