"""Fuzz: the frame decoder never fails but with ``FrameDecodeError``; a live gateway fed random
and mutated frames keeps serving everyone else correctly.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_gateway import Closed, RawConn, connect

from sessionlane.messages.codec import FrameDecodeError, decode_reply, decode_request
from sessionlane.system.runtime.service import Service, embedded_service

HEADER = struct.Struct(">I")
MAX_FRAME = 16 * 1024

# Values msgpack can carry (no ext types: the decoder refuses them anyway).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(0, 5), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "v", "id", "type", "client", "token", "lane", "path", "purpose", "priority",
    "wait_timeout_ms", "max_hold_ms", "on_contention", "lease", "fence", "records",
    "durability", "reason", "grace_ms",
]  # fmt: skip
TYPES = ["hello", "acquire", "release", "abandon", "append", "rewrite", "recover", "status"]
shaped_maps = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 2, "1"]), "type": st.sampled_from([*TYPES, "keepalive", "x"])},
    optional={"id": st.integers(-5, 5) | st.text(max_size=4) | st.none() | st.booleans()},
).flatmap(
    lambda base: st.dictionaries(st.sampled_from(FIELDS), values, max_size=5).map(
        lambda extra: {**extra, **base}
    )
)
any_maps = st.dictionaries(
    st.text(max_size=10) | st.integers(-(2**63), 2**64 - 1), values, max_size=6
)


def body_of(message: Any) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_frame_decode_error(data: bytes) -> None:
    with contextlib.suppress(FrameDecodeError):
        decode_request(data)


@settings(max_examples=300, deadline=None)
@given(shaped_maps | any_maps | values)
def test_arbitrary_msgpack_values_decode_or_raise_frame_decode_error(message: Any) -> None:
    try:
        request = decode_request(body_of(message))
    except FrameDecodeError as exc:
        assert exc.code == "bad_frame"
        assert exc.request_id is None or isinstance(exc.request_id, int | str)
        return
    assert request.v == 1
    assert request.type == message["type"]


# A live gateway ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "sessions"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def service(root: Path) -> Iterator[Service]:
    with embedded_service(
        [str(root)],
        log_file=root.parent / "actors.log",
        max_frame_bytes=MAX_FRAME,
        max_record_bytes=MAX_FRAME // 2,
        max_queue=8,
    ) as svc:
        yield svc


def valid_requests(root: Path) -> st.SearchStrategy[dict[str, Any]]:
    """Well-formed requests on a few files (the probe's included): the mutation seeds."""
    files = [str(root / f"f{i}.jsonl") for i in range(3)]
    paths = st.sampled_from([*files, str(root / "probe.jsonl")])  # contend with the probe
    write_paths = st.sampled_from(files)  # but never write into its file
    lanes = st.sampled_from(["a", "b"])
    record = st.dictionaries(st.text(max_size=5), scalars, max_size=3)
    return st.one_of(
        st.builds(dict, type=st.just("keepalive")),
        st.builds(dict, type=st.just("status"), path=paths),
        st.builds(
            dict,
            type=st.just("acquire"),
            lane=lanes,
            path=paths,
            purpose=st.sampled_from(["prompt", "write", "compaction", "recovery"]),
            on_contention=st.sampled_from(["wait", "fail", "skip"]),
            wait_timeout_ms=st.integers(0, 2000),
        ),
        st.builds(dict, type=st.just("release"), lease=st.text(min_size=1, max_size=12)),
        st.builds(dict, type=st.just("abandon"), lane=lanes),
        st.builds(
            dict,
            type=st.just("append"),
            lane=lanes,
            path=write_paths,
            records=st.lists(record, min_size=1, max_size=3),
        ),
        st.builds(
            dict,
            type=st.just("append"),
            lease=st.text(min_size=1, max_size=12),
            fence=st.integers(0, 10),
            records=st.lists(record, max_size=2),
        ),
        st.builds(
            dict,
            type=st.just("recover"),
            lane=lanes,
            path=paths,
            reason=st.just("fuzz"),
            grace_ms=st.integers(0, 50),
        ),
    ).map(lambda m: {"v": 1, **m})


def mutated(request: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    out = dict(request)
    for _ in range(data.draw(st.integers(0, 2))):
        key = data.draw(st.sampled_from([*out, *FIELDS, "surprise"]))
        if data.draw(st.booleans()) and key in out:
            del out[key]
        else:
            out[key] = data.draw(values)
    return out


def frames(root: Path) -> st.SearchStrategy[tuple[str, Any]]:
    """One step of a hostile connection: mostly requests, some mutated, some garbage."""
    requests = valid_requests(root)
    return st.one_of(
        requests.map(lambda m: ("request", m)),
        requests.map(lambda m: ("request", m)),
        st.tuples(st.just("mutate"), requests),
        st.tuples(st.just("mutate"), requests),
        shaped_maps.map(lambda m: ("frame", body_of(m))),
        values.map(lambda v: ("frame", body_of(v))),
        st.binary(max_size=64).map(lambda b: ("frame", b)),
        st.binary(min_size=1, max_size=64).map(lambda b: ("raw", b)),
    )


ENDINGS = st.sampled_from(["clean", "clean", "truncated frame", "oversized header"])


def drain(conn: RawConn, sentinel: Any) -> list[dict[str, Any]]:
    """Every frame until the reply to ``sentinel`` (or a close); at most about two seconds."""
    received: list[dict[str, Any]] = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            reply = conn.recv(timeout=max(0.01, deadline - time.monotonic()))
        except (Closed, TimeoutError, OSError):
            break
        received.append(reply)
        if reply.get("id") == sentinel and reply.get("type") == "alive":
            # Lanes answer after the gateway itself: give them a moment to be seen too.
            deadline = min(deadline, time.monotonic() + 0.03)
    return received


class Probe:
    """The well-behaved client: after each hostile connection, a full turn must work."""

    def __init__(self, service: Service, path: Path) -> None:
        self.service = service
        self.path = path
        self.last_fence = 0
        self.turns = 0

    def turn(self) -> None:
        conn = connect(self.service)
        try:
            granted = conn.acquire("probe", self.path, wait_timeout_ms=5000)
            assert granted["type"] == "granted", granted
            assert granted["fence"] > self.last_fence
            self.last_fence = granted["fence"]
            appended = conn.append(granted, {"probe": self.turns})
            assert appended["type"] == "appended", appended
            assert conn.release(granted)["type"] == "released"
            assert conn.request({"type": "keepalive"})["type"] == "alive"
        finally:
            conn.close()
        self.turns += 1


@pytest.fixture(scope="module")
def probe(service: Service, root: Path) -> Probe:
    return Probe(service, root / "probe.jsonl")


@pytest.mark.tcp
@pytest.mark.timeout(120)
@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_a_gateway_fed_hostile_frames_keeps_serving_a_well_behaved_client(
    service: Service, root: Path, probe: Probe, data: st.DataObject
) -> None:
    # Draw everything first: what the service does must not change what is drawn.
    chunks = [encode_step(step, data) for step in data.draw(st.lists(frames(root), max_size=8))]
    if data.draw(st.integers(0, 9), label="hello first unless 0"):
        chunks.insert(0, frame_of({"v": 1, "id": "h", "type": "hello", "client": "fuzz"}))
    chunks.append(frame_of({"v": 1, "id": "sentinel", "type": "keepalive"}))
    ending = data.draw(ENDINGS, label="ending")
    if ending == "truncated frame":
        chunks.append(HEADER.pack(100) + b"\x81")
    elif ending == "oversized header":
        chunks.append(HEADER.pack(data.draw(st.integers(MAX_FRAME + 1, 2**32 - 1))))

    hostile = RawConn(service.address)
    try:
        for chunk in chunks:
            hostile.send_raw(chunk)
        replies = drain(hostile, "sentinel")
    except (BrokenPipeError, ConnectionResetError):
        replies = []  # the service closed the connection: allowed
    finally:
        hostile.close()
    for reply in replies:  # whatever the service said is a valid reply
        decode_reply(body_of(reply))
        event(f"reply {reply['type']} {reply.get('code', '')}".strip())
    probe.turn()
    assert service.healthy()


def frame_of(message: Any) -> bytes:
    body = body_of(message)
    return HEADER.pack(len(body)) + body


def encode_step(step: tuple[str, Any], data: st.DataObject) -> bytes:
    kind, payload = step
    if kind == "request":
        return frame_of(payload)
    if kind == "mutate":
        return frame_of(mutated(payload, data))
    body = bytes(payload)
    return HEADER.pack(len(body)) + body if kind == "frame" else body


def test_the_probe_file_holds_exactly_the_probes_turns(probe: Probe) -> None:
    lines = probe.path.read_text().splitlines() if probe.path.exists() else []
    assert lines == [f'{{"probe":{i}}}' for i in range(probe.turns)]
