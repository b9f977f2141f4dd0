"""A sync caller on a direct channel reads its own reply (``system/client/_handover.py``).

The file's side of the channel is a socket this test holds (``open_sync`` is made to return
the other end of a socket pair), so the test sets the order of every frame the client reads;
the gateway is a real service. What is checked: while a caller holds the read role, an event
that arrives is applied, a reply for another waiter is delivered to that waiter (by the
caller's thread, the reader thread's interest being off), and an EOF fails the caller's call
through the reader thread's loss path.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import pytest
from test_gateway import HEADER, RawConn
from waiting import eventually

from sessionlane.messages.errors import SessionLaneError
from sessionlane.system.client import _core, _sync, connect
from sessionlane.system.runtime.service import Service, embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("handover") / "sessions"
    root.mkdir()
    return root


@pytest.fixture(scope="module")
def service(roots: Path) -> Iterator[Service]:
    with embedded_service([str(roots)], log_file=roots.parent / "actors.log") as svc:
        yield svc


@pytest.fixture
def path(roots: Path, request: pytest.FixtureRequest) -> Path:
    """A transcript under the service's root (a direct channel is offered only there)."""
    return roots / f"{request.node.name}.jsonl"


class FileSide:
    """The file's end of a direct channel, in the test's hands, and who delivered what."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        client, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(None)
        self.conn = RawConn.__new__(RawConn)
        self.conn.sock, self.conn.timeout, self.conn.buf = ours, 5.0, bytearray()
        self.delivered: list[tuple[str, str]] = []  # (reply type, thread name)
        monkeypatch.setattr(_sync, "open_sync", lambda *_: client)
        real = _sync.SessionLane._deliver

        def deliver(sl: Any, link: Any, reply: Any) -> None:
            self.delivered.append((reply.type, threading.current_thread().name))
            real(sl, link, reply)

        monkeypatch.setattr(_sync.SessionLane, "_deliver", deliver)
        self.dropped_by: list[tuple[Any, str]] = []  # (link, thread name)
        real_drop = _sync.SessionLane._drop

        def drop(sl: Any, link: Any, reason: str, *, ask: bool = False) -> None:
            self.dropped_by.append((link, threading.current_thread().name))
            real_drop(sl, link, reason, ask=ask)

        monkeypatch.setattr(_sync.SessionLane, "_drop", drop)

    def request(self) -> dict[str, Any]:
        """The next request the client sent on the channel."""
        frame = self.conn.recv()
        assert "type" in frame, frame
        return frame

    def send(self, **reply: Any) -> None:
        self.conn.send({"v": 1, **reply})


def _reading(sl: Any) -> Any:
    (link,) = sl.core.direct.links.values()
    return sl._readings[link]


def _granted(side: FileSide, path: Path, lease: str) -> dict[str, Any]:
    acquire = side.request()
    assert acquire["type"] == "acquire"
    side.send(
        type="granted", id=acquire["id"], lease=lease, fence=7, path=str(path), purpose="write"
    )
    return acquire


def _held(sl: Any, pool: ThreadPoolExecutor, side: FileSide, path: Path) -> Any:
    """Lane ``a``'s lease ``L1`` on ``path``, acquired in ``pool``, granted by the file side."""
    acquiring = pool.submit(sl.lane("a").acquire, path, "write")
    _granted(side, path, "L1")
    lease = acquiring.result(10)
    assert lease is not None and lease.id == "L1"
    return lease


