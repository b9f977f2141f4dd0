"""Who the gateway admits, and what a connection can cost it before it is admitted.

Real services, real sockets, real users: where the suite runs as root, a forked child becomes
uid 65534 (``nobody``) before it opens its socket and tries what a stranger would. The
pre-hello limits are checked on the gateway's own process (its RSS in ``/proc``), and the
connection flood against a ``sessionlane serve`` subprocess held to 1,024 open files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from ports import listen_port
from processes import RssPeak
from test_gateway import Closed, RawConn
from test_serve import Serve as BaseServe
from waiting import eventually

from sessionlane.messages.errors import Unauthorized
from sessionlane.system.client import connect
from sessionlane.system.config import load_settings
from sessionlane.system.gateway import peercred
from sessionlane.system.gateway.admission import NO_PROOF_REFUSAL, WRONG_PROOF_REFUSAL
from sessionlane.system.runtime import launch
from sessionlane.system.runtime.service import Service, ServiceError

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(120)]

HEADER = struct.Struct(">I")
STRANGER = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
needs_linux = pytest.mark.skipif(sys.platform != "linux", reason="peer owners are Linux-only")


def Raw(address: str, timeout: float = 10.0) -> RawConn:
    """One raw-frame connection; refusals come without an ``id`` and answer its request."""
    return RawConn(address, timeout, unaddressed=True)


@contextlib.contextmanager
def running_service(
    tmp: Path, *, unix: bool = False, **overrides: Any
) -> Iterator[tuple[Service, list[str]]]:
    """A service on a free loopback port (and a Unix socket in a short dir); its addresses."""
    root = tmp / "sessions"
    root.mkdir(exist_ok=True)
    settings, _ = load_settings(
        None,
        env={},
        overrides={"roots": [str(root)], "listen": "tcp://127.0.0.1:0", **overrides},
    )
    sock_dir = Path(tempfile.mkdtemp(prefix="sl-", dir="/tmp"))  # short: sun_path is 108 bytes
    extra = [f"unix://{sock_dir}/gw.sock"] if unix else []
    service = Service(settings, log_file=tmp / "actors.log", extra_listen=extra)
    try:
        service.start()
        assert service.running is not None
        yield service, service.running.addresses
    finally:
        service.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def gateway_pid(service: Service) -> int:
    """The pid of the process listening on the service's gateway port."""
    assert service.running is not None
    port = int(service.address.rpartition(":")[2])
    pids = [pid for _, p, pid in service.running.system.listening_addresses() if p == port]
    assert len(pids) == 1, pids
    return pids[0]


def log_has(service: Service, text: str) -> bool:
    return text in service.log_file.read_text(errors="replace")


# The same user --------------------------------------------------------------------------------


def test_the_same_users_client_connects_with_no_token_and_no_arguments_over_tcp_and_unix(
    tmp_path: Path,
) -> None:
    with running_service(tmp_path, unix=True) as (service, addresses):
        tcp, unix = addresses
        assert tcp.startswith("tcp://") and unix.startswith("unix://")
        for address in (tcp, unix):
            path = tmp_path / "sessions" / f"{address[:3]}.jsonl"
            with connect(address) as sl, sl.lane("me").lease(str(path)) as lease:
                assert lease is not None
                assert lease.append({"over": address[:4]}).lines == 1
        assert (tmp_path / "sessions" / "tcp.jsonl").read_text() == '{"over":"tcp:"}\n'
        assert (tmp_path / "sessions" / "uni.jsonl").read_text() == '{"over":"unix"}\n'
        eventually(
            lambda: log_has(service, "(admits uid"), "the admission rule in the log", timeout=10
        )


