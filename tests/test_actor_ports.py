"""What a stranger can cost the service's thespian ports (issue 19, findings 1 and 2).

Against ``sessionlane serve`` (``multiprocTCPBase``) held to 1,024 open files, with a lease held,
the attacks hit the Registry's own port from a forked child: where the suite runs as root the
child becomes uid 65534 first (another local user), and the same attacks run as the service's
own user too (who cannot prove the cluster key either: it is in the service's memory only).

* 1,100 idle connections: before, the Registry died of EMFILE and no new file got a lease
  again. Now the connections that have not proven the key are capped and closed; a new file
  still gets a lease and the old lease still appends, during and after the flood.
* A 10 GB frame announced and streamed: before, the Registry buffered 400 MB (quadratically).
  Now it reads at most the 64-byte hello, closes the connection, and its memory stays flat.
"""

from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401 (socket needs it; the child as uid 65534 cannot import it)
import errno
import json
import os
import resource
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ports import listen_port
from processes import RssPeak, rss_kb
from test_serve import Serve as BaseServe
from waiting import eventually

from sessionlane.actors import procfs
from sessionlane.messages.errors import LeaseRevoked, ShuttingDown, Unavailable
from sessionlane.system.client import connect
from sessionlane.system.runtime import connection_auth, launch

pytestmark = [
    pytest.mark.tcp,
    pytest.mark.timeout(180),
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc"),
]

STRANGER = 65534
NOFILE = 1_024
FLOOD = 1_100
ANNOUNCED = b"10000000000>"  # 10 GB, as thespian frames a length
STREAM_LIMIT = 400 * 1024 * 1024
WAIT_S = 60.0

ATTACKERS = [
    "same user",
    pytest.param(
        "another user",
        marks=pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root"),
    ),
]


