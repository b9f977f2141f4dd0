"""Authenticated thespian frames: a stranger's pickle runs nowhere, the service keeps serving.

The attack is the one in issue 12: a pickle whose ``__reduce__`` creates a marker file, framed
as thespian frames it (``b"%d>" % len(p) + p``), sent to every TCP listener of a live service
and of this (the supervisor's) process. As root it is also sent from a child that has given
up root (``setuid(65534)``) first, so the attacker is another local user.
"""

from __future__ import annotations

import base64
import contextlib
import os
import pickle
import select
import socket
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from sessionlane.actors import procfs
from sessionlane.system.client import connect
from sessionlane.system.config import load_settings
from sessionlane.system.runtime import admin_fork, connection_auth, launch, transport_auth
from sessionlane.system.runtime.launch import PingActor, TcpSystem
from sessionlane.system.runtime.service import Service, ServiceError, embedded_service
from sessionlane.system.runtime.zygote import PARKED_TITLE

ASK_TIMEOUT = 10.0
REPLY_TIMEOUT_S = 10.0
NOBODY = 65534


class Marker:
    """Unpickling this creates ``path``: proof that a receiver unpickled our bytes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def thespian_frame(payload: bytes) -> bytes:
    """Framed as thespian 4.0.1's streamBuffer frames a payload."""
    return b"%d>" % len(payload) + payload


def malicious_pickle(marker: Path, sender: Any = None) -> bytes:
    """``(sender, message)`` as thespian pickles it, the message creating ``marker``."""
    return pickle.dumps((sender, Marker(str(marker))))


def send_frame(host: str, port: int, frame: bytes) -> bytes:
    """Send one frame; what the receiver answered before it closed (``b""``: nothing)."""
    with socket.create_connection((host, port), timeout=REPLY_TIMEOUT_S) as sock:
        sock.sendall(frame)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                answer += chunk
        return answer


def own_listeners() -> list[tuple[str, int]]:
    """The TCP listeners this process holds: the supervisor's thespian endpoint(s)."""
    mine = procfs.socket_inodes(os.getpid())
    return sorted(addr for inode, addr in procfs.listening_tcp().items() if inode in mine)