def test_a_caller_reading_its_reply_applies_events_and_wakes_other_waiters(
    service: Service, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    side = FileSide(monkeypatch)
    with connect(service.address) as sl, ThreadPoolExecutor(2, "caller") as pool:
        lane = sl.lane("a")
        lease = _held(sl, pool, side, path)

        mine = pool.submit(lease.append, {"n": 1})
        append = side.request()
        reading = _reading(sl)
        assert reading.lock.locked()  # the caller holds the read role: it sent after taking it
        other = pool.submit(lane.append, path, {"n": 2})  # the same channel: a lane's append
        short = side.request()
        assert short["type"] == "append" and short.get("lane") == "a"

        # An event, then the other caller's reply, both read by the first caller's thread.
        side.send(type="abort_requested", lease="L1", path=str(path), grace_ms=1000)
        side.send(type="appended", id=short["id"], offset=0, lines=1, fence=0)
        assert other.result(10).offset == 0
        assert lease.abort_requested
        assert not mine.done()
        side.send(type="appended", id=append["id"], offset=40, lines=1, fence=7)
        assert mine.result(10).offset == 40

        direct = [d for d in side.delivered if d[1] != "sessionlane-client"]  # not the gateway's
        assert [kind for kind, _ in direct] == [
            "granted",
            "abort_requested",
            "appended",
            "appended",
        ]
        assert all(name.startswith("caller") for _, name in direct), side.delivered
        eventually(lambda: not reading.lock.locked(), "the read role given back")

        releasing = pool.submit(lease.release)
        release = side.request()
        side.send(type="released", id=release["id"], lease="L1")
        releasing.result(10)
        # Given back: an event with no caller reading is the reader thread's.
        side.send(type="abort_requested", lease="L1", path=str(path), grace_ms=1000)
        eventually(
            lambda: any(n == "sessionlane-direct" for _, n in side.delivered),
            "the reader thread delivering again",
        )


def test_eof_while_a_caller_reads_fails_its_call_through_the_reader_threads_loss_path(
    service: Service, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    side = FileSide(monkeypatch)
    with connect(service.address) as sl, ThreadPoolExecutor(1, "caller") as pool:
        lease = _held(sl, pool, side, path)
        reading = _reading(sl)
        (link,) = sl.core.direct.links.values()

        appending = pool.submit(lease.append, {"n": 1})
        assert side.request()["type"] == "append"
        assert reading.lock.locked()
        side.conn.sock.close()  # the file goes away mid-request
        with pytest.raises(SessionLaneError):
            appending.result(10)
        assert link.lost is not None and "closed by the service" in link.lost
        # (Another test's connection may be ending meanwhile: only this link's drops count.)
        first = next(name for dropped, name in side.dropped_by if dropped is link)
        assert first == "sessionlane-direct", side.dropped_by
        assert lease.revoked


def test_frames_read_by_a_caller_interrupted_while_delivering_still_reach_their_waiters(
    service: Service, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    side = FileSide(monkeypatch)
    interrupted = threading.Event()
    spied = _sync.SessionLane._deliver  # the FileSide's spy

    def deliver(sl: Any, link: Any, reply: Any) -> None:
        spied(sl, link, reply)
        if reply.type == "abort_requested" and not interrupted.is_set():
            interrupted.set()
            raise KeyboardInterrupt  # as a Ctrl-C landing in the caller that reads

    monkeypatch.setattr(_sync.SessionLane, "_deliver", deliver)
    with connect(service.address) as sl, ThreadPoolExecutor(2, "caller") as pool:
        lane = sl.lane("a")
        lease = _held(sl, pool, side, path)

        mine = pool.submit(lease.append, {"n": 1})
        side.request()
        reading = _reading(sl)
        assert reading.lock.locked()
        other = pool.submit(lane.append, path, {"n": 2})
        short = side.request()
        # One write: the caller reads both frames at once and is interrupted after the first.
        event = {"v": 1, "type": "abort_requested", "lease": "L1", "path": str(path)}
        answer = {"v": 1, "type": "appended", "id": short["id"], "offset": 0, "lines": 1}
        side.conn.send_raw(
            b"".join(
                HEADER.pack(len(body)) + body
                for body in (
                    msgpack.packb({**event, "grace_ms": 1000}),
                    msgpack.packb({**answer, "fence": 0}),
                )
            )
        )
        with pytest.raises(KeyboardInterrupt):
            mine.result(10)
        assert other.result(10).offset == 0  # delivered as the interrupted caller gave back
        assert lease.abort_requested
        assert not reading.lock.locked()


def test_a_caller_whose_reply_does_not_come_gives_the_socket_back_at_its_limit(
    service: Service, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    side = FileSide(monkeypatch)
    with connect(service.address) as sl, ThreadPoolExecutor(1, "caller") as pool:
        lease = _held(sl, pool, side, path)
        reading = _reading(sl)
        monkeypatch.setattr(_core.Settings, "reply_limit", lambda self, timeout: 0.3)

        appending = pool.submit(lease.append, {"n": 1})
        late = side.request()
        with pytest.raises(SessionLaneError):
            appending.result(10)  # no reply within its limit: given up, as before
        assert not reading.lock.locked()
        # What comes after is the reader thread's: the late answer, then an event.
        side.send(type="appended", id=late["id"], offset=0, lines=1, fence=7)
        side.send(type="abort_requested", lease="L1", path=str(path), grace_ms=1000)
        eventually(lambda: lease.abort_requested, "the event applied")
        assert side.delivered[-1] == ("abort_requested", "sessionlane-direct")
