"""The Python client's connections and what it refuses before sending, on both surfaces.

As in ``test_client.py``, every test runs once through ``connect`` and once through
``connect_async`` (the ``client`` fixture), against real services over real sockets; the few
behaviours only the asyncio surface has (``await`` / ``async with`` a client, cancelling a
task) are tested on it alone, at the end. Orderings are forced with threads, events and the
service's own state, never with sleeps; waiting for an event is a bounded poll.
"""

# ruff: noqa: F811  (the fixtures of client_surfaces are imported, then named as arguments)

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from client_surfaces import (  # noqa: F401 (fixtures)
    CLIENT_KEEPALIVE,
    MAX_RECORD_BYTES,
    Surface,
    client,
    clients,
    file_status,
    lines,
    no_reply_margin,
    other,
    path,
    pool,
    root,
    service,
    sl,
)
from ports import listen_port
from waiting import eventually, eventually_async

import sessionlane
from sessionlane.messages.codec import HEADER, encode
from sessionlane.messages.errors import (
    InvalidRecord,
    LeaseRevoked,
    SessionLaneError,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from sessionlane.messages.wire import Acquire, Hello
from sessionlane.system import client as client_package
from sessionlane.system.client._async import AsyncSessionLane, connect_async
from sessionlane.system.client._core import default_address
from sessionlane.system.runtime.service import Service, embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(60)]


# Connections -------------------------------------------------------------------------------


def test_an_idle_connection_is_kept_alive(sl: Any, service: Service, path: str) -> None:
    lease = sl.lane("agent").acquire(path)
    assert lease is not None
    # A raw connection that says hello and then nothing is dropped by the service ...
    host, port = service.address.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        body = encode(Hello(id=1, client="silent"))
        raw.sendall(HEADER.pack(len(body)) + body)
        while raw.recv(4096):  # the welcome, then EOF once the keepalive limit passed
            pass
    # ... the client, just as idle meanwhile, kept its connection and its lease.
    assert lease.revoked is None
    assert lease.append({"alive": True}).lines == 1
    lease.release()


def test_a_lost_socket_revokes_the_lease_and_writes_nothing(
    client: Surface, sl: Any, other: Any, path: str
) -> None:
    lease = sl.lane("agent").acquire(path)
    assert lease is not None
    lease.append({"n": 1})
    # The connection (and the lease's direct channel) breaks underneath the client, sending
    # side first: the next send fails before the reader has heard of it (the harder case).
    for sock in reversed(client.sockets_of(sl)):  # the gateway's last: its loss closes the rest
        sock.shutdown(socket.SHUT_WR)
    with pytest.raises(LeaseRevoked):
        lease.append({"n": 2})
    assert lease.revoked == "connection_lost"
    # The service abandoned the lease with the connection: another lane gets the path.
    with other.lane("next").lease(path, wait_timeout=10.0) as after:
        assert after is not None and after.fence > lease.fence
    assert lines(path) == [{"n": 1}]
    # The next call reconnects.
    assert sl.lane("agent").append(path, {"n": 3}).lines == 1
    assert lines(path) == [{"n": 1}, {"n": 3}]


GRACE_MS = 1500
"""The restarted service's reclaim grace in the restart tests here (short: nobody reclaims)."""

STOPPED_RECONNECT_FOR = 2.0
"""How long the client rides out the stopped service: a lease it cannot reclaim is lost once
that window has passed (one window: the append waits for the background reclaim's outcome),
and the second service is listening before the client needs it again."""