def test_where_peers_cannot_be_told_apart_the_service_refuses_to_start_without_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The actor processes are forked from this one: they inherit the patched platform.
    monkeypatch.setattr(peercred, "identifies_peers", lambda: False)
    with (
        pytest.raises(ServiceError, match="cannot tell which user a connection comes from"),
        running_service(tmp_path),
    ):
        pass
    token_file = tmp_path / "token"
    token_file.write_text("t0ken-0123456789\n")
    token_file.chmod(0o600)
    for opening in ({"token_file": str(token_file)}, {"allow_other_users": True}):
        with running_service(tmp_path, **opening) as (_, addresses):
            token = "t0ken-0123456789" if "token_file" in opening else None
            # Without a token, a client that cannot tell who listens trusts nobody unless told.
            with pytest.raises(Unauthorized, match="cannot tell which user runs the service"):
                connect(addresses[0])
            trust = {} if token else {"service_user": "*"}
            with connect(addresses[0], token=token, **trust) as sl:
                assert sl.status().files == []


# Strangers (root only) ------------------------------------------------------------------------


def stranger_tries(address: str, path: Path, token: str | None = None) -> dict[str, Any]:
    """Run in the uid-65534 child: hello, acquire and append as far as the service lets it."""
    steps: dict[str, Any] = {}
    try:
        conn = Raw(address)
    except OSError as exc:
        return {"connect": type(exc).__name__}
    try:
        for name, message in (
            ("hello", None),
            ("acquire", {"type": "acquire", "lane": "x", "path": str(path), "purpose": "prompt"}),
        ):
            try:
                # The hello proves the token when there is one (never sends it in clear).
                steps[name] = conn.hello(token) if message is None else conn.request(message)
            except (Closed, OSError) as exc:
                steps[name] = {"type": "closed", "error": type(exc).__name__}
                return steps
        granted = steps["acquire"]
        if granted["type"] == "granted":
            steps["append"] = conn.request(
                {
                    "type": "append",
                    "lease": granted["lease"],
                    "fence": granted["fence"],
                    "records": [{"by": "nobody"}],
                }
            )
    finally:
        conn.close()
    return steps


def as_stranger(fn: Callable[[], dict[str, Any]], seconds: float = 30.0) -> dict[str, Any]:
    """``fn()`` run in a forked child that became uid 65534 first; its JSON result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing of pytest's from here on, only os._exit
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(STRANGER)
            os.setuid(STRANGER)
            os.write(write_end, json.dumps(fn(), default=bytes.hex).encode())  # proofs: hex
            code = 0
        except BaseException as exc:  # report, never return into pytest
            os.write(write_end, json.dumps({"child_error": repr(exc)}).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        chunks = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([read_end], [], [], left)
            if not ready:
                continue
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        result: dict[str, Any] = json.loads(b"".join(chunks) or b"{}")
        return result
    finally:
        os.close(read_end)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def owned_transcript(tmp_path: Path, name: str) -> Path:
    """A transcript of root's, 0644, with one line in it."""
    path = tmp_path / "sessions" / name
    path.write_text('{"by":"root"}\n')
    path.chmod(0o644)
    return path


def open_unix_socket_to_everyone(address: str) -> None:
    """Let another user reach the (0600) socket, so the uid check is what refuses it."""
    sock = Path(address.removeprefix("unix://"))
    sock.parent.chmod(0o755)
    sock.chmod(0o666)