@pytest.fixture
def markers() -> Iterator[Path]:
    """A directory any uid may create markers in: a missing marker is never a permission error."""
    path = Path(tempfile.mkdtemp(prefix="sessionlane-markers-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        for entry in path.iterdir():
            entry.unlink()
        path.rmdir()


def busy_service_targets(service: Service, root: Path) -> list[tuple[str, int]]:
    """Every TCP listener of the service's group (two files active) and of this process."""
    with connect(service.address) as client:
        lane = client.lane("warm")
        for name in ("a.jsonl", "b.jsonl"):
            with lane.lease(str(root / name)) as lease:
                assert lease is not None
                lease.append({"warm": name})
    running = service.running
    assert running is not None
    group = [(host, port) for host, port, _ in running.system.listening_addresses()]
    return sorted({*group, *own_listeners()})


def attack(
    targets: list[tuple[str, int]], markers: Path, skip_reply: set[int]
) -> tuple[dict[int, bytes], list[socket.socket]]:
    """Send each target a marker pickle. The answer of each by port, and the connections to
    ``skip_reply`` ports, whose answers come later: the gateway's (msgpack, not thespian) and
    this process's own endpoint, which only reads while the supervisor calls into it."""
    answers, pending = {}, []
    for host, port in targets:
        frame = thespian_frame(malicious_pickle(markers / f"pwned-{port}"))
        if port in skip_reply:
            sock = socket.create_connection((host, port), timeout=REPLY_TIMEOUT_S)
            sock.sendall(frame)
            pending.append(sock)
        else:
            answers[port] = send_frame(host, port, frame)
    return answers, pending


def as_nobody(targets: list[tuple[str, int]], markers: Path, skip_reply: set[int]) -> None:
    """Run :func:`attack` in a child that gave up root first; it proves it can write markers."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            (markers / "nobody-can-write").touch()
            _, pending = attack(targets, markers, skip_reply)
            for sock in pending:
                sock.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged attacker failed"
    assert (markers / "nobody-can-write").stat().st_uid == NOBODY


def parked_ports(service: Service) -> set[int]:
    """The actor ports of the service's parked children (bound ahead, not read yet)."""
    running = service.running
    assert running is not None
    return {
        port
        for _, port, pid in running.system.listening_addresses()
        if PARKED_TITLE in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    }


def drive_until_readable(service: Service, socks: list[socket.socket]) -> None:
    """Let the supervisor's endpoint run (it reads only inside calls into the actor system,
    a frame's worth per pass) until each socket has its answer or was closed."""
    for _ in range(100):
        assert service.healthy()
        if all(select.select([sock], [], [], 0)[0] for sock in socks):
            return
    raise AssertionError("the supervisor's endpoint never answered or closed")


def closed_without_reply(sock: socket.socket) -> bool:
    with sock:
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                answer += chunk
        return answer == b""


@pytest.mark.tcp
@pytest.mark.parametrize("attacker", ["same user", "another user"])
def test_a_strangers_pickle_on_every_listener_runs_nothing_and_the_service_keeps_serving(
    tmp_path: Path, markers: Path, attacker: str
) -> None:
    if attacker == "another user" and os.geteuid() != 0:
        pytest.skip("switching to another uid needs root")
    root = tmp_path / "root"
    root.mkdir()
    # An earlier test's actor system whose shutdown hung may have left this process's own
    # thespian endpoint listening (and resetting what reaches it): not this service's.
    stale = set(own_listeners())
    with embedded_service([str(root)], log_file=tmp_path / "actors.log") as service:
        targets = [t for t in busy_service_targets(service, root) if t not in stale]
        gateway_port = int(service.address.rsplit(":", 1)[1])
        supervisor = {port for host, port in own_listeners() if (host, port) not in stale}
        # admin, logger, registry, gateway (thespian and client ports), 2 files, supervisor
        assert len(targets) >= 7, targets

        # A parked child's actor port is bound ahead (system/runtime/prestart.py) and read only
        # once the child is a file's actor: its answer comes when a new file makes it one.
        parked = parked_ports(service)
        later = {gateway_port, *supervisor, *parked}
        parked_socks: list[socket.socket] = []
        if attacker == "same user":
            answers, pending = attack(targets, markers, later)
            assert answers and set(answers.values()) == {b""}, "closed without a reply"
            supervisor_socks = [s for s in pending if s.getpeername()[1] in supervisor]
            parked_socks = [s for s in pending if s.getpeername()[1] in parked]
            drive_until_readable(service, supervisor_socks)
            assert all(closed_without_reply(sock) for sock in supervisor_socks)
            for sock in pending:
                if sock not in parked_socks:
                    sock.close()
        else:
            as_nobody(targets, markers, later)
            assert service.healthy()
        with (
            connect(service.address) as client,
            client.lane("next").lease(str(root / "c.jsonl")) as lease,
        ):
            assert lease is not None  # served by the child that was parked
            lease.append({"after": "attack"})
        for sock in parked_socks:
            assert select.select([sock], [], [], REPLY_TIMEOUT_S)[0], "never read"
            assert closed_without_reply(sock)

        assert not list(markers.glob("pwned-*")), "a listener unpickled the stranger's frame"
        with (
            connect(service.address) as client,
            client.lane("after").lease(str(root / "a.jsonl")) as lease,
        ):
            assert lease is not None
            lease.append({"after": "attack"})
    assert (root / "a.jsonl").read_text().count("\n") == 2


@pytest.fixture
def tcp(tmp_path: Path) -> Iterator[TcpSystem]:
    system = launch.start_tcp_system(log_file=tmp_path / "logs" / "actors.log")
    try:
        yield system
    finally:
        system.stop()


def actor_port(system: TcpSystem, pid: int) -> int:
    (port,) = [port for _, port, owner in system.listening_addresses() if owner == pid]
    return port


def sealed(marker: Path, actor: Any, *, sender: bytes, seq: int) -> bytes:
    """A frame sealed with this process's key, as an endpoint of ours would send it (from
    ``actor``: thespian kills an actor that gets a frame naming no sender)."""
    key = transport_auth._mac_key
    assert key is not None
    body = malicious_pickle(marker, actor)
    return transport_auth._sealed_frame(transport_auth._Hmac(key), sender, seq, body)


def our_hello() -> bytes:
    """What an endpoint of ours opens a connection with (a fresh nonce each call)."""
    key = transport_auth._mac_key
    assert key is not None
    return connection_auth.hello(key)


@pytest.mark.tcp
def test_a_wrong_or_truncated_mac_or_another_services_secret_is_dropped_and_a_replay_too(
    tcp: TcpSystem, markers: Path
) -> None:
    actor = tcp.asys.createActor(PingActor)
    pid = tcp.asys.ask(actor, "where", ASK_TIMEOUT)[2]
    port = actor_port(tcp, pid)
    marker = markers / "pwned"
    sender = os.urandom(8)

    good = sealed(marker, actor, sender=sender, seq=1)
    payload = good[good.index(b">") + 1 :]
    flipped = payload[:5] + bytes([payload[5] ^ 1]) + payload[6:]
    other = os.urandom(32)
    forged = [
        our_hello() + thespian_frame(flipped),  # valid length, wrong MAC
        our_hello() + thespian_frame(payload[16:]),  # MAC truncated to half
        our_hello() + thespian_frame(payload[:20]),  # shorter than a MAC
        our_hello() + b"x" * 64,  # no length header at all
        transport_auth.connection_hello(other)
        + transport_auth.authenticated_frame(
            (None, Marker(str(marker))), other, sender=sender, seq=1
        ),  # another service's secret
        good,  # our frame, but no hello first
        transport_auth.connection_hello(other) + good,  # our frame after another key's hello
    ]
    for frame in forged:
        assert send_frame("127.0.0.1", port, frame) == b"", "closed without a reply"
        assert not marker.exists()
        assert tcp.asys.ask(actor, "still there", ASK_TIMEOUT)[:2] == ("pong", "still there")

    # The control: the same bytes under our key are accepted (so the MAC is what stopped the
    # others), once. Replayed, on a new connection, they are dropped.
    with socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT_S) as sock:
        opening = our_hello()
        sock.sendall(opening + good)
        assert sock.recv(4096) != b"", "acknowledged (and the connection kept for reuse)"
    assert marker.exists()
    marker.unlink()
    assert send_frame("127.0.0.1", port, our_hello() + good) == b""
    assert send_frame("127.0.0.1", port, opening) == b"", "a replayed hello is refused"
    assert not marker.exists(), "a replayed frame was unpickled"
    assert tcp.asys.ask(actor, "after", ASK_TIMEOUT)[:2] == ("pong", "after")

    thespian_log = tcp.log_file.with_name("actors.thespian.log").read_text()
    dropped = [
        line
        for line in thespian_log.splitlines()
        if f"p{pid} " in line and "dropped an unauthenticated thespian frame" in line
    ]
    assert len(dropped) == 1, "logged once per peer host and minute, not per frame"
    assert "from 127.0.0.1:" in dropped[0]


@pytest.mark.tcp
def test_no_process_of_the_system_holds_a_socket_of_the_process_that_started_it(
    tcp: TcpSystem,
) -> None:
    actor = tcp.asys.createActor(PingActor)
    assert tcp.asys.ask(actor, "hello", ASK_TIMEOUT) is not None
    mine = procfs.socket_inodes(os.getpid())
    assert own_listeners(), "this process has its own thespian endpoint"

    for pid in tcp.members():
        assert not procfs.socket_inodes(pid) & mine, f"member {pid} inherited our sockets"
    own_ports = {port for _, port in own_listeners()}
    assert not own_ports & {port for _, port, _ in tcp.listening_addresses()}


@pytest.mark.tcp
def test_the_logger_does_not_hold_the_admins_listening_socket(tcp: TcpSystem) -> None:
    members = tcp.members()
    assert tcp.admin_pid in members and len(members) == 2, "the admin and its logger only"
    (logger,) = [pid for pid in members if pid != tcp.admin_pid]
    admin_listeners = {
        inode
        for inode, (_, port) in procfs.listening_tcp().items()
        if port == tcp.admin_port and inode in procfs.socket_inodes(tcp.admin_pid)
    }
    assert admin_listeners, "the admin listens on its port"
    assert not procfs.socket_inodes(logger) & admin_listeners
    assert tcp.asys.ask(tcp.asys.createActor(PingActor), "logs", ASK_TIMEOUT) is not None


def test_a_sender_counter_is_accepted_once_even_out_of_order_but_not_below_the_window() -> None:
    window = transport_auth._ReplayWindow()
    a, b = b"a" * 8, b"b" * 8
    assert window.accept(a, 5) and window.accept(a, 3) and window.accept(a, 4)
    assert not window.accept(a, 3) and not window.accept(a, 5)
    assert window.accept(b, 3), "counters are per sender"
    top = 5 + transport_auth.REPLAY_WINDOW
    assert window.accept(a, top)
    assert not window.accept(a, 5), "seen, and now below the window"
    assert not window.accept(a, 1), "never seen, but below the window: refused"
    assert window.accept(a, top - 1)


def test_frames_from_an_endpoint_of_ours_round_trip_and_thespians_plain_frames_do_not() -> None:
    from thespian.system.transport import TCPTransport, streamBuffer

    launch.secure_transport("127.0.0.1")
    buffer = TCPTransport.ReceiveBuffer(TCPTransport.serializer.loads)
    buffer.addMore(streamBuffer.toSendBuffer((None, "hello" * 20)))
    assert buffer.rejected == "bad mac" and buffer.completed() is None

    ack = TCPTransport.ReceiveBuffer(TCPTransport.serializer.loads)
    ack.addMore(TCPTransport.ackMsg)
    assert ack.completed() == ("ACK", b"")
    assert TCPTransport.ackMsg != streamBuffer.ackMsg, "the ACK thespian sends carries a MAC"


@pytest.mark.parametrize("patch", [transport_auth, admin_fork])
def test_the_patches_fail_closed_on_another_thespian_version(
    monkeypatch: pytest.MonkeyPatch, patch: Any, tmp_path: Path
) -> None:
    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: "4.0.2" if name == "thespian" else real(name)
    )
    if patch is transport_auth:
        monkeypatch.setattr(transport_auth, "_mac_key", None)
    else:
        monkeypatch.setattr(admin_fork, "_installed", False)

    with pytest.raises(RuntimeError, match=r"thespian 4\.0\.2 is installed"):
        patch.install()
    with pytest.raises(RuntimeError, match=r"thespian 4\.0\.2 is installed"):
        launch.start_tcp_system(log_file=tmp_path / "never.log")