def test_a_stopped_service_revokes_the_lease_and_a_new_one_is_reconnected_to(
    client: Surface, tmp_path: Path
) -> None:
    roots = [str(tmp_path)]
    listen = f"tcp://127.0.0.1:{listen_port()}"
    path = str(tmp_path / "restart.jsonl")
    with embedded_service(roots, listen=listen, log_file=tmp_path / "first.log") as first:
        sl = client.connect(
            first.address, keepalive=CLIENT_KEEPALIVE, reconnect_for=STOPPED_RECONNECT_FOR
        )
        lease = sl.lane("agent").acquire(path)
        assert lease is not None
        lease.append({"n": 1})
        first.stop()
        with pytest.raises(LeaseRevoked):
            lease.append({"n": 2})
        assert lease.revoked is not None
        assert lines(path) == [{"n": 1}]
    try:
        with embedded_service(
            roots, listen=listen, log_file=tmp_path / "second.log", reclaim_grace_ms=GRACE_MS
        ):
            # Reconnected to a new service, which keeps the file for its holder from before the
            # restart until the grace ends: it cannot know this client gave the lease up.
            (awaiting,) = sl.status(path).files
            assert awaiting.holder is not None and awaiting.holder.lease == lease.id
            assert awaiting.holder.lane.endswith("(awaiting reclaim)")
            with sl.lane("agent").lease(path) as again:  # granted once the grace is over
                assert again is not None
                assert again.fence > lease.fence  # fences persist across services
                again.append({"n": 3})
            with pytest.raises(LeaseRevoked):
                lease.append({"n": 4})  # the old lease stays dead on the new connection
    finally:
        sl.close()
    assert lines(path) == [{"n": 1}, {"n": 3}]


def test_a_closed_client_revokes_its_leases_and_refuses_calls(
    client: Surface, service: Service, other: Any, path: str
) -> None:
    sl = client.connect(service.address)
    assert sl.connected and sl.server
    lease = sl.lane("agent").acquire(path)
    assert lease is not None
    sl.close()
    assert not sl.connected
    assert lease.revoked == "connection_closed"
    with pytest.raises(LeaseRevoked):
        lease.append({"x": 1})
    with pytest.raises(Unavailable):
        sl.status()
    with pytest.raises(Unavailable, match="closed"):
        sl.reconnect()  # a closed client stays closed
    assert not sl.connected
    # The service abandoned the lease with the connection.
    with other.lane("agent").lease(path, wait_timeout=10.0) as after:
        assert after is not None and after.fence > lease.fence