@needs_root
@needs_linux
def test_a_stranger_is_refused_at_hello_over_tcp_and_unix_and_writes_nothing(
    tmp_path: Path,
) -> None:
    with running_service(tmp_path, unix=True) as (service, addresses):
        tcp, unix = addresses
        path = owned_transcript(tmp_path, "root.jsonl")
        before = path.read_bytes()

        by_mode = as_stranger(lambda: stranger_tries(unix, path))
        assert by_mode == {"connect": "PermissionError"}, "a 0600 socket keeps nobody out"

        open_unix_socket_to_everyone(unix)
        for address in (tcp, unix):
            steps = as_stranger(functools.partial(stranger_tries, address, path))
            hello = steps["hello"]
            assert (hello["type"], hello["code"]) == ("error", "unauthorized"), (address, steps)
            assert hello["detail"] == (
                f"peer runs as uid {STRANGER}, not the service's user (uid 0);"
                " configure token_file or allow_other_users"
            )
            assert steps["acquire"]["type"] == "closed", steps
        assert path.read_bytes() == before
        assert os.stat(path).st_mode & 0o777 == 0o644

        def acquire_first() -> dict[str, Any]:
            conn = Raw(tcp)
            try:
                acquire = {"type": "acquire", "lane": "x", "path": str(path), "purpose": "prompt"}
                return conn.request(acquire)
            finally:
                conn.close()

        skipped_hello = as_stranger(acquire_first)
        assert (skipped_hello["type"], skipped_hello["code"]) == ("error", "unauthorized")
        assert path.read_bytes() == before
        eventually(
            lambda: log_has(service, f"peer runs as uid {STRANGER}"), "a logged refusal", timeout=10
        )


@needs_root
@needs_linux
def test_allow_other_users_admits_the_stranger_without_a_token(tmp_path: Path) -> None:
    with running_service(tmp_path, unix=True, allow_other_users=True) as (_, addresses):
        open_unix_socket_to_everyone(addresses[1])
        path = owned_transcript(tmp_path, "open.jsonl")
        for address in addresses:
            steps = as_stranger(functools.partial(stranger_tries, address, path))
            assert steps["hello"]["type"] == "welcome", (address, steps)
            assert steps["acquire"]["type"] == "granted", steps
            assert steps["append"]["type"] == "appended", steps
        assert path.read_text() == '{"by":"root"}\n' + '{"by":"nobody"}\n' * 2


