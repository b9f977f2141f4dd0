"""The gateway on real sockets: raw frames written by the test against an embedded service.

Each test talks the wire protocol byte by byte (``RawConn``), so what is checked is what any
client in any language sees: hello first, tokens, frame limits, bad frames answered with the
request's id, ``queue_full``, and a connection's leases dying with it (closed or silent).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from waiting import eventually

from sessionlane.messages import handshake
from sessionlane.system.runtime.service import Service, embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(60)]

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024
MAX_RECORD = 4 * 1024
KEEPALIVE_MS = 200


class Closed(Exception):
    """The service closed the connection."""


class RawConn:
    """One client connection speaking raw frames over ``tcp://`` or ``unix://``: no client
    library in the way. ``unaddressed``: a reply without an ``id`` (a refusal before the
    hello, say) also answers a request."""

    def __init__(self, address: str, timeout: float = 5.0, *, unaddressed: bool = False) -> None:
        if address.startswith("unix://"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(address.removeprefix("unix://"))
            except OSError:
                self.sock.close()
                raise
        else:
            host, _, port = address.removeprefix("tcp://").rpartition(":")
            self.sock = socket.create_connection((host, int(port)), timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.unaddressed = unaddressed
        self.timeout = timeout
        self.buf = bytearray()
        self.ids = iter(range(1, 1 << 30))

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: dict[str, Any]) -> None:
        body = msgpack.packb(message, use_bin_type=True)
        self.sock.sendall(HEADER.pack(len(body)) + body)

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        """The next frame from the service; ``Closed`` if it closed the connection first."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while True:
            if len(self.buf) >= HEADER.size:
                (length,) = HEADER.unpack_from(self.buf)
                if len(self.buf) >= HEADER.size + length:
                    body = bytes(self.buf[HEADER.size : HEADER.size + length])
                    del self.buf[: HEADER.size + length]
                    message: dict[str, Any] = msgpack.unpackb(body, raw=False)
                    return message
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                raise Closed
            self.buf += data

    def request(self, message: dict[str, Any], *, skip_queued: bool = True) -> dict[str, Any]:
        """Send ``message`` with a fresh id and return its first (non-``queued``) reply."""
        rid = next(self.ids)
        self.send({"v": 1, "id": rid, **message})
        while True:
            reply = self.recv()
            ours = reply.get("id") == rid or (self.unaddressed and reply.get("id") is None)
            if ours and not (skip_queued and reply["type"] == "queued"):
                return reply

    def hello(self, token: str | None = None, *, clear: bool = False) -> dict[str, Any]:
        """Say hello; with ``token``, prove it (``messages.handshake``), or send it in clear as
        protocol 1's first clients did (``clear``). A welcome's proof is checked."""
        fields: dict[str, Any] = {"type": "hello", "client": "raw-test"}
        if token is None or clear:
            return self.request(fields if token is None else {**fields, "token": token})
        nonce = os.urandom(handshake.NONCE_BYTES)
        reply = self.request({**fields, "nonce": nonce})
        if reply["type"] != "challenge":
            return reply
        theirs = reply["nonce"]
        reply = self.request(
            {"type": "proof", "proof": handshake.client_proof(token, nonce, theirs)}
        )
        if reply["type"] == "welcome":
            assert reply["proof"] == handshake.server_proof(token, nonce, theirs)
        return reply

    def acquire(self, lane: str, path: Path, **fields: Any) -> dict[str, Any]:
        return self.request(
            {"type": "acquire", "lane": lane, "path": str(path), "purpose": "prompt", **fields}
        )

    def append(self, granted: dict[str, Any], *records: dict[str, Any]) -> dict[str, Any]:
        return self.request(
            {
                "type": "append",
                "lease": granted["lease"],
                "fence": granted["fence"],
                "records": list(records),
            }
        )

    def release(self, granted: dict[str, Any]) -> dict[str, Any]:
        return self.request({"type": "release", "lease": granted["lease"]})

    def closed_by_service(self, timeout: float = 5.0) -> bool:
        """Whether the service closes the connection (without sending anything else first)."""
        try:
            extra = self.recv(timeout)
        except Closed:
            return True
        except TimeoutError:
            return False
        raise AssertionError(f"expected the connection to be closed, got {extra}")


