"""Real actor systems: loopback-only listeners, and stop() that leaves no process behind."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import leftovers
import pytest
from thespian.actors import Actor
from waiting import eventually

from sessionlane.actors import procfs
from sessionlane.system.runtime import launch, loopback
from sessionlane.system.runtime.launch import PingActor, TcpSystem

ASK_TIMEOUT = 10.0


class BlockingActor(Actor):  # type: ignore[misc]
    """Touches the file named by the message, then never returns: a stuck handler."""

    def receiveMessage(self, message: Any, sender: Any) -> None:
        if isinstance(message, str):
            Path(message).touch()
            time.sleep(600)


class WarningActor(Actor):  # type: ignore[misc]
    """Logs the message at WARNING and answers with its pid."""

    def receiveMessage(self, message: Any, sender: Any) -> None:
        if isinstance(message, str):
            logging.getLogger("tests.test_launch").warning("actor says %s", message)
            self.send(sender, os.getpid())


def is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return False
    return text[text.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def own_listeners() -> dict[str, tuple[str, int]]:
    """The LISTEN sockets held by this (the test) process: inode -> (host, port)."""
    inodes = procfs.socket_inodes(os.getpid())
    return {inode: at for inode, at in procfs.listening_tcp().items() if inode in inodes}


def own_listening_hosts() -> list[str]:
    """Hosts of the LISTEN sockets held by this (the test) process."""
    return [host for host, _ in own_listeners().values()]


@pytest.fixture
def tcp(tmp_path: Path) -> Iterator[TcpSystem]:
    system = launch.start_tcp_system(log_file=tmp_path / "logs" / "sessionlane.log")
    try:
        yield system
    finally:
        system.stop()


@pytest.mark.tcp
def test_an_actor_of_a_started_system_answers_and_lives_in_its_process_group(
    tcp: TcpSystem,
) -> None:
    actor = tcp.asys.createActor(PingActor)
    reply = tcp.asys.ask(actor, "hello", ASK_TIMEOUT)

    assert reply is not None and reply[:2] == ("pong", "hello")
    assert reply[2] in tcp.members()
    assert tcp.admin_pid in tcp.members()
    assert tcp.pgid == os.getpgid(tcp.admin_pid) != os.getpgrp()
    assert tcp.alive()


class SelectorProbe(Actor):  # type: ignore[misc]
    """Answers with the selector class its own transport builds on each pass."""

    def receiveMessage(self, message: Any, sender: Any) -> None:
        if message == "selector":
            from thespian.system.transport import TCPTransport

            self.send(sender, TCPTransport.selectors.DefaultSelector.__name__)


@pytest.mark.tcp
def test_actors_select_with_poll_not_a_fresh_epoll_set_per_pass(tcp: TcpSystem) -> None:
    actor = tcp.asys.createActor(SelectorProbe)
    assert tcp.asys.ask(actor, "selector", ASK_TIMEOUT) == "PollSelector"


@pytest.mark.tcp
def test_every_listening_socket_of_the_system_is_on_loopback(tcp: TcpSystem) -> None:
    actors = [tcp.asys.createActor(PingActor) for _ in range(3)]
    actor_pids = {tcp.asys.ask(a, "where", ASK_TIMEOUT)[2] for a in actors}

    listeners = tcp.listening_addresses()

    assert loopback.installed_host() == "127.0.0.1"
    assert (tcp.admin_port, tcp.admin_pid) in {(port, pid) for _, port, pid in listeners}
    assert actor_pids <= {pid for _, _, pid in listeners}, "each actor has its own listener"
    assert {host for host, _, _ in listeners} == {"127.0.0.1"}
    assert set(own_listening_hosts()) <= {"127.0.0.1"}, "the external endpoint too"


def test_the_patch_rebinds_thespians_wildcard_address_to_loopback() -> None:
    from thespian.system.transport.IPBase import TCPv4ActorAddress

    loopback.install()
    address = TCPv4ActorAddress(None, 0, external=True)

    assert address.bindname[0] == "", "thespian still asks for every interface"
    assert address.bindArgs[0][0] == "127.0.0.1", "but binds loopback"
    assert os.environ["THESPIAN_BASE_IPADDR"] == "127.0.0.1"


def test_installing_the_patch_twice_is_harmless_but_a_second_host_is_refused() -> None:
    loopback.install("127.0.0.1")
    loopback.install("127.0.0.1")

    with pytest.raises(RuntimeError, match="already pinned"):
        loopback.install("127.0.0.2")
    with pytest.raises(ValueError, match="IPv4"):
        loopback.install("localhost")
    assert loopback.installed_host() == "127.0.0.1"


def test_the_patch_fails_closed_on_another_thespian_and_pins_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: "4.0.2" if name == "thespian" else real(name)
    )
    monkeypatch.setattr(loopback, "_installed", None)
    monkeypatch.delenv("THESPIAN_BASE_IPADDR", raising=False)
    with pytest.raises(RuntimeError, match=r"bind address but thespian 4\.0\.2 is installed"):
        loopback.install("127.0.0.1")
    assert loopback.installed_host() is None
    assert "THESPIAN_BASE_IPADDR" not in os.environ


@pytest.mark.tcp
def test_stop_leaves_no_process_of_the_system_and_can_be_repeated(tmp_path: Path) -> None:
    system = launch.start_tcp_system(log_file=tmp_path / "sl.log")
    try:
        for _ in range(2):
            system.asys.ask(system.asys.createActor(PingActor), "up?", ASK_TIMEOUT)
        before = system.members()
        assert len(before) >= 4, "admin, logger and two actors"
    finally:
        system.stop()

    assert system.members() == []
    assert not any(is_running(pid) for pid in before)
    assert not system.alive()
    system.stop()


@pytest.mark.tcp
def test_a_picked_admin_port_taken_before_the_admin_binds_it_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A free port is only free when it is looked at: another process may listen on it before
    the admin binds it (seen in CI as thespian's ``InvalidActorAddress``). The race is forced:
    the first port picked is one a socket of this test listens on, and the look that would
    have seen it is skipped."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picks = iter([taken.getsockname()[1]])
        real_pick = launch.free_port
        monkeypatch.setattr(launch, "free_port", lambda host: next(picks, None) or real_pick(host))
        seen = launch._listener_inode
        busy = taken.getsockname()[1]
        monkeypatch.setattr(launch, "_listener_inode", lambda p: None if p == busy else seen(p))
        system = launch.start_tcp_system(log_file=tmp_path / "sl.log")
        try:
            assert system.admin_port != taken.getsockname()[1]
            system.asys.ask(system.asys.createActor(PingActor), "up?", ASK_TIMEOUT)
        finally:
            system.stop()
    assert system.members() == []


@pytest.mark.tcp
def test_stop_after_the_admin_was_killed_still_leaves_nothing(tcp: TcpSystem) -> None:
    actor = tcp.asys.createActor(PingActor)
    actor_pid = tcp.asys.ask(actor, "up?", ASK_TIMEOUT)[2]

    os.kill(tcp.admin_pid, signal.SIGKILL)
    eventually(lambda: not tcp.alive(), "the actor system to stop")
    assert is_running(actor_pid), "thespian leaves the actors running as orphans"

    started = time.monotonic()
    tcp.stop()

    assert time.monotonic() - started < 6.0, "no 10 s wait on the dead admin"
    assert tcp.members() == []
    assert not is_running(actor_pid)


@pytest.mark.tcp
def test_stop_kills_an_actor_stuck_in_its_handler_and_closes_our_endpoint(
    tmp_path: Path,
) -> None:
    ours = own_listeners()  # what earlier tests may have left in this process is not ours
    tcp = launch.start_tcp_system(log_file=tmp_path / "logs" / "sessionlane.log")
    try:
        assert own_listeners().keys() - ours.keys(), "the caller's endpoint listens"
        marker = tmp_path / "handler-entered"
        stuck = tcp.asys.createActor(BlockingActor)
        tcp.asys.tell(stuck, str(marker))
        eventually(marker.exists, "the handler never started")

        started = time.monotonic()
        tcp.stop(timeout=1.0)
    finally:
        tcp.stop()

    assert time.monotonic() - started < 8.0, "shutdown()'s 10 s hang was cut short"
    assert tcp.members() == []
    # The hung shutdown() is abandoned, not the caller's endpoint: a listener left open in
    # this process would keep a dead system's port (and take a stranger's pickles on it).
    assert own_listeners().keys() - ours.keys() == set()


@pytest.mark.tcp
def test_actor_logs_reach_the_log_file_with_process_and_logger_name(tmp_path: Path) -> None:
    log_file = tmp_path / "sl.log"
    with launch.tcp_system(log_file=log_file) as system:
        actor = system.asys.createActor(WarningActor)
        pid = system.asys.ask(actor, "hello-log", ASK_TIMEOUT)

        def logged() -> bool:
            return log_file.exists() and "actor says hello-log" in log_file.read_text()

        eventually(logged, "the line in the log")
    line = next(li for li in log_file.read_text().splitlines() if "hello-log" in li)
    assert f"p{pid} WARNING tests.test_launch: actor says hello-log" in line
    assert Path(os.environ["THESPLOG_FILE"]) == log_file.resolve().with_name("sl.thespian.log")


@pytest.mark.tcp
def test_the_context_manager_stops_the_system_when_the_body_raises(tmp_path: Path) -> None:
    with (
        pytest.raises(KeyError),
        launch.tcp_system(log_file=tmp_path / "sl.log") as system,
    ):
        members = system.members()
        raise KeyError("boom")

    assert members and not any(is_running(pid) for pid in members)


def test_start_refuses_to_attach_to_a_port_already_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        with pytest.raises(RuntimeError, match="already in use"):
            launch.start_tcp_system(port, log_file=tmp_path / "sl.log")


def test_free_port_can_be_bound() -> None:
    port = launch.free_port()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


def test_a_simple_system_runs_actors_in_this_process() -> None:
    asys = launch.simple_system()
    try:
        reply = asys.ask(asys.createActor(PingActor), 7, ASK_TIMEOUT)
    finally:
        asys.shutdown()

    assert reply == ("pong", 7, os.getpid())


@contextlib.contextmanager
def tagged_process(tag: str) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, leftovers.TAG_VARIABLE: tag}
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], env=env, stdin=subprocess.DEVNULL
    )
    try:
        yield child
    finally:
        child.kill()
        child.wait(timeout=10)


def test_leftovers_finds_a_tagged_process_and_kills_it_without_killing_us() -> None:
    tag = f"test-{uuid.uuid4().hex}"
    with tagged_process(tag) as child:
        eventually(
            lambda: any(pid == child.pid for pid, _ in leftovers.find_leftovers(tag)),
            "the tagged child among the leftovers",
        )
        found = leftovers.find_leftovers(tag)
        assert [pid for pid, _ in found] == [child.pid]
        assert "time.sleep(120)" in found[0][1]

        survivors = leftovers.kill_leftovers(found)

        assert survivors == [], "a zombie (not reaped yet) counts as gone"
        assert child.wait(timeout=10) == -signal.SIGKILL
    assert leftovers.find_leftovers(tag) == []


def test_leftovers_cli_fails_when_a_tagged_process_survives(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tag = f"test-{uuid.uuid4().hex}"
    monkeypatch.setenv(leftovers.TAG_VARIABLE, tag)
    with tagged_process(tag) as child:
        eventually(lambda: bool(leftovers.find_leftovers(tag)), "a leftover with the tag")

        assert leftovers.main(["--fail"]) == 1
        assert str(child.pid) in capsys.readouterr().out
        assert leftovers.main([]) == 0


def test_leftovers_cli_without_a_tag_only_prints_a_note(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(leftovers.TAG_VARIABLE, raising=False)

    assert leftovers.main(["--fail", "--kill"]) == 0
    assert "not set" in capsys.readouterr().out
