"""Token mode keeps the owner in, and clients verify the service before they say anything.

Real services, real sockets, real users: where the suite runs as root, a forked child becomes
uid 65534 (``nobody``) and plays the stranger: it floods a token-mode service with idle
connections, or takes the service's port while the service is stopped and answers like it
(an impostor), or plants a state directory for ``sessionlane status`` to trust. What the
owner's clients (Python sync and asyncio, Node, the CLI) send it is recorded by the child
and checked here, byte for byte. (Over 600 lines: the stranger's process and the impostor
are scaffolding every test here shares.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from test_gateway import RawConn
from test_gateway_trust import STRANGER, needs_linux, needs_root, running_service
from test_node_client import NODE_DIR, node  # noqa: F401 (node: the fixture)

from sessionlane.messages import handshake
from sessionlane.messages.errors import Unauthorized
from sessionlane.system.client import connect, connect_async
from sessionlane.system.config import NON_CONFIG_ENV
from sessionlane.system.gateway.admission import WRONG_PROOF_REFUSAL
from sessionlane.system.ops.running import StateDirError, private_dir

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(180)]

HEADER = struct.Struct(">I")
TOKEN = "owner-token-0123456789abcdef"


def write_token(tmp_path: Path, token: str = TOKEN) -> Path:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``sessionlane ARGS`` as a real process, without this run's ``SESSIONLANE_*`` config."""
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SESSIONLANE_") or k in NON_CONFIG_ENV
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sessionlane.system.ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
        stdin=subprocess.DEVNULL,
    )


# A stranger in a child process ----------------------------------------------------------------