def connect(service: Service, token: str | None = None) -> RawConn:
    conn = RawConn(service.address)
    assert conn.hello(token)["type"] == "welcome"
    return conn


def queue_length(service: Service, path: Path) -> int:
    conn = connect(service)
    try:
        files = conn.request({"type": "status", "path": str(path)})["files"]
        return len(files[0]["queue"]) if files else 0
    finally:
        conn.close()


def records_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gateway") / "sessions"
    root.mkdir()
    return root


@pytest.fixture(scope="module")
def service(roots: Path) -> Iterator[Service]:
    """One service for the tests that need no special settings (each uses its own file)."""
    with embedded_service(
        [str(roots)],
        log_file=roots.parent / "actors.log",
        max_frame_bytes=MAX_FRAME,
        max_record_bytes=MAX_RECORD,
        max_queue=2,
    ) as svc:
        yield svc


@pytest.fixture
def transcript(roots: Path, request: pytest.FixtureRequest) -> Path:
    return roots / f"{request.node.name}.jsonl"


# Hello and tokens ---------------------------------------------------------------------------


def test_the_first_request_must_be_hello_or_the_connection_is_closed(
    service: Service, transcript: Path
) -> None:
    conn = RawConn(service.address)
    reply = conn.request({"type": "keepalive"})
    assert reply["type"] == "error"
    assert reply["code"] == "bad_frame"
    assert reply["id"] == 1
    assert "hello" in reply["detail"]
    assert conn.closed_by_service()

    conn = RawConn(service.address)
    reply = conn.acquire("a", transcript)
    assert (reply["type"], reply["code"]) == ("error", "bad_frame")
    assert conn.closed_by_service()
    assert not transcript.exists()


def test_a_hello_without_or_with_a_wrong_token_gets_unauthorized_and_nothing_else(
    tmp_path: Path,
) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-0123\n")
    token_file.chmod(0o600)
    path = root / "t.jsonl"
    with embedded_service(
        [str(root)], log_file=tmp_path / "actors.log", token_file=str(token_file)
    ) as svc:
        for token, clear in (
            (None, False),
            ("wrong", False),
            ("", False),
            ("s3cret-token-0123-and-more", False),
            ("s3cret-token-0123", True),  # the right token, in clear: refused too
        ):
            conn = RawConn(svc.address)
            reply = conn.hello(token, clear=clear)
            assert reply["type"] == "error", token
            assert reply["code"] == "unauthorized", token
            assert "s3cret" not in repr(reply), "the token is never echoed"
            assert conn.closed_by_service(), f"nothing but the refusal for token {token!r}"

        conn = RawConn(svc.address)
        reply = conn.acquire("a", path)  # not even a hello
        assert (reply["type"], reply["code"]) == ("error", "unauthorized")
        assert conn.closed_by_service()
        assert not path.exists()

        conn = connect(svc, token="s3cret-token-0123")
        granted = conn.acquire("a", path)
        assert granted["type"] == "granted"
        assert conn.append(granted, {"n": 1})["type"] == "appended"
        assert conn.release(granted)["type"] == "released"
        conn.close()
    assert records_of(path) == ['{"n":1}']


# Frame limits and bad frames ----------------------------------------------------------------


def test_a_frame_declared_longer_than_max_frame_bytes_gets_too_large_and_a_close(
    service: Service,
) -> None:
    conn = connect(service)
    conn.send_raw(HEADER.pack(MAX_FRAME + 1))  # the header alone: the body is never read
    reply = conn.recv()
    assert (reply["type"], reply["code"]) == ("error", "too_large")
    assert conn.closed_by_service()

    conn = connect(service)
    assert conn.request({"type": "keepalive"})["type"] == "alive", "the service still serves"


def test_requests_before_an_oversized_header_in_the_same_read_are_answered_first(
    service: Service,
) -> None:
    conn = connect(service)
    before = [{"v": 1, "type": "keepalive", "id": i} for i in (101, 102)]
    data = b"".join(HEADER.pack(len(b)) + b for b in map(msgpack.packb, before))
    conn.send_raw(data + HEADER.pack(MAX_FRAME + 1))  # one write: one read on the service
    replies = [conn.recv(), conn.recv(), conn.recv()]
    assert [(r["type"], r.get("id")) for r in replies[:2]] == [("alive", 101), ("alive", 102)]
    assert (replies[2]["type"], replies[2]["code"]) == ("error", "too_large")
    assert conn.closed_by_service()