def test_the_authentication_fails_closed_if_thespian_moved_what_it_patches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from thespian.system.transport import TCPTransport

    monkeypatch.setattr(transport_auth, "_mac_key", None)
    monkeypatch.setattr(TCPTransport, "ReceiveBuffer", object)
    with pytest.raises(RuntimeError, match=r"cannot apply \(TCPTransport.ReceiveBuffer"):
        transport_auth.install()


@pytest.mark.parametrize("moved", ["_acceptNewIncoming", "_handleReadableIncoming", "_next_XMIT_1"])
def test_the_connection_hello_fails_closed_if_thespian_moved_what_it_patches(
    monkeypatch: pytest.MonkeyPatch, moved: str
) -> None:
    from thespian.system.transport import TCPTransport

    monkeypatch.setattr(transport_auth, "_mac_key", None)
    monkeypatch.setattr(TCPTransport.TCPTransport, moved, lambda self, *args: None)
    with pytest.raises(RuntimeError, match=rf"cannot apply \(.*TCPTransport\.{moved}"):
        transport_auth.install()


def test_a_second_secret_in_one_process_is_refused_and_a_short_one_too() -> None:
    launch.secure_transport("127.0.0.1")
    with pytest.raises(RuntimeError, match="another secret"):
        transport_auth.install(os.urandom(32))
    with pytest.raises(ValueError, match="at least 32 bytes"):
        transport_auth.install(b"short")
    transport_auth.install()  # the one installed: harmless


def test_a_service_authenticates_with_its_key_file_and_a_key_that_became_unusable_stops_it(
    tmp_path: Path,
) -> None:
    key = tmp_path / "cluster.key"
    secret = os.urandom(32)
    key.write_text(base64.b64encode(secret).decode())
    key.chmod(0o600)
    settings, _ = load_settings(
        env={}, overrides={"roots": [str(tmp_path)], "cluster_key_file": str(key)}
    )
    service = Service(settings)
    assert service.transport_secret() == {"secret": secret, "authenticate": True}

    key.chmod(0o644)  # before a restart
    with pytest.raises(ServiceError, match="cluster_key_file"):
        service.transport_secret()

    trusted, _ = load_settings(
        env={}, overrides={"roots": [str(tmp_path)], "trusted_network": True}
    )
    assert Service(trusted).transport_secret() == {"secret": None, "authenticate": False}
    default, _ = load_settings(env={}, overrides={"roots": [str(tmp_path)]})
    assert Service(default).transport_secret() == {"secret": None, "authenticate": True}