def test_an_acquire_given_up_on_releases_its_late_grant(
    client: Surface, clients: Callable[[], Any], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sl, other = clients(), clients()
    holder = sl.lane("channel").acquire(path)
    assert holder is not None
    # The service would wait its default (minutes); this caller gives up after 0.2 s.
    no_reply_margin(monkeypatch)
    impatient = Acquire(lane="impatient", path=path, purpose="prompt")
    with pytest.raises(Unavailable, match="no reply to acquire"):
        client.request(other, impatient, timeout=0.2)
    wait_queued_one(sl, path)
    holder.release()

    # The grant goes to the request nobody waits for; the client hands it straight back.
    def free() -> bool:
        status = file_status(sl, path)
        return status.holder is None and status.counters["grants"] == 2

    eventually(free, "the orphaned grant to be released")
    with other.lane("next").lease(path, on_contention="fail") as lease:
        assert lease is not None


def wait_queued_one(sl: Any, path: str) -> None:
    eventually(lambda: file_status(sl, path).queue, "a queued request")


def test_calls_racing_to_reconnect_share_one_connection_and_none_overtakes_its_hello(
    client: Surface, sl: Any, path: str, pool: ThreadPoolExecutor
) -> None:
    client.socket_of(sl).shutdown(socket.SHUT_RDWR)
    eventually(lambda: not sl.connected, "the loss noticed by the reader")
    # A request sent before the new connection's hello would make the service close it.
    results = [pool.submit(sl.lane(f"w{n}").append, path, {"n": n}) for n in range(3)]
    assert sorted(f.result(timeout=20).lines for f in results) == [1, 1, 1]
    assert sorted(r["n"] for r in lines(path)) == [0, 1, 2]
    assert sl.core.link.generation == 2  # one reconnect for the three of them


# What the client refuses before sending ----------------------------------------------------

UNSTORABLE: list[tuple[str, list[Any]]] = [
    ("a set", [{"tags": {1, 2}}]),
    ("bytes", [{"blob": b"\x00\x01"}]),
    ("a list, not an object", [["a"]]),
    ("a string, not an object", ["text"]),
    ("a non-string key", [{1: "one"}]),
    ("a non-string nested key", [{"meta": {("a", "b"): 1}}]),
    ("NaN", [{"score": float("nan")}]),
    ("infinity", [{"score": float("-inf")}]),
    ("an integer msgpack cannot carry", [{"n": 2**70}]),
    ("a lone surrogate", [{"text": "\ud800"}]),
    ("an object", [{"when": object()}]),
    ("nesting past the limit", [{"deep": json.loads("[" * 150 + "]" * 150)}]),
    ("a record over max_record_bytes", [{"big": "x" * MAX_RECORD_BYTES}]),
    ("a good record before a bad one", [{"ok": 1}, {"tags": {3}}]),
    ("an empty batch", []),
]


@pytest.mark.parametrize(
    "records", [records for _, records in UNSTORABLE], ids=[name for name, _ in UNSTORABLE]
)
def test_a_record_that_cannot_be_stored_raises_invalid_record_before_anything_is_sent(
    client: Surface, service: Service, path: str, records: list[Any]
) -> None:
    with client.connect(service.address, max_record_bytes=MAX_RECORD_BYTES) as sl:
        lane = sl.lane("agent")
        with lane.lease(path) as lease:
            assert lease is not None
            lease.append({"n": 1})
            with pytest.raises(InvalidRecord) as on_lease:
                lease.append(*records)
            with pytest.raises(InvalidRecord):
                lease.rewrite(records or [["not an object"]])
            # Nothing reached the service (it counts the records it refuses) ...
            assert file_status(sl, path).counters["invalid_records"] == 0
            # ... and the lease and its connection go on as if nothing happened.
            assert lease.revoked is None
            assert lease.append({"n": 2}).lines == 1
        with pytest.raises(InvalidRecord):
            lane.append(path, *records)
        assert lane.append(path, {"n": 3}).lines == 1
    assert isinstance(on_lease.value, SessionLaneError)
    assert on_lease.value.code == "invalid_record"
    assert lines(path) == [{"n": 1}, {"n": 2}, {"n": 3}]


def test_a_batch_over_max_frame_bytes_raises_too_large_and_the_lease_keeps_holding(
    sl: Any, path: str
) -> None:
    # Each record is within the service's max_record_bytes; together they exceed its frame
    # limit (8 MiB), which would make the service drop the connection and with it the lease.
    record = {"chunk": "x" * (MAX_RECORD_BYTES - 64)}
    batch = [record] * (8 * 1024 * 1024 // (MAX_RECORD_BYTES - 64) + 16)
    with sl.lane("agent").lease(path) as lease:
        assert lease is not None
        with pytest.raises(TooLarge, match="nothing sent"):
            lease.append(*batch)
        assert lease.revoked is None
        assert lease.append({"after": "too large"}).lines == 1
    assert lines(path) == [{"after": "too large"}]


# Addresses, tokens, connecting -------------------------------------------------------------


def test_connecting_to_nothing_fails_at_once_unless_asked_to_keep_trying(client: Surface) -> None:
    address = f"127.0.0.1:{listen_port()}"
    started = time.monotonic()
    with pytest.raises(Unavailable, match=r"cannot reach sessionlane at 127\.0\.0\.1:.*refused"):
        client.connect(address)
    assert time.monotonic() - started < 2.0  # one attempt, no retries (was 10.7 s)


def test_connecting_to_nothing_raises_unavailable_after_bounded_retries(client: Surface) -> None:
    started = time.monotonic()
    with pytest.raises(Unavailable):
        client.connect(f"tcp://127.0.0.1:{listen_port()}", reconnect_for=0.3)
    assert time.monotonic() - started < 5.0


def test_reconnect_for_keeps_trying_until_the_service_comes_up(
    client: Surface, tmp_path: Path, pool: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    listen = f"tcp://127.0.0.1:{listen_port()}"
    refused = client.observe_refusals(monkeypatch)
    waiting = pool.submit(client.connect, listen, reconnect_for=60.0)
    assert refused.wait(30), "the first attempt was refused"
    with (
        embedded_service([str(tmp_path)], listen=listen, log_file=tmp_path / "log"),
        waiting.result(timeout=60) as sl,
    ):
        assert sl.lane("late").append(str(tmp_path / "late.jsonl"), {"n": 1}).lines == 1


def test_every_address_spelling_reaches_the_service(
    client: Surface, service: Service, path: str
) -> None:
    host_port = service.address.removeprefix("tcp://")
    for spelling in (service.address, host_port, f" {host_port} "):
        with client.connect(spelling) as sl:
            sl.lane("spelling").append(path, {"via": spelling.strip()})
    assert [r["via"] for r in lines(path)] == [service.address, host_port, host_port]


def test_a_malformed_address_raises_value_error_naming_the_accepted_forms(
    client: Surface,
) -> None:
    for address in ("localhost", "http://127.0.0.1:80", "unix:relative.sock"):
        with pytest.raises(ValueError, match=r"HOST:PORT, tcp://HOST:PORT or unix:///"):
            client.connect(address)
    with pytest.raises(ValueError, match="IPv6 host must be in brackets"):
        client.connect("::1:7420")


def test_connect_without_an_address_uses_sessionlane_listen(
    client: Surface, service: Service, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SESSIONLANE_LISTEN", raising=False)
    assert default_address() == "tcp://127.0.0.1:7420"
    monkeypatch.setenv("SESSIONLANE_LISTEN", service.address.removeprefix("tcp://"))
    with client.connect() as sl:
        assert sl.lane("env").append(path, {"via": "env"}).lines == 1


def test_a_unix_socket_with_a_token_refuses_clients_without_it(
    client: Surface, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-0123456789\n")
    token_file.chmod(0o600)
    with tempfile.TemporaryDirectory(prefix="sl-", dir="/tmp") as short:  # sun_path is short
        listen = f"unix://{short}/gw.sock"
        path = str(tmp_path / "unix.jsonl")
        with embedded_service(
            [str(tmp_path)], listen=listen, token_file=str(token_file), log_file=tmp_path / "log"
        ) as svc:
            with pytest.raises(Unauthorized):
                client.connect(svc.address)
            with pytest.raises(Unauthorized):
                client.connect(svc.address, token="wrong")
            with client.connect(svc.address, token="s3cret-0123456789") as sl:
                assert sl.lane("agent").append(path, {"via": "unix"}).lines == 1
    assert lines(path) == [{"via": "unix"}]


def test_a_token_read_from_a_file_with_its_trailing_newline_is_accepted(
    client: Surface, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-0123456789\n")
    token_file.chmod(0o600)
    path = str(tmp_path / "token.jsonl")
    with embedded_service(
        [str(tmp_path)], token_file=str(token_file), log_file=tmp_path / "log"
    ) as svc:
        with client.connect(svc.address, token=token_file.read_text()) as sl:
            assert sl.lane("agent").append(path, {"token": "file"}).lines == 1
        with pytest.raises(Unauthorized):
            client.connect(svc.address, token="s3cret-0123456789-not")
    assert lines(path) == [{"token": "file"}]


# Logging -----------------------------------------------------------------------------------

LOSE_THE_CONNECTION = {
    "sync": """
from sessionlane.system.client import connect

sl = connect(sys.argv[1])
link = sl.core.link
link.transport.shutdown(socket.SHUT_RDWR)  # the connection breaks under the client
deadline = time.monotonic() + 30
while sl.core.link is link and time.monotonic() < deadline:  # the reader reports it lost
    time.sleep(0.01)
print("lost" if sl.core.link is not link else "not lost", flush=True)
sl.close()
""",
    "async": """
import asyncio
from sessionlane.system.client import connect_async

async def main():
    sl = await connect_async(sys.argv[1])
    link = sl.core.link
    link.transport.writer.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
    deadline = time.monotonic() + 30
    while sl.core.link is link and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    print("lost" if sl.core.link is not link else "not lost", flush=True)
    await sl.close()

asyncio.run(main())
""",
}


@pytest.mark.parametrize("host_logging", [False, True], ids=["unconfigured", "configured"])
def test_a_lost_connection_is_logged_never_printed_to_the_hosts_stderr(
    client: Surface, service: Service, host_logging: bool
) -> None:
    setup = "import logging; logging.basicConfig(level=logging.WARNING)" if host_logging else ""
    script = f"import socket, sys, time\n{setup}\n{LOSE_THE_CONNECTION[client.name]}"
    result = subprocess.run(
        [sys.executable, "-c", script, service.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lost"
    if host_logging:  # the warning exists, as a log record of the client's module logger
        assert "WARNING:sessionlane.client:sessionlane tcp://" in result.stderr
    else:  # and a host that configured no logging sees nothing on its stderr
        assert result.stderr == ""


# Only the asyncio surface ------------------------------------------------------------------

SCENARIO_S = 30.0


def run(scenario: Any) -> Any:
    """Run one scenario on a fresh event loop, failing (not hanging) after a bound."""
    return asyncio.run(asyncio.wait_for(scenario, SCENARIO_S))


def test_connect_async_can_be_awaited_or_entered(service: Service, path: str) -> None:
    async def scenario() -> None:
        sl = await connect_async(service.address)
        assert sl.connected and sl.server
        await sl.lane("a").append(path, {"via": "await"})
        await sl.close()
        assert not sl.connected
        async with connect_async(service.address) as entered:
            await entered.lane("a").append(path, {"via": "async with"})
        assert not entered.connected
        # ``sessionlane.system.client.connect_async`` hands out the same client.
        async with client_package.connect_async(service.address) as same:
            assert isinstance(same, AsyncSessionLane)
            await same.lane("a").append(path, {"via": "sessionlane.system.client"})

    run(scenario())
    assert [r["via"] for r in lines(path)] == ["await", "async with", "sessionlane.system.client"]


def test_sessionlane_connect_async_is_entered_with_async_with(service: Service, path: str) -> None:
    async def scenario() -> None:
        async with sessionlane.connect_async(service.address.removeprefix("tcp://")) as sl:
            assert sl.connected
            async with sl.lane("a").lease(path) as lease:
                assert lease is not None
                await lease.append({"via": "sessionlane.connect_async"})
        assert not sl.connected

    run(scenario())
    assert lines(path) == [{"via": "sessionlane.connect_async"}]


def test_a_cancelled_acquire_releases_its_late_grant(service: Service, path: str) -> None:
    async def status(sl: AsyncSessionLane) -> Any:
        (file,) = (await sl.status(path)).files
        return file

    async def scenario() -> None:
        async with connect_async(service.address) as sl, connect_async(service.address) as other:
            holder = await sl.lane("channel").acquire(path)
            assert holder is not None
            waiting = asyncio.create_task(other.lane("impatient").acquire(path))

            async def queued() -> bool:
                return bool((await status(sl)).queue)

            await eventually_async(queued, "the acquire queued")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await holder.release()

            # The grant goes to the cancelled request; the client hands it straight back.
            async def free() -> bool:
                file = await status(sl)
                return file.holder is None and file.counters["grants"] == 2

            await eventually_async(free, "the orphaned grant to be released")
            async with other.lane("next").lease(path, on_contention="fail") as lease:
                assert lease is not None

    run(scenario())