@needs_root
@needs_linux
def test_with_a_token_file_the_stranger_with_the_token_is_admitted_and_without_it_refused(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-0123\n")
    token_file.chmod(0o600)
    with running_service(tmp_path, token_file=str(token_file)) as (_, addresses):
        path = owned_transcript(tmp_path, "token.jsonl")
        refused = as_stranger(lambda: stranger_tries(addresses[0], path))
        assert (refused["hello"]["code"], refused["hello"]["detail"]) == (
            "unauthorized",
            NO_PROOF_REFUSAL,
        )
        wrong = as_stranger(lambda: stranger_tries(addresses[0], path, token="s3cret-token-9999"))
        assert (wrong["hello"]["code"], wrong["hello"]["detail"]) == (
            "unauthorized",
            WRONG_PROOF_REFUSAL,
        )
        assert path.read_text() == '{"by":"root"}\n'
        admitted = as_stranger(
            lambda: stranger_tries(addresses[0], path, token="s3cret-token-0123")
        )
        assert admitted["hello"]["type"] == "welcome", admitted
        assert admitted["append"]["type"] == "appended", admitted
        assert path.read_text() == '{"by":"root"}\n{"by":"nobody"}\n'


@needs_root
@needs_linux
def test_a_stranger_cannot_fill_the_connection_table_and_lock_the_user_out(tmp_path: Path) -> None:
    with running_service(tmp_path, max_connections=10) as (_, addresses):
        results_r, results_w = os.pipe()
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: nothing of pytest's from here on, only os._exit
            code = 1
            try:
                os.close(results_r)
                os.close(done_w)
                os.setgroups([])
                os.setgid(STRANGER)
                os.setuid(STRANGER)
                conns = [Raw(addresses[0]) for _ in range(12)]
                oldest = [closed_by_service(conn, 10) for conn in conns[:4]]
                still_open = []
                for conn in conns[4:]:
                    conn.sock.setblocking(False)
                    try:
                        conn.sock.recv(1)
                    except BlockingIOError:
                        still_open.append(True)
                    else:
                        still_open.append(False)
                os.write(results_w, json.dumps([oldest, still_open]).encode() + b"\n")
                os.read(done_r, 1)  # hold the eight until the user was served
                code = 0
            except BaseException as exc:
                os.write(results_w, json.dumps({"child_error": repr(exc)}).encode() + b"\n")
            finally:
                os._exit(code)
        os.close(results_w)
        os.close(done_r)
        try:
            ready, _, _ = select.select([results_r], [], [], 30)
            assert ready, "the stranger reported nothing"
            oldest, still_open = json.loads(os.read(results_r, 65536))
            assert [frames[0]["code"] for frames in oldest] == ["unauthorized"] * 4
            assert oldest[0][0]["detail"].startswith(f"peer runs as uid {STRANGER}")
            assert still_open == [True] * 8
            with connect(addresses[0]) as sl:
                assert sl.status().files == [], "our own user is served past 12 strangers"
        finally:
            os.write(done_w, b"x")
            os.close(done_w)
            os.close(results_r)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


# Before the hello -----------------------------------------------------------------------------


def closed_by_service(conn: RawConn, seconds: float) -> list[dict[str, Any]]:
    """The frames the service sent before closing ``conn`` (fails if it stays open)."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            frames.append(conn.recv(left))
        except Closed:
            return frames
        except TimeoutError:
            break
    raise AssertionError(f"still open after {seconds} s (got {frames})")


def test_forty_strangers_announcing_8_mib_frames_cost_the_gateway_almost_nothing(
    tmp_path: Path,
) -> None:
    body = b"\x00" * (8 * 1024 * 1024)
    with running_service(tmp_path) as (service, _):
        with RssPeak(gateway_pid(service)) as rss:
            conns = [Raw(service.address) for _ in range(40)]
            try:

                def flood(conn: RawConn) -> None:
                    with contextlib.suppress(OSError):
                        conn.sock.sendall(HEADER.pack(len(body)) + body)

                senders = [threading.Thread(target=flood, args=(c,)) for c in conns]
                for sender in senders:
                    sender.start()
                for conn in conns:
                    frames = closed_by_service(conn, 20)
                    assert all(f["code"] == "too_large" for f in frames), frames
                for sender in senders:
                    sender.join(20)
            finally:
                for conn in conns:
                    conn.close()
        grown_mb = (rss.peak - rss.before) / 1024
        print(f"gateway RSS {rss.before / 1024:.1f} MB, peak {rss.peak / 1024:.1f} MB")
        assert grown_mb < 20, f"the gateway grew by {grown_mb:.1f} MB"
        with connect(service.address) as sl:
            assert sl.status().files == [], "and it still serves"


def test_a_header_announcing_more_than_4_kib_before_the_hello_is_refused_at_once(
    tmp_path: Path,
) -> None:
    with running_service(tmp_path) as (service, _):
        conn = Raw(service.address)
        conn.sock.sendall(HEADER.pack(4097))  # no body: it is never read
        frames = closed_by_service(conn, 5)
        assert [(f["code"], f["detail"]) for f in frames] == [
            ("too_large", "frame of 4097 bytes exceeds the 4096 allowed here before the hello")
        ]
        ok = Raw(service.address)
        assert ok.hello()["type"] == "welcome"
        big = {"v": 1, "id": 9, "type": "keepalive", "pad": "x" * 5000}
        ok.send(big)  # 5 KB after the hello is fine as far as size goes
        reply = ok.recv()
        assert (reply["code"], reply["id"]) == ("bad_frame", 9), "judged on content, not size"
        ok.close()


def test_a_connection_that_trickles_or_idles_is_closed_by_the_hello_deadline(
    tmp_path: Path,
) -> None:
    with running_service(tmp_path, hello_timeout_ms=500) as (service, _):
        greeted = Raw(service.address)
        assert greeted.hello()["type"] == "welcome"
        idle = Raw(service.address)
        trickler = Raw(service.address)
        started = time.monotonic()
        trickler.sock.sendall(HEADER.pack(200))
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.1):  # one byte per 100 ms: the pace is the scenario
                try:
                    trickler.sock.sendall(b"\x00")
                except OSError:
                    return

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            frames = closed_by_service(trickler, 10)
            took = time.monotonic() - started
            assert [(f["code"], f["detail"]) for f in frames] == [
                ("unauthorized", "no hello within 500 ms of connecting")
            ]
            print(f"trickler closed after {took * 1000:.0f} ms")
            assert 0.4 <= took < 5.0, took
            assert closed_by_service(idle, 5)[0]["code"] == "unauthorized"
        finally:
            stop.set()
            thread.join(5)
            trickler.close()
            idle.close()
        assert greeted.request({"type": "keepalive"})["type"] == "alive", "the greeted stay"
        greeted.close()


def test_one_connection_past_max_connections_is_answered_unavailable_and_closed(
    tmp_path: Path,
) -> None:
    with running_service(tmp_path, max_connections=3) as (service, _):
        held = [Raw(service.address) for _ in range(3)]
        assert held[0].hello()["type"] == "welcome"
        extra = Raw(service.address)
        frames = closed_by_service(extra, 5)
        assert [(f["type"], f["code"], f["detail"]) for f in frames] == [
            ("error", "unavailable", "too many connections (3)")
        ]
        extra.close()
        held.pop().close()

        def served() -> bool:
            conn = Raw(service.address)
            try:
                return conn.hello().get("type") == "welcome"
            except Closed:
                return False
            finally:
                conn.close()

        eventually(served, "a freed slot to be taken by a new client", timeout=10)
        for conn in held:
            conn.close()
        eventually(
            lambda: log_has(service, "too many connections (3)"), "a logged refusal", timeout=10
        )


# A flood under 1,024 open files ---------------------------------------------------------------

FLOOD = 1_100
NOFILE = 1_024


def raise_own_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the test needs {needed} open files (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class Serve(BaseServe):
    """``sessionlane serve`` on a free port, held to ``NOFILE`` open files, logging to
    ``serve.log``."""

    def __init__(self, tmp: Path, root: Path, env: dict[str, str]) -> None:
        self.listen = f"tcp://127.0.0.1:{listen_port()}"
        self.log = tmp / "serve.log"
        args = ["--root", str(root), "--listen", self.listen, "--log-file", str(self.log)]
        super().__init__(tmp, *args, env=env, nofile=NOFILE)

    @property
    def address(self) -> str:
        return self.listen

    def admin_pid(self) -> int | None:
        return launch._admin_pid(self.state["admin_port"])


@pytest.fixture
def serve_with(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def start(**settings: int) -> Serve:
        root = tmp_path / "sessions"
        root.mkdir()
        env = {f"SESSIONLANE_{k.upper()}": str(v) for k, v in settings.items()}
        serve = Serve(tmp_path, root, env)
        started.append(serve)
        serve.wait_ready()
        return serve

    yield start
    for serve in started:
        serve.kill()


def refusal_of(sock: socket.socket) -> str | None:
    """The detail of the error the service answered ``sock`` with before closing, or None."""
    data = bytearray()
    with contextlib.suppress(OSError):
        while chunk := sock.recv(4096):
            data += chunk
    if len(data) < HEADER.size:
        return None
    reply = msgpack.unpackb(bytes(data[HEADER.size :]), raw=False)
    assert reply["type"] == "error", reply
    return f"{reply['code']}: {reply['detail']}"


@needs_linux
@pytest.mark.parametrize(
    ("max_connections", "cap"),
    [(512, 512), (4096, 768)],
    ids=["max_connections-512", "max_connections-4096-lowered-by-the-file-limit"],
)
def test_1100_idle_connections_under_1024_open_files_neither_break_a_lease_nor_the_service(
    serve_with: Callable[..., Serve], max_connections: int, cap: int
) -> None:
    raise_own_nofile(FLOOD + 512)
    serve = serve_with(max_connections=max_connections, hello_timeout_ms=3000)
    admin = serve.admin_pid()
    assert admin is not None
    path = Path(serve.state["roots"][0]) / "held.jsonl"
    flood: list[socket.socket] = []
    with connect(serve.address) as sl:
        lease = sl.lane("holder").acquire(str(path))
        assert lease is not None
        lease.append({"n": 1})
        try:
            host, _, port = serve.address.removeprefix("tcp://").rpartition(":")
            for _ in range(FLOOD):
                flood.append(socket.create_connection((host, int(port)), timeout=20))
            assert lease.append({"n": 2}).lines == 1, "the lease works during the flood"
            refused: list[str] = []
            for sock in flood:  # each is closed: refused at once, or by the hello deadline
                sock.settimeout(20)
                detail = refusal_of(sock)
                if detail is not None and detail.startswith("unavailable"):
                    refused.append(detail)
            assert refused, "some connections were past the cap"
            assert set(refused) == {f"unavailable: too many connections ({cap})"}
            assert len(refused) >= FLOOD - cap
            assert lease.append({"n": 3}).lines == 1, "and after it"
        finally:
            for sock in flood:
                sock.close()
            lease.release()
    with connect(serve.address) as sl, sl.lane("new").lease(str(path)) as fresh:
        assert fresh is not None
        assert fresh.append({"n": 4}).lines == 1, "a new client is served"
    assert serve.admin_pid() == admin, "the actor system was not restarted"
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    for output in (serve.log, serve.output):
        assert "restarting" not in output.read_text(errors="replace"), output
    if cap < max_connections:
        assert f"max_connections {max_connections} lowered to {cap}" in serve.log.read_text()


@needs_linux
def test_a_gateway_out_of_descriptors_pauses_accepting_keeps_serving_and_accepts_again(
    tmp_path: Path,
) -> None:
    """Past its cap's reserve (the open-file limit lowered under the running gateway), ``accept``
    fails with EMFILE for real: the gateway pauses, serves the lease, and catches up."""
    with running_service(tmp_path, hello_timeout_ms=500) as (service, _):
        pid = gateway_pid(service)
        path = tmp_path / "sessions" / "held.jsonl"
        flood: list[socket.socket] = []
        with connect(service.address) as sl:
            lease = sl.lane("holder").acquire(str(path))
            assert lease is not None
            lease.append({"n": 1})
            hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
            spare = 20
            soft = len(os.listdir(f"/proc/{pid}/fd")) + spare
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            try:
                host, _, port = service.address.removeprefix("tcp://").rpartition(":")
                for _ in range(5 * spare):
                    flood.append(socket.create_connection((host, int(port)), timeout=20))
                eventually(
                    lambda: log_has(service, "cannot accept connections ([Errno 24]"),
                    "the gateway to run out of descriptors",
                    timeout=10,
                )
                assert lease.append({"n": 2}).lines == 1, "served while out of descriptors"
                pings = [service.healthy() for _ in range(5)]
                assert "False, False, False" not in str(pings), f"a restart would follow: {pings}"
                for sock in flood:  # each is accepted in its turn, then closed by the deadline
                    sock.settimeout(30)
                    detail = refusal_of(sock)
                    assert detail == "unauthorized: no hello within 500 ms of connecting", detail
            finally:
                for sock in flood:
                    sock.close()
            assert lease.append({"n": 3}).lines == 1
            lease.release()
        with connect(service.address) as sl, sl.lane("new").lease(str(path)) as fresh:
            assert fresh is not None
            assert fresh.append({"n": 4}).lines == 1
        eventually(
            lambda: log_has(service, "accepting again after"), "the recovery logged", timeout=10
        )
        warnings = service.log_file.read_text().count("cannot accept connections")
        assert warnings <= 2, f"{warnings} warnings: at most one per 10 s"