def _read_line(fd: int, buf: bytearray, seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"the stranger said nothing within {seconds} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError("the stranger exited without a word")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    found = json.loads(line)
    if isinstance(found, dict) and "child_error" in found:
        raise AssertionError(f"the stranger failed: {found['child_error']}")
    return found


class Stranger:
    """``work(ready, done_fd)`` run in a forked child that became uid 65534 first.

    The child calls ``ready(info)`` once it is in place (``ready`` below is ``info``), goes
    on until ``done_fd`` is readable (:meth:`finish` makes it so), and returns its report.
    """

    def __init__(self, work: Callable[[Callable[[Any], None], int], Any]) -> None:
        self.work = work
        self.buf = bytearray()
        self.ready: Any = None

    def __enter__(self) -> Stranger:
        self.out_r, out_w = os.pipe()
        done_r, self.done_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: nothing of pytest's from here on, only os._exit
            code = 1
            try:
                os.close(self.out_r)
                os.close(self.done_w)
                os.setgroups([])
                os.setgid(STRANGER)
                os.setuid(STRANGER)

                def ready(info: Any) -> None:
                    os.write(out_w, json.dumps(info).encode() + b"\n")

                report = self.work(ready, done_r)
                os.write(out_w, json.dumps(report).encode() + b"\n")
                code = 0
            except BaseException as exc:  # report, never return into pytest
                os.write(out_w, json.dumps({"child_error": repr(exc)}).encode() + b"\n")
            finally:
                os._exit(code)
        os.close(out_w)
        os.close(done_r)
        self.ready = _read_line(self.out_r, self.buf, 30)
        return self

    def finish(self) -> Any:
        os.write(self.done_w, b"x")
        return _read_line(self.out_r, self.buf, 30)

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            os.close(self.done_w)
        os.close(self.out_r)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def idle_connections(
    address: str, count: int, until_open: int
) -> Callable[[Callable[[Any], None], int], Any]:
    """The stranger's flood: ``count`` connections that never say hello, held until done.

    Ready once the service refused all but ``until_open`` of them (or after 30 s): how many
    are open and what the refused ones were told. The final report: what the service told
    the ones it closed after that.
    """

    def work(ready: Callable[[Any], None], done_fd: int) -> Any:
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        conns = [socket.create_connection((host, int(port)), timeout=10) for _ in range(count)]
        for sock in conns:
            sock.setblocking(False)
        told: dict[int, str] = {}

        def collect() -> None:
            for i, sock in enumerate(conns):
                if i in told:
                    continue
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    data = repr(exc).encode()
                told[i] = (
                    msgpack.unpackb(data[HEADER.size :], raw=False)["detail"]
                    if len(data) > HEADER.size and data[:1] == b"\0"
                    else "closed"
                )

        deadline = time.monotonic() + 30
        while count - len(told) > until_open and time.monotonic() < deadline:
            select.select([s for i, s in enumerate(conns) if i not in told], [], [], 1)
            collect()
        ready({"open": count - len(told), "refusals": sorted(set(told.values()))})
        before = set(told)
        select.select([done_fd], [], [], 60)
        collect()
        after = sorted({told[i] for i in told if i not in before})
        for sock in conns:
            sock.close()
        return {"refusals_after": after}

    return work


@needs_root
@needs_linux
def test_a_stranger_with_520_idle_connections_in_token_mode_does_not_lock_the_owner_out(
    tmp_path: Path,
) -> None:
    with (
        running_service(tmp_path, token_file=str(write_token(tmp_path))) as (_, addresses),
        Stranger(idle_connections(addresses[0], 520, until_open=8)) as stranger,
    ):
        held = stranger.ready
        assert held["open"] == 8, "only the 8 newest of the stranger's connections wait"
        assert held["refusals"] == [
            f"too many connections of uid {STRANGER} waiting to prove the token (at most 8):"
            " this is the oldest"
        ]
        for _ in range(30):  # the owner, again and again, while the stranger holds its 8
            with connect(addresses[0], token=TOKEN) as sl:
                assert sl.status().files == []
        stranger.finish()


@needs_root
@needs_linux
def test_when_the_table_is_full_the_owner_takes_the_place_of_a_waiting_stranger(
    tmp_path: Path,
) -> None:
    token = str(write_token(tmp_path))
    with (
        running_service(tmp_path, token_file=token, max_connections=12) as (_, addresses),
        contextlib.ExitStack() as own,
    ):
        # The owner's 5 admitted connections and the stranger's 8 waiting ones: over 12.
        mine = [own.enter_context(connect(addresses[0], token=TOKEN)) for _ in range(5)]
        # 5 + 7 fill the table: the stranger's 8th is refused, full.
        with Stranger(idle_connections(addresses[0], 8, until_open=7)) as stranger:
            assert stranger.ready == {"open": 7, "refusals": ["too many connections (12)"]}
            with connect(addresses[0], token=TOKEN) as sl:
                assert sl.status().files == [], "the owner got in: a stranger made room"
            report = stranger.finish()
        assert report["refusals_after"] == [
            "closed to make room for the service's own user (too many connections)"
        ]
        assert all(sl.status().files == [] for sl in mine)


# Wrong proofs are slowed ---------------------------------------------------------------------


def prove(address: str, token: str) -> tuple[float, float, dict[str, Any]]:
    """One connection proving ``token``: when its proof was sent, when answered, the answer."""
    conn = RawConn(address, timeout=30)
    try:
        nonce = os.urandom(handshake.NONCE_BYTES)
        challenge = conn.request({"type": "hello", "client": "guesser", "nonce": nonce})
        assert challenge["type"] == "challenge", challenge
        proof = handshake.client_proof(token, nonce, challenge["nonce"])
        sent = time.monotonic()
        reply = conn.request({"type": "proof", "proof": proof})
        return sent, time.monotonic(), reply
    finally:
        conn.close()


@needs_linux
def test_wrong_token_proofs_are_answered_later_and_later_and_the_right_one_still_admits(
    tmp_path: Path,
) -> None:
    with running_service(tmp_path, token_file=str(write_token(tmp_path))) as (_, addresses):
        tries = [prove(addresses[0], "not-the-token-0123456789") for _ in range(4)]
        for _, _, reply in tries:
            assert (reply["code"], reply["detail"]) == ("unauthorized", WRONG_PROOF_REFUSAL)
        # Each refusal came at least the doubled wait after the previous proof was sent
        # (lower bounds only: a loaded machine makes them later, never sooner).
        gaps = [tries[i][1] - tries[i - 1][0] for i in range(1, 4)]
        assert [gap >= wait for gap, wait in zip(gaps, (0.25, 0.5, 1.0), strict=True)] == [
            True
        ] * 3, gaps
        _, answered, welcome = prove(addresses[0], TOKEN)
        assert welcome["type"] == "welcome", "the right token still gets in, after its turn"
        assert answered - tries[-1][0] >= 2.0
        with connect(addresses[0], token=TOKEN) as sl:  # a right proof forgot the mistakes
            assert sl.status().files == []


@needs_linux
def test_a_peer_sending_wrong_proofs_on_8_connections_at_once_gets_few_of_them_checked(
    tmp_path: Path,
) -> None:
    """As fast as the service answers, for 3 s: the turns of one peer's proofs are 0, 0.25,
    0.5, 1, 2, 4 s... whatever the number of connections, so at most 5 are checked (6 with a
    margin); the others are refused unchecked (their turn would be too far) or still wait."""
    with running_service(tmp_path, token_file=str(write_token(tmp_path))) as (_, addresses):
        selector = selectors.DefaultSelector()
        details: dict[str, int] = {}

        def guess() -> None:
            conn = RawConn(addresses[0], timeout=30)
            nonce = os.urandom(handshake.NONCE_BYTES)
            challenge = conn.request({"type": "hello", "client": "guesser", "nonce": nonce})
            wrong = handshake.client_proof("not-the-token-0123456789", nonce, challenge["nonce"])
            conn.send({"v": 1, "id": 99, "type": "proof", "proof": wrong})
            selector.register(conn.sock, selectors.EVENT_READ, conn)

        for _ in range(8):
            guess()
        deadline = time.monotonic() + 3.0
        while (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                conn = key.data
                selector.unregister(conn.sock)
                reply = conn.recv()
                conn.close()
                details[reply["detail"]] = details.get(reply["detail"], 0) + 1
                guess()
        for key in list(selector.get_map().values()):
            key.data.close()
        checked = details.pop(WRONG_PROOF_REFUSAL, 0)
        print(f"wrong proofs in 3 s on 8 connections: {checked} checked, {details} unchecked")
        assert 1 <= checked <= 6, (checked, details)
        assert set(details) <= {"too many wrong token proofs from this peer: wait"}, details


# Weak token files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "mode", "why"),
    [
        ("x", 0o600, "holds a 1-byte token; at least 16 bytes are needed"),
        (TOKEN, 0o644, "is accessible to other users (mode 0644)"),
    ],
)
def test_serve_refuses_to_start_with_a_weak_token_file_naming_the_key(
    tmp_path: Path, content: str, mode: int, why: str
) -> None:
    token = tmp_path / "token"
    token.write_text(content + "\n")
    token.chmod(mode)
    root = tmp_path / "sessions"
    root.mkdir()
    run = tmp_path / "run"
    done = cli(
        "serve",
        "--root",
        str(root),
        "--listen",
        "tcp://127.0.0.1:0",
        env={"SESSIONLANE_TOKEN_FILE": str(token), "XDG_RUNTIME_DIR": str(run)},
    )
    assert done.returncode == 2, done
    assert "config key token_file" in done.stderr and why in done.stderr
    assert "chmod 600" in done.stderr or "openssl rand" in done.stderr


# An impostor on the service's port -----------------------------------------------------------


def impostor(where: int | str) -> Callable[[Callable[[Any], None], int], Any]:
    """The stranger's service: on the stopped service's port (or at a Unix socket path), it
    answers like the service would (a challenge, a welcome with a made-up proof, grants,
    ``appended`` at fence 99) and records every byte each connection sent it."""

    def work(ready: Callable[[Any], None], done_fd: int) -> Any:
        if isinstance(where, str):
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(where)
            os.chmod(where, 0o777)  # anyone may connect: a trap
        else:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", where))
        listener.listen(16)
        ready({"listening": where})
        pending: dict[socket.socket, bytearray] = {}  # bytes not yet parsed, per connection
        received: dict[socket.socket, bytearray] = {}  # every byte, per connection
        while True:
            readable, _, _ = select.select([listener, done_fd, *pending], [], [], 60)
            if done_fd in readable or not readable:
                break
            for sock in readable:
                if sock is listener:
                    conn, _ = listener.accept()
                    pending[conn], received[conn] = bytearray(), bytearray()
                    continue
                assert isinstance(sock, socket.socket)
                data = sock.recv(65536)
                if not data:
                    del pending[sock]
                    continue
                received[sock] += data
                pending[sock] += data
                for message in _take_frames(pending[sock]):
                    answer = _impostor_answer(message)
                    if answer is not None:
                        body = msgpack.packb({"v": 1, "id": message.get("id"), **answer})
                        sock.sendall(HEADER.pack(len(body)) + body)
        return {"received": [bytes(r).hex() for r in received.values()]}

    return work


def _take_frames(buf: bytearray) -> list[dict[str, Any]]:
    """The whole frames at the start of ``buf``, removed from it."""
    frames = []
    while len(buf) >= HEADER.size:
        (length,) = HEADER.unpack_from(buf)
        if len(buf) < HEADER.size + length:
            break
        frames.append(msgpack.unpackb(bytes(buf[HEADER.size : HEADER.size + length]), raw=False))
        del buf[: HEADER.size + length]
    return frames


def _impostor_answer(message: dict[str, Any]) -> dict[str, Any] | None:
    match message.get("type"):
        case "hello" if "nonce" in message:
            return {"type": "challenge", "nonce": b"\x01" * handshake.NONCE_BYTES}
        case "hello" | "proof":
            return {"type": "welcome", "server": "sessionlane/0.1", "protocol": 1, "proof": b"?"}
        case "acquire":
            return {
                "type": "granted",
                "lease": "fake",
                "fence": 99,
                "path": message.get("path"),
                "purpose": "prompt",
            }
        case "append":
            return {"type": "appended", "offset": 0, "lines": 1, "fence": 99}
        case "status":
            return {"type": "status", "files": []}
    return None


@contextlib.contextmanager
def stopped_service_port(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """The address of a real service that ran and was stopped: ``(address, port)``."""
    with running_service(tmp_path) as (_, addresses):
        address = addresses[0]
    yield address, int(address.rpartition(":")[2])


def sent_by_owner(report: dict[str, Any]) -> list[bytes]:
    return [bytes.fromhex(r) for r in report["received"]]


NODE_CONNECT = """
const { connect } = require(process.argv[1]);
const [address, token] = process.argv.slice(2);
connect(address, token ? { token } : {}).then(
  async (sl) => {
    const lease = await sl.lane('n').lease('/tmp/owner.jsonl');
    await lease.append({ secret: 'records' });
    console.log(JSON.stringify({ connected: true }));
  },
  (err) => console.log(JSON.stringify({ code: err.code, message: err.message })),
);
"""


def node_connects(node_bin: str, address: str, token: str | None) -> dict[str, Any]:
    index = str(NODE_DIR / "dist" / "index.js")
    done = subprocess.run(
        [node_bin, "-e", NODE_CONNECT, index, address, token or ""],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def python_connects(address: str, token: str | None, flavour: str) -> str:
    """The owner's Python client (``sync`` or ``async``) at ``address``: its refusal."""

    async def run_async() -> None:
        async with connect_async(address, token) as sl:
            lease = await sl.lane("p").acquire("/tmp/owner.jsonl")
            await lease.append([{"secret": "records"}])

    try:
        if flavour == "sync":
            with connect(address, token) as sl:
                sl.lane("p").append("/tmp/owner.jsonl", {"secret": "records"})
        else:
            asyncio.run(run_async())
    except Unauthorized as exc:
        return str(exc)
    raise AssertionError("the owner's client trusted the impostor")


@needs_root
@needs_linux
@pytest.mark.parametrize("with_token", [False, True], ids=["no-token", "token"])
def test_an_impostor_on_the_stopped_services_port_gets_no_token_and_no_records(
    tmp_path: Path, with_token: bool
) -> None:
    token = TOKEN if with_token else None
    with stopped_service_port(tmp_path) as (address, port), Stranger(impostor(port)) as fake:
        assert fake.ready == {"listening": port}
        refusals = [python_connects(address, token, flavour) for flavour in ("sync", "async")]
        token_args = ["--token-file", str(write_token(tmp_path))] if with_token else []
        status = cli(
            "status", "--listen", address, *token_args, env={"XDG_RUNTIME_DIR": str(tmp_path)}
        )
        report = fake.finish()
    assert status.returncode != 0, status
    refusals.append(status.stderr)
    sent = sent_by_owner(report)
    assert len(sent) == 3, "one connection each: sync, asyncio, status"
    for refusal in refusals:
        if with_token:
            assert "did not prove it knows the token" in refusal, refusal
        else:
            assert f"runs as uid {STRANGER}, not uid 0" in refusal, refusal
    for data in sent:
        assert TOKEN.encode() not in data, "the token never crosses the wire"
        assert b"records" not in data and b"acquire" not in data and b"append" not in data
        if not with_token:
            assert data == b"", "nothing at all is sent to another user's socket"
        else:
            types = [m["type"] for m in _all_frames(data)]
            assert types == ["hello", "proof"], types


def _all_frames(data: bytes) -> list[dict[str, Any]]:
    return _take_frames(bytearray(data))


@needs_root
@needs_linux
@pytest.mark.parametrize("with_token", [False, True], ids=["no-token", "token"])
def test_the_node_client_refuses_an_impostor_and_sends_it_neither_token_nor_records(
    node: str,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
    with_token: bool,
) -> None:
    token = TOKEN if with_token else None
    with stopped_service_port(tmp_path) as (address, port), Stranger(impostor(port)) as fake:
        result = node_connects(node, address, token)
        report = fake.finish()
    assert result["code"] == "unauthorized", result
    if with_token:
        assert "did not prove it knows the token" in result["message"]
    else:
        assert f"runs as uid {STRANGER}, not uid 0" in result["message"]
    (sent,) = sent_by_owner(report)
    assert TOKEN.encode() not in sent and b"records" not in sent
    assert [m["type"] for m in _all_frames(sent)] == (["hello", "proof"] if with_token else [])


@needs_root
@needs_linux
def test_an_impostor_on_a_unix_socket_is_refused_by_its_owner_and_gets_nothing(
    node: str,  # noqa: F811 (the fixture imported above)
) -> None:
    shared = Path(tempfile.mkdtemp(prefix="sl-", dir="/tmp"))  # short: sun_path is 108 bytes
    shared.chmod(0o1777)
    path = str(shared / "gw.sock")
    try:
        with Stranger(impostor(path)) as fake:
            address = f"unix://{path}"
            refusals = [python_connects(address, None, flavour) for flavour in ("sync", "async")]
            refusals.append(node_connects(node, address, None)["message"])
            report = fake.finish()
    finally:
        subprocess.run(["rm", "-rf", str(shared)], check=False)
    for refusal in refusals:
        assert f"runs as uid {STRANGER}, not uid 0" in refusal, refusal
    assert sent_by_owner(report) == [b""] * 3, "nothing at all is sent to it"


@needs_root
@needs_linux
def test_service_user_names_the_user_a_client_expects_instead_of_its_own(
    tmp_path: Path,
) -> None:
    with stopped_service_port(tmp_path) as (address, port), Stranger(impostor(port)):
        with connect(address, service_user=STRANGER) as sl:  # told to trust uid 65534
            assert sl.server == "sessionlane/0.1"
        with pytest.raises(Unauthorized, match=f"runs as uid {STRANGER}, not uid 0"):
            connect(address, service_user="root")
        with connect(address, service_user="*") as sl:
            assert sl.connected
        told = cli(
            "status",
            "--listen",
            address,
            "--service-user",
            str(STRANGER),
            env={"XDG_RUNTIME_DIR": str(tmp_path)},
        )
        assert (told.returncode, told.stdout.strip()) == (0, "no active session files"), told
        unknown = cli("status", "--listen", address, "--service-user", "no-such-user-here")
        assert unknown.returncode == 2 and "config key service_user" in unknown.stderr


# The state directory -------------------------------------------------------------------------


def test_a_state_directory_that_is_not_private_is_refused_saying_what_to_do(
    tmp_path: Path,
) -> None:
    fresh = private_dir(tmp_path / "fresh")
    assert fresh.stat().st_mode & 0o777 == 0o700
    assert private_dir(fresh) == fresh, "ours and private: used as it is"

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(StateDirError, match=r"writable by other users \(mode 0777\)") as e:
        private_dir(shared)
    assert f"chmod 700 {shared}" in str(e.value)
    assert shared.stat().st_mode & 0o777 == 0o777, "refused, and left as it was"

    readable = tmp_path / "readable"
    readable.mkdir()
    readable.chmod(0o755)  # ours, and nobody else can write in it: made private
    assert private_dir(readable) == readable
    assert readable.stat().st_mode & 0o777 == 0o700

    link = tmp_path / "link"
    link.symlink_to(fresh)
    with pytest.raises(StateDirError, match="is a symbolic link"):
        private_dir(link)

    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(StateDirError, match="is not a directory"):
        private_dir(plain)


def test_status_refuses_a_state_directory_open_to_others(tmp_path: Path) -> None:
    run = tmp_path / "run"
    planted = run / f"sessionlane-{os.getuid()}"
    planted.mkdir(parents=True)
    planted.chmod(0o777)
    done = cli("status", env={"XDG_RUNTIME_DIR": str(run)})
    assert done.returncode == 2, done
    assert f"the state directory {planted} is writable by other users" in done.stderr


@needs_root
@needs_linux
def test_a_state_directory_planted_by_another_user_is_refused_and_the_planted_port_untouched(
    tmp_path: Path,
) -> None:
    shared = Path(tempfile.mkdtemp(prefix="sl-shared-", dir="/tmp"))  # /tmp-like: 1777
    shared.chmod(0o1777)
    ours = shared / f"sessionlane-{os.getuid()}"
    try:
        with stopped_service_port(tmp_path) as (address, port):

            def plant(ready: Callable[[Any], None], done_fd: int) -> Any:
                ours.mkdir()
                ours.chmod(0o777)
                state = {"pid": os.getppid(), "listen": address, "addresses": [address]}
                (ours / "serve-000000000000.json").write_text(json.dumps(state))
                return impostor(port)(ready, done_fd)

            with Stranger(plant) as fake:
                done = cli("status", env={"XDG_RUNTIME_DIR": str(shared)})
                stopped = cli("stop", env={"XDG_RUNTIME_DIR": str(shared)})
                report = fake.finish()
        for refused in (done, stopped):
            assert refused.returncode == 2, refused
            assert f"the state directory {ours} belongs to uid {STRANGER}" in refused.stderr
            assert "XDG_RUNTIME_DIR" in refused.stderr, "says what to do"
        assert report["received"] == [], "status never connected to the planted port"
    finally:
        subprocess.run(["rm", "-rf", str(shared)], check=False)