class Serve(BaseServe):
    """``sessionlane serve`` on a free port, held to ``NOFILE`` open files (hard limit), ready."""

    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "sessions"
        self.root.mkdir()
        self.log = tmp / "serve.log"
        self.listen = f"tcp://127.0.0.1:{listen_port()}"
        args = ["--root", str(self.root), "--listen", self.listen, "--log-file", str(self.log)]
        super().__init__(tmp, *args, nofile=NOFILE)
        self.wait_ready()

    @property
    def address(self) -> str:
        return self.listen

    def thespian_log(self) -> str:
        """thespian's own log, beside the service's: where the transport's warnings go."""
        path = self.log.with_name(self.log.stem + ".thespian.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def members(self) -> list[int]:
        return launch.group_members(self.state["pgid"])

    def admin_pid(self) -> int:
        pid = launch._admin_pid(self.state["admin_port"])
        assert pid is not None
        return pid

    def registry(self) -> tuple[int, int]:
        """The Registry's pid and its own thespian port: the parent of the file actors."""
        admin = self.admin_pid()
        stats = {pid: procfs.stat(pid) for pid in self.members()}
        parents = {s.ppid for s in stats.values() if s is not None} & set(stats) - {admin}
        # The zygote is a parent too for a moment after each activation, while it forks the
        # next file actor ahead: the Registry is the parent that is not the zygote.
        parents = {pid for pid in parents if not _title(pid).startswith("sessionlane: zygote")}
        assert len(parents) == 1, f"one Registry, the file actors' parent: {parents}"
        (pid,) = parents
        listening = procfs.listening_tcp()
        own = procfs.socket_inodes(pid) - procfs.socket_inodes(admin)
        ports = [port for inode, (_, port) in listening.items() if inode in own]
        assert len(ports) == 1, ports
        return pid, ports[0]


def _title(pid: int) -> str:
    """A process's title (its command line as ``ps`` shows it); empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    service = Serve(tmp_path)
    try:
        yield service
    finally:
        service.kill()


class Attacker:
    """A forked child (uid 65534 if asked) that runs ``attack(step)``; ``step(report)`` hands a
    JSON report to the test and waits for :meth:`go` before the attack goes on."""

    def __init__(self, attack: Callable[[Callable[[dict[str, Any]], None]], None], user: str):
        self._reports_r, reports_w = os.pipe()
        go_r, self._go_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: nothing of pytest's from here on, only os._exit
            code = 1
            try:
                os.close(self._reports_r)
                os.close(self._go_w)
                if user == "another user":
                    os.setgroups([])
                    os.setgid(STRANGER)
                    os.setuid(STRANGER)

                def step(report: dict[str, Any]) -> None:
                    os.write(reports_w, json.dumps(report).encode() + b"\n")
                    os.read(go_r, 1)

                attack(step)
                code = 0
            except BaseException as exc:  # report, never return into pytest
                os.write(reports_w, json.dumps({"child_error": repr(exc)}).encode() + b"\n")
            finally:
                os._exit(code)
        os.close(reports_w)
        os.close(go_r)
        self._buffer = b""

    def report(self, seconds: float = WAIT_S) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            assert left > 0, "the attacker reported nothing"
            if select.select([self._reports_r], [], [], left)[0]:
                chunk = os.read(self._reports_r, 65536)
                assert chunk, "the attacker exited without a report"
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        report: dict[str, Any] = json.loads(line)
        assert "child_error" not in report, report["child_error"]
        return report

    def go(self) -> None:
        os.write(self._go_w, b"x")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._go_w)
        os.close(self._reports_r)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


@contextlib.contextmanager
def attacker(
    attack: Callable[[Callable[[dict[str, Any]], None]], None], user: str
) -> Iterator[Attacker]:
    child = Attacker(attack, user)
    try:
        yield child
    finally:
        child.close()


def raise_own_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the test needs {needed} open files (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def new_file_gets_a_lease(serve: Serve, name: str) -> None:
    path = serve.root / name
    with connect(serve.address) as sl, sl.lane(f"new-{name}").lease(str(path)) as lease:
        assert lease is not None, f"{name} got no lease"
        assert lease.append({"new": name}).lines == 1
    assert path.read_text().count("\n") == 1


# Finding 1: 1,100 idle connections -------------------------------------------------------


def flood(port: int) -> Callable[[Callable[[dict[str, Any]], None]], None]:
    def attack(step: Callable[[dict[str, Any]], None]) -> None:
        held, failed = [], []
        for _ in range(FLOOD):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=20))
            except OSError as exc:
                failed.append(exc.errno)
        step({"opened": len(held), "failed": failed})
        # Then: is every one closed by the Registry (evicted, or by the hello deadline)?
        poller = select.poll()  # select() takes no descriptor past 1,023
        by_fd = {sock.fileno(): sock for sock in held}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + 3 * connection_auth.HELLO_DEADLINE_S
        while by_fd and time.monotonic() < deadline:
            for fd, _ in poller.poll(1000):
                try:
                    data = by_fd[fd].recv(64)
                except OSError:
                    data = b""
                if not data:
                    poller.unregister(fd)
                    del by_fd[fd]
        step({"still_open": len(by_fd)})
        for sock in held:
            sock.close()

    return attack


@pytest.mark.parametrize("user", ATTACKERS)
def test_1100_idle_connections_to_the_registry_neither_stop_new_files_nor_a_held_lease(
    serve: Serve, user: str
) -> None:
    raise_own_nofile(FLOOD + 256)
    held_path = serve.root / "held.jsonl"
    with connect(serve.address) as sl:
        lease = sl.lane("holder").acquire(str(held_path))
        assert lease is not None
        lease.append({"n": 1})
        registry, port = serve.registry()
        before_kb, before_cpu = rss_kb(registry), procfs.cpu_seconds([registry])
        with attacker(flood(port), user) as child:
            opened = child.report()
            assert Path(f"/proc/{registry}").exists(), "the Registry died of the flood"
            print(
                f"Registry during the flood: {len(os.listdir(f'/proc/{registry}/fd'))} open"
                f" files, RSS {before_kb / 1024:.1f} -> {rss_kb(registry) / 1024:.1f} MB,"
                f" CPU {procfs.cpu_seconds([registry]) - before_cpu:.2f} s"
            )
            assert opened["opened"] + len(opened["failed"]) == FLOOD
            assert opened["opened"] >= NOFILE, "more connections than the Registry has files"

            new_file_gets_a_lease(serve, "during.jsonl")
            assert lease.append({"n": 2}).lines == 1, "the held lease appends during the flood"
            child.go()
            assert child.report(4 * connection_auth.HELLO_DEADLINE_S)["still_open"] == 0, (
                "every connection that did not prove the key was closed"
            )
            child.go()
        assert serve.registry()[0] == registry, "the Registry survived"
        new_file_gets_a_lease(serve, "after.jsonl")
        assert lease.append({"n": 3}).lines == 1, "and after it"
        lease.release()
    assert [json.loads(line)["n"] for line in held_path.read_text().splitlines()] == [1, 2, 3]
    thespian_log = serve.thespian_log()
    assert "sessionlane: closed" in thespian_log and "had not proven the key" in thespian_log
    assert "Thespian__UpdateWork" not in thespian_log
    assert "No usable temporary directory" not in thespian_log


# Finding 2: a 10 GB frame announced ------------------------------------------------------


def big_frame(port: int, opening: bytes) -> Callable[[Callable[[dict[str, Any]], None]], None]:
    def attack(step: Callable[[dict[str, Any]], None]) -> None:
        chunk = b"\0" * (1024 * 1024)
        sent, error = 0, None
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            try:
                sock.sendall(opening + ANNOUNCED)
                while sent < STREAM_LIMIT:
                    sent += sock.send(chunk)
            except OSError as exc:
                error = errno.errorcode.get(exc.errno or 0, repr(exc))
        step({"sent": sent, "error": error})

    return attack


@pytest.mark.parametrize("user", ATTACKERS)
@pytest.mark.parametrize("opening", ["no hello", "a forged hello"])
def test_a_10_gb_frame_announced_to_the_registry_is_refused_after_a_few_bytes(
    serve: Serve, user: str, opening: str
) -> None:
    held_path = serve.root / "held.jsonl"
    with connect(serve.address) as sl:
        lease = sl.lane("holder").acquire(str(held_path))
        assert lease is not None
        lease.append({"n": 1})
        registry, port = serve.registry()
        before_cpu = procfs.cpu_seconds([registry])
        forged = connection_auth.hello(os.urandom(32)) if opening == "a forged hello" else b""
        with RssPeak(registry) as rss, attacker(big_frame(port, forged), user) as child:
            result = child.report()
            child.go()
        after_kb, after_cpu = rss_kb(registry), procfs.cpu_seconds([registry])
        before_kb = rss.before
        print(
            f"Registry RSS {before_kb / 1024:.1f} MB, peak {rss.peak / 1024:.1f} MB,"
            f" after {after_kb / 1024:.1f} MB; CPU {after_cpu - before_cpu:.2f} s;"
            f" {result['sent'] / 2**20:.1f} MiB sent before {result['error']}"
        )
        assert result["error"] in ("ECONNRESET", "EPIPE"), "the Registry closed the connection"
        assert result["sent"] < 64 * 1024 * 1024, "closed long before 400 MB (socket buffers)"
        assert (rss.peak - before_kb) < 20 * 1024, "the Registry's memory stayed flat"
        assert serve.registry()[0] == registry
        new_file_gets_a_lease(serve, "after.jsonl")
        assert lease.append({"n": 2}).lines == 1
        lease.release()


# A Registry that dies anyway -------------------------------------------------------------


def test_a_registry_that_dies_is_restarted_and_its_holders_are_told_their_leases_are_lost(
    serve: Serve,
) -> None:
    held_path = serve.root / "held.jsonl"
    with connect(serve.address) as sl:
        lease = sl.lane("holder").acquire(str(held_path))
        assert lease is not None
        lease.append({"n": 1})
        registry, _ = serve.registry()
        files = [pid for pid in serve.members() if (s := procfs.stat(pid)) and s.ppid == registry]
        assert files, "the held file's actor"
        old_pgid = serve.state["pgid"]
        os.kill(registry, signal.SIGKILL)
        eventually(
            lambda: "registry dead" in serve.output.read_text(errors="replace"),
            "the supervisor to see the Registry gone",
            timeout=WAIT_S,
        )
        eventually(lambda: not launch.group_members(old_pgid), "the old system to go", WAIT_S)
        eventually(lambda: lease.revoked is not None, "the holder to be told", WAIT_S)
        assert lease.revoked == "connection_lost"
        with pytest.raises(LeaseRevoked):
            lease.append({"n": 2})
    for pid in files:
        stat = procfs.stat(pid)
        assert stat is None or not stat.live, "the orphaned file actor was retired"
    new_file_gets_a_lease_eventually(serve, "after.jsonl")
    with connect(serve.address) as sl, sl.lane("again").lease(str(held_path)) as again:
        assert again is not None, "the held file is served again, by a new actor"
        again.append({"n": 3})
    assert [json.loads(line)["n"] for line in held_path.read_text().splitlines()] == [1, 3]


def new_file_gets_a_lease_eventually(serve: Serve, name: str) -> None:
    """:func:`new_file_gets_a_lease` once the restarted system answers."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            new_file_gets_a_lease(serve, name)
            return
        except (Unavailable, ShuttingDown):
            assert time.monotonic() < deadline, "the restarted service never granted a lease"
            time.sleep(0.1)


# Out of descriptors in accept ------------------------------------------------------------


@pytest.fixture
def tcp(tmp_path: Path) -> Iterator[launch.TcpSystem]:
    system = launch.start_tcp_system(log_file=tmp_path / "logs" / "actors.log")
    try:
        yield system
    finally:
        system.stop()


def test_an_actor_out_of_descriptors_refuses_strangers_and_keeps_answering(
    tcp: launch.TcpSystem,
) -> None:
    """The open-file limit lowered under a live actor: ``accept`` fails with EMFILE for real.
    thespian 4.0.1 then handed the actor a message it died of; now it frees a descriptor."""
    actor = tcp.asys.createActor(launch.PingActor)
    pid = tcp.asys.ask(actor, "where", 10)[2]
    (port,) = [p for _, p, owner in tcp.listening_addresses() if owner == pid]
    hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")) + 3, hard))
    flood = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(40)]
    log = tcp.log_file.with_name("actors.thespian.log")

    def logged() -> str:
        # thespian's log is written line by line by the actor: it may not be there yet.
        return log.read_text() if log.exists() else ""

    try:
        # Our connection queues behind the 40 in the listen backlog, or comes over one the
        # actor keeps open and is answered before it met them.
        answer = tcp.asys.ask(actor, "still there", 10)
        assert answer is not None and answer[:2] == ("pong", "still there")
        # The flood stays open until the actor ran out: closed first, each stranger could be
        # accepted, seen closed and let go one at a time, never exhausting the limit.
        eventually(lambda: "out of file descriptors" in logged(), "the actor to log it ran out")
    finally:
        for sock in flood:
            sock.close()
    assert procfs.stat(pid) is not None and procfs.stat(pid).live  # type: ignore[union-attr]
    assert "Thespian__UpdateWork" not in logged()


