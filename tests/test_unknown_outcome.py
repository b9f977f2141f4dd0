"""A write whose own connection is lost after it was sent may be in the file (issue #22).

The Python client raises ``UnknownOutcome`` ("read the file"), never ``StaleFence`` or a plain
``Unavailable``, as the Node client does (``clients/node/test/unknown-outcome.test.mts``). The
service is a peer on a real Unix socket that grants, then closes the connection the moment a
write arrives: the order is the peer's, no sleep decides it.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessionlane.messages.codec import FrameReader, decode_request, frame
from sessionlane.messages.wire import Acquire, Granted, Welcome
from sessionlane.system.client import LeaseRevoked, StaleFence, Unavailable, UnknownOutcome, connect

pytestmark = pytest.mark.timeout(60)


@contextlib.contextmanager
def cut_on_write(tmp_path: Path) -> Iterator[tuple[str, queue.Queue[str]]]:
    """A service that grants every acquire and, when a write arrives, cuts the connection and
    stops listening; the queue names the write it cut on."""
    path = str(tmp_path / "peer.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    cuts: queue.Queue[str] = queue.Queue()

    def serve(conn: socket.socket) -> None:
        reader = FrameReader(1 << 20)
        with conn:
            while data := conn.recv(65536):
                for body in reader.feed(data):
                    request = decode_request(body)
                    if request.type == "hello":
                        conn.sendall(frame(Welcome(id=request.id, server="peer", protocol=1)))
                    elif isinstance(request, Acquire):
                        granted = Granted(
                            id=request.id,
                            lease="l-1",
                            fence=3,
                            path=request.path,
                            purpose=request.purpose,
                        )
                        conn.sendall(frame(granted))
                    elif request.type in ("append", "rewrite"):
                        with contextlib.suppress(OSError):  # and the service is gone for good
                            server.shutdown(socket.SHUT_RDWR)  # (wakes the blocked accept)
                        conn.shutdown(socket.SHUT_RDWR)  # received: its answer never comes
                        cuts.put(request.type)
                        return

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"unix://{path}", cuts
    finally:
        server.close()


def test_an_append_under_a_lease_whose_connection_is_cut_has_an_unknown_outcome(
    tmp_path: Path,
) -> None:
    with cut_on_write(tmp_path) as (address, cuts), connect(address, keepalive=30) as sl:
        lease = sl.lane("main").acquire("/srv/a.jsonl")
        with pytest.raises(UnknownOutcome, match="read it") as lost:
            lease.append({"n": 1})
        assert cuts.get(timeout=5) == "append"
        assert not isinstance(lost.value, StaleFence), "never 'nothing written'"
        assert (lost.value.code, lost.value.reason) == ("unknown_outcome", "connection_lost")
        assert isinstance(lost.value, LeaseRevoked), "the lease went with the connection"
        assert lease.revoked == "connection_lost"


@pytest.mark.parametrize("write", ["lane append", "rewrite"])
def test_a_lane_append_or_a_rewrite_whose_connection_is_cut_has_an_unknown_outcome(
    tmp_path: Path, write: str
) -> None:
    with cut_on_write(tmp_path) as (address, cuts), connect(address, keepalive=30) as sl:
        lane = sl.lane("main")
        with pytest.raises(UnknownOutcome):
            if write == "lane append":
                lane.append("/srv/a.jsonl", {"n": 1})
            else:
                lane.acquire("/srv/a.jsonl", purpose="compaction").rewrite([{"n": 1}])
        assert cuts.get(timeout=5) in ("append", "rewrite")
        with pytest.raises(Unavailable) as later:
            sl.status()
        assert not isinstance(later.value, UnknownOutcome), "nothing written: only unavailable"