def test_a_record_over_max_record_bytes_is_refused_and_nothing_is_written(
    service: Service, transcript: Path
) -> None:
    conn = connect(service)
    granted = conn.acquire("a", transcript)
    big = {"text": "x" * MAX_RECORD}
    reply = conn.append(granted, {"ok": 1}, big)
    assert (reply["type"], reply["code"]) == ("error", "invalid_record")
    assert conn.append(granted, {"ok": 2})["type"] == "appended"
    assert conn.release(granted)["type"] == "released"
    conn.close()
    assert records_of(transcript) == ['{"ok":2}']


def test_a_record_nested_too_deep_is_refused_instead_of_lost_inside_the_service(
    service: Service, transcript: Path
) -> None:
    conn = connect(service)
    granted = conn.acquire("a", transcript)
    deep: dict[str, Any] = {}
    level = deep
    for _ in range(600):  # deep enough that pickling it between actors would fail
        level["a"] = level = {}
    reply = conn.append(granted, {"ok": 1}, deep)
    assert (reply["type"], reply["code"]) == ("error", "invalid_record")
    assert "nested" in reply["detail"]
    nested_a_little: dict[str, Any] = {"a": [{"b": {"c": [1, 2, {"d": "e"}]}}]}
    assert conn.append(granted, nested_a_little)["type"] == "appended"
    conn.close()
    assert len(records_of(transcript)) == 1


def test_a_truncated_frame_then_a_close_does_not_disturb_other_connections(
    service: Service, transcript: Path
) -> None:
    holder = connect(service)
    granted = holder.acquire("holder", transcript)
    assert holder.append(granted, {"turn": "holder", "seq": 0})["type"] == "appended"

    broken = connect(service)
    body = msgpack.packb({"v": 1, "id": 9, "type": "keepalive"})
    broken.send_raw(HEADER.pack(len(body) + 100) + body)  # promises 100 bytes more
    broken.close()

    assert holder.append(granted, {"turn": "holder", "seq": 1})["type"] == "appended"
    assert holder.release(granted)["type"] == "released"
    other = connect(service)
    again = other.acquire("other", transcript)
    assert again["type"] == "granted"
    assert again["fence"] > granted["fence"]
    other.close()
    holder.close()
    assert len(records_of(transcript)) == 2


@pytest.mark.parametrize(
    "message, where",
    [
        ({"type": "keepalive", "surprise": 1}, "surprise"),
        ({"type": "acquire", "lane": 5, "path": "/x.jsonl", "purpose": "prompt"}, "lane"),
        ({"type": "acquire", "lane": "a", "path": "/x.jsonl", "purpose": "nap"}, "purpose"),
        ({"type": "acquire", "lane": "a", "path": "/x.jsonl"}, "purpose"),
        ({"type": "release", "lease": ["not", "a", "string"]}, "lease"),
        ({"type": "append", "lease": "l", "fence": "1", "records": [{}]}, "fence"),
        ({"type": "append", "lease": "l", "fence": 1, "records": "nope"}, "records"),
        ({"type": "append", "records": [{}]}, "append"),
        ({"type": "recover", "lane": "a", "path": "/x.jsonl", "reason": "r", "grace_ms": -1}, ""),
        ({"type": "no_such_request"}, ""),
        ({"type": "keepalive", "v": 2}, "version"),
    ],
)
def test_unknown_fields_and_wrong_types_get_bad_frame_with_the_request_id(
    service: Service, message: dict[str, Any], where: str
) -> None:
    conn = connect(service)
    conn.send({"v": 1, "id": "req-7", **message})
    reply = conn.recv()
    assert reply["type"] == "error"
    assert reply["code"] == "bad_frame"
    assert reply["id"] == "req-7"
    assert where in reply["detail"]
    assert conn.request({"type": "keepalive"})["type"] == "alive", "the connection stays usable"
    conn.close()


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never used in msgpack
        msgpack.packb([1, 2, 3]),
        msgpack.packb("hello"),
        msgpack.packb({1: "int key"}),
        msgpack.packb({"v": 1, "id": 3, "type": "keepalive", "x": msgpack.ExtType(1, b"ab")}),
        b"",
        msgpack.packb({"v": 1, "type": "keepalive"}) + b"trailing",
    ],
    ids=["reserved-byte", "array", "string", "int-key", "ext-type", "empty", "trailing-bytes"],
)
def test_undecodable_frames_get_bad_frame_and_the_connection_stays_usable(
    service: Service, body: bytes
) -> None:
    conn = connect(service)
    conn.send_raw(HEADER.pack(len(body)) + body)
    reply = conn.recv()
    assert (reply["type"], reply["code"]) == ("error", "bad_frame")
    assert conn.request({"type": "keepalive"})["type"] == "alive"
    conn.close()