# The hello itself ------------------------------------------------------------------------


def test_a_hello_is_accepted_once_within_its_freshness_and_never_after_being_forgotten() -> None:
    key = os.urandom(32)
    verifier = connection_auth._Verifier(key)
    now = time.time()
    fresh = connection_auth.hello(key, now=now)
    assert verifier.check(fresh) is None
    assert verifier.check(fresh) == "stale or replayed hello"
    assert verifier.check(connection_auth.hello(key, now=now - 61)) == "stale or replayed hello"
    assert verifier.check(connection_auth.hello(key, now=now + 61)) == "stale or replayed hello"
    assert verifier.check(connection_auth.hello(os.urandom(32), now=now)) == "bad hello"
    assert verifier.check(b"x" * connection_auth.HELLO_BYTES) == "no hello"

    nonces = connection_auth._Nonces()
    base = int(now * 1000)
    seen = ((b"\xff" + i.to_bytes(15, "big"), base + i) for i in range(1 << 16))
    nonces._seen.update(seen)  # full, none of them "n" * 16 or "m" * 16
    assert nonces.accept(b"n" * 16, base + 70_000, now + 70), "one more: the oldest forgotten"
    assert not nonces.accept(b"m" * 16, base, now), "no newer than the forgotten one: refused"
    assert nonces.accept(b"m" * 16, base + 70_001, now + 70)