def test_a_keepalive_request_gets_alive(service: Service) -> None:
    conn = connect(service)
    conn.send({"v": 1, "id": "ka-1", "type": "keepalive"})
    assert conn.recv() == {"v": 1, "id": "ka-1", "type": "alive"}
    conn.close()


# Queue bound ---------------------------------------------------------------------------------


def test_max_queue_answers_queue_full_instead_of_queueing(
    service: Service, transcript: Path
) -> None:
    holder = connect(service)
    granted = holder.acquire("holder", transcript)
    waiters = [connect(service) for _ in range(3)]
    for i, waiter in enumerate(waiters[:2]):
        reply = waiter.request(
            {"type": "acquire", "lane": f"w{i}", "path": str(transcript), "purpose": "prompt"},
            skip_queued=False,
        )
        assert (reply["type"], reply["position"]) == ("queued", i + 1)
    reply = waiters[2].acquire("w2", transcript)
    assert (reply["type"], reply["code"]) == ("error", "queue_full")
    assert waiters[2].request({"type": "keepalive"})["type"] == "alive"

    assert holder.release(granted)["type"] == "released"
    first = waiters[0].recv()
    assert (first["type"], first["fence"]) == ("granted", granted["fence"] + 1)
    for conn in [holder, *waiters]:
        conn.close()


# A connection's leases die with it ------------------------------------------------------------


def test_a_closed_connections_lease_is_abandoned_and_the_next_waiter_granted_within_a_second(
    service: Service, transcript: Path
) -> None:
    holder = connect(service)
    granted = holder.acquire("holder", transcript)
    assert holder.append(granted, {"turn": "holder"})["type"] == "appended"
    waiter = connect(service)
    queued = waiter.request(
        {"type": "acquire", "lane": "waiter", "path": str(transcript), "purpose": "prompt"},
        skip_queued=False,
    )
    assert queued["type"] == "queued"

    started = time.monotonic()
    holder.close()
    reply = waiter.recv()
    latency = time.monotonic() - started

    assert reply["type"] == "granted"
    assert reply["fence"] > granted["fence"]
    print(f"abandon after close: next waiter granted in {latency * 1000:.1f} ms")
    assert latency < 1.0
    assert waiter.append(reply, {"turn": "waiter"})["type"] == "appended"
    stale = holder_stale_write(service, granted)
    assert (stale["type"], stale["code"]) == ("error", "stale_fence")
    waiter.close()
    assert records_of(transcript) == ['{"turn":"holder"}', '{"turn":"waiter"}']


def holder_stale_write(service: Service, granted: dict[str, Any]) -> dict[str, Any]:
    """A write under the dead connection's lease, from another connection: refused."""
    conn = connect(service)
    try:
        return conn.append(granted, {"turn": "ghost"})
    finally:
        conn.close()


def test_a_live_lease_used_from_another_connection_is_refused_by_the_file_and_changes_nothing(
    service: Service, transcript: Path
) -> None:
    """The lease id routes the request to its file (no mirror in the gateway); the file
    accepts it only from the holder's own connection."""
    holder, thief = connect(service), connect(service)
    try:
        granted = holder.acquire("holder", transcript)
        assert holder.append(granted, {"turn": "holder"})["type"] == "appended"
        stolen = thief.append(granted, {"turn": "thief"})
        assert (stolen["type"], stolen["code"]) == ("error", "not_holder")
        release = thief.request({"type": "release", "lease": granted["lease"]})
        assert (release["type"], release["code"]) == ("error", "not_holder")
        made_up = thief.request({"type": "release", "lease": "0123456789abcdef-1"})
        assert (made_up["type"], made_up["code"]) == ("error", "not_holder")
        assert holder.append(granted, {"turn": "still holder"})["type"] == "appended"
    finally:
        holder.close()
        thief.close()
    assert records_of(transcript) == ['{"turn":"holder"}', '{"turn":"still holder"}']


def test_a_silent_client_loses_its_lease_after_about_three_keepalive_periods(
    tmp_path: Path,
) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    path = root / "ka.jsonl"
    with embedded_service(
        [str(root)], log_file=tmp_path / "actors.log", keepalive_ms=KEEPALIVE_MS
    ) as svc:
        silent = connect(svc)
        # The service's silence clock starts when the acquire arrives: no earlier than it was
        # sent. Timed from the reply instead, a slow reply would shorten the measured silence.
        last_sent = time.monotonic()
        granted = silent.acquire("silent", path)  # from here on it sends nothing, keeps the socket

        waiter = connect(svc)
        rid = 100
        waiter.send(
            {
                "v": 1,
                "id": rid,
                "type": "acquire",
                "lane": "w",
                "path": str(path),
                "purpose": "prompt",
            }
        )
        reply: dict[str, Any] = {}
        next_keepalive = 0.0
        while reply.get("type") != "granted":
            now = time.monotonic()
            assert now - last_sent < 10 * KEEPALIVE_MS / 1000, "the silent holder was never dropped"
            if now >= next_keepalive:  # the waiter itself stays alive
                waiter.send({"v": 1, "type": "keepalive"})
                next_keepalive = now + KEEPALIVE_MS / 2000
            try:
                reply = waiter.recv(timeout=max(0.001, next_keepalive - now))
            except TimeoutError:
                continue
            assert reply["type"] in ("queued", "alive", "granted"), reply
        detected = time.monotonic() - last_sent

        print(f"silent holder detected after {detected * 1000:.0f} ms (keepalive {KEEPALIVE_MS})")
        assert reply["id"] == rid
        assert reply["fence"] > granted["fence"]
        assert 3 * KEEPALIVE_MS / 1000 * 0.9 <= detected < 6 * KEEPALIVE_MS / 1000
        assert silent.closed_by_service(1.0), "the silent connection was closed"
        waiter.close()


def test_a_client_that_keeps_sending_keepalives_keeps_its_lease(tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    path = root / "ka.jsonl"
    with embedded_service(
        [str(root)], log_file=tmp_path / "actors.log", keepalive_ms=KEEPALIVE_MS
    ) as svc:
        holder = connect(svc)
        granted = holder.acquire("holder", path)
        deadline = time.monotonic() + 6 * KEEPALIVE_MS / 1000
        while time.monotonic() < deadline:
            assert holder.request({"type": "keepalive"})["type"] == "alive"
            time.sleep(KEEPALIVE_MS / 4000)
        assert holder.append(granted, {"still": "holding"})["type"] == "appended"
        assert holder.release(granted)["type"] == "released"
        holder.close()


def test_status_reports_the_holder_and_the_queue(service: Service, transcript: Path) -> None:
    holder = connect(service)
    granted = holder.acquire("holder", transcript)
    waiter = connect(service)
    waiter.send(
        {
            "v": 1,
            "id": 1,
            "type": "acquire",
            "lane": "w",
            "path": str(transcript),
            "purpose": "write",
        }
    )
    eventually(lambda: queue_length(service, transcript) == 1, "one request queued", timeout=5.0)
    status = holder.request({"type": "status", "path": str(transcript)})
    (entry,) = status["files"]
    assert entry["path"] == os.path.realpath(transcript)
    assert entry["holder"]["lease"] == granted["lease"]
    assert entry["holder"]["lane"] == "holder"
    assert [(q["lane"], q["purpose"]) for q in entry["queue"]] == [("w", "write")]
    holder.close()
    waiter.close()
