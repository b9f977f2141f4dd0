"""Wire messages, the msgpack codec, framing, and that every message type has a handler.

One valid instance per wire type (``SAMPLES``) round-trips through ``encode`` and the decoder
of its direction; a type added to ``Request`` or ``Reply`` without a sample fails
``test_every_wire_type_has_a_sample``. Likewise a new internal message type fails the dispatch
test until an actor handles it or it is listed as a reply consumed outside the actors.
"""

from __future__ import annotations

import itertools
import pickle
import struct
import typing
from typing import Any

import driver
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import sessionlane.actors.links
import sessionlane.system.runtime.service
from sessionlane.actors.convention import Claimant, Directory, Relay
from sessionlane.actors.lane import Lane
from sessionlane.actors.registry import Registry
from sessionlane.actors.session_file import SessionFile
from sessionlane.messages import convention, internal
from sessionlane.messages.codec import (
    HEADER,
    FrameDecodeError,
    FrameReader,
    decode_reply,
    decode_request,
    encode,
    frame,
    unpack_map,
)
from sessionlane.messages.errors import (
    LeaseRevoked,
    LeaseTimeout,
    TooLarge,
    Unavailable,
    error_for,
)
from sessionlane.messages.wire import (
    Abandon,
    Abandoned,
    AbortRequested,
    Acquire,
    Alive,
    Append,
    Appended,
    Challenge,
    Direct,
    DirectOffer,
    Error,
    ExternalChange,
    FileStatus,
    Granted,
    Hello,
    HolderStatus,
    Keepalive,
    Proof,
    Queued,
    QueueEntry,
    Recover,
    Release,
    Released,
    Reply,
    Request,
    Revoked,
    Rewrite,
    Rewritten,
    Skipped,
    Status,
    StatusReply,
    Welcome,
)
from sessionlane.system.gateway.gateway import Gateway


def union_members(union: Any) -> set[type]:
    """The classes of a (possibly ``Annotated``) union of message types."""
    if typing.get_origin(union) is typing.Annotated:
        union = typing.get_args(union)[0]
    return set(typing.get_args(union))


REQUESTS: list[BaseModel] = [
    Hello(id=1, client="tests/1.0", token="s3cret"),
    Hello(id=1, client="tests/1.0", nonce=b"n" * 32),
    Proof(id=2, proof=b"p" * 32),
    Acquire(
        id="a-1",
        lane="agent:main:chat",
        path="sessions/s.jsonl",
        purpose="prompt",
        priority="background",
        wait_timeout_ms=0,
        max_hold_ms=1000,
        on_contention="skip",
    ),
    Release(id=2, lease="ab12cd34-7"),
    Abandon(id=3, lane="agent:main:cron", path="/srv/s.jsonl", reason="hung"),
    Append(id=4, lease="ab12cd34-7", fence=7, records=[{"n": 1, "nested": {"a": [1, "x"]}}]),
    Append(id=5, lane="agent:main:dm", path="s.jsonl", records=[{}], durability="flush"),
    Append(id=11, lease="ab12cd34-7", fence=7, records=[{}], aid="aid-0002", after="aid-0001"),
    Rewrite(id=6, lease="ab12cd34-8", fence=8, records=[{"summary": "compacted"}]),
    Recover(id=7, lane="recovery", path="s.jsonl", reason="stuck", grace_ms=5000),
    Status(id=8, path="s.jsonl"),
    Status(id=9),
    Keepalive(id=10),
    Direct(id=12, lane="agent:main:dm", path="s.jsonl"),
]

REPLIES: list[BaseModel] = [
    Welcome(id=1, server="sessionlane/0.1", protocol=1),
    Welcome(id=2, server="sessionlane/0.1", protocol=1, proof=b"s" * 32),
    Challenge(id=1, nonce=b"c" * 32),
    Queued(id="a-1", position=3),
    Granted(id=2, lease="ab12cd34-9", fence=9, path="/srv/s.jsonl", purpose="recovery"),
    Skipped(id=3, path="/srv/s.jsonl"),
    Error(id=4, code="stale_fence", detail="old fence", path="/srv/s.jsonl"),
    Error(code="bad_frame"),
    Released(id=5, lease="ab12cd34-9"),
    Abandoned(id=6, leases=["ab12cd34-9", "ff00ff00-1"]),
    Appended(id=7, offset=1024, lines=2, fence=9),
    Rewritten(id=8, lines=0, fence=10),
    StatusReply(
        id=9,
        files=[
            FileStatus(
                path="/srv/s.jsonl",
                fence=10,
                holder=HolderStatus(lane="a", lease="ab12cd34-10", purpose="prompt", held_ms=5),
                queue=[QueueEntry(lane="b", purpose="write", priority="background", waited_ms=1)],
                counters={"grants": 10},
            ),
            FileStatus(path="/srv/t.jsonl", fence=0, holder=None, queue=[], counters={}),
        ],
    ),
    Alive(id=10),
    Revoked(lease="ab12cd34-10", path="/srv/s.jsonl", reason="max_hold"),
    AbortRequested(lease="ab12cd34-10", path="/srv/s.jsonl", grace_ms=250),
    ExternalChange(lease="ab12cd34-10", path="/srv/s.jsonl", kind="truncate"),
    DirectOffer(id=13, address="sessionlane-0123456789abcdef", ticket="t" * 32, path="/srv/s"),
]


# Round trips ------------------------------------------------------------------------------


def test_every_wire_type_has_a_sample() -> None:
    assert {type(m) for m in REQUESTS} == union_members(Request)
    assert {type(m) for m in REPLIES} == union_members(Reply)


@pytest.mark.parametrize("message", REQUESTS, ids=lambda m: type(m).__name__)
def test_every_request_type_round_trips_through_the_codec(message: BaseModel) -> None:
    decoded = decode_request(encode(message))
    assert type(decoded) is type(message)
    assert decoded == message


@pytest.mark.parametrize("message", REPLIES, ids=lambda m: type(m).__name__)
def test_every_reply_and_event_type_round_trips_through_the_codec(message: BaseModel) -> None:
    decoded = decode_reply(encode(message))
    assert type(decoded) is type(message)
    assert decoded == message


def test_encoded_frames_carry_the_version_and_type_and_leave_unset_fields_out() -> None:
    body = msgpack.unpackb(encode(Status(id=9)))
    assert body == {"v": 1, "type": "status", "id": 9}
    data = frame(Keepalive(id="k"))
    assert HEADER.unpack(data[:4]) == (len(data) - 4,)


# Refusals ---------------------------------------------------------------------------------


def packed(data: Any) -> bytes:
    out: bytes = msgpack.packb(data, use_bin_type=True)
    return out


def request_map(kind: str | None, **fields: Any) -> dict[str, Any]:
    """A request map with ``v`` 1 and ``id`` 7 (``fields`` override or add)."""
    data: dict[str, Any] = {"v": 1, "id": 7}
    if kind is not None:
        data["type"] = kind
    data.update(fields)
    return {k: v for k, v in data.items() if v is not _DROP}


_DROP = object()
_ACQ = {"lane": "a", "path": "p"}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(request_map("keepalive", extra=True), id="unknown field"),
        pytest.param(request_map("release", lease="x", fence=1), id="a field of another type"),
        pytest.param(request_map("append", lease="x", fence="1", records=[{}]), id="wrong type"),
        pytest.param(request_map("append", lane="a", path="p", records=[1]), id="record not a map"),
        pytest.param(request_map("append", records=[{}]), id="neither lease nor lane"),
        pytest.param(
            request_map("append", lease="x", fence=1, lane="a", path="p", records=[{}]), id="both"
        ),
        pytest.param(request_map("acquire", **_ACQ), id="missing purpose"),
        pytest.param(request_map("acquire", **_ACQ, purpose="nap"), id="unknown purpose"),
        pytest.param(request_map("recover", **_ACQ, reason="r", grace_ms=-1), id="out of range"),
        pytest.param(request_map("frobnicate"), id="unknown type"),
        pytest.param(request_map(None), id="no type"),
        pytest.param(request_map("keepalive", v=_DROP), id="missing v"),
        pytest.param(request_map("keepalive", v=2), id="wrong version"),
        pytest.param(request_map("keepalive", v="1"), id="version as text"),
    ],
)
def test_invalid_requests_are_refused_with_the_request_id(body: dict[str, Any]) -> None:
    with pytest.raises(FrameDecodeError) as refused:
        decode_request(packed(body))
    assert refused.value.request_id == 7
    assert refused.value.code == "bad_frame"


def test_invalid_replies_are_refused_with_the_request_id() -> None:
    with pytest.raises(FrameDecodeError) as refused:
        decode_reply(packed({"v": 1, "type": "granted", "id": "r1", "lease": "x"}))
    assert refused.value.request_id == "r1"
    with pytest.raises(FrameDecodeError):  # a request is not a reply
        decode_reply(encode(Keepalive(id=1)))


@pytest.mark.parametrize(
    "body",
    [
        packed([1, 2, 3]),
        packed("keepalive"),
        packed(None),
        packed(7),
        b"",
        b"\xc1",  # never used in msgpack
        b"\x82\xa1v",  # truncated map
        packed({"v": 1, "type": "keepalive", "id": 1})[:-1],
        msgpack.packb(msgpack.ExtType(1, b"x")),
        packed({1: 1, "v": 1}),  # non-string key
    ],
)
def test_bodies_that_are_not_a_msgpack_map_are_refused_without_an_id(body: bytes) -> None:
    with pytest.raises(FrameDecodeError) as refused:
        decode_request(body)
    assert refused.value.request_id is None


@pytest.mark.parametrize("rid", [True, [1], {"a": 1}, 1.5, None])
def test_an_unusable_id_is_not_echoed(rid: Any) -> None:
    with pytest.raises(FrameDecodeError) as refused:
        decode_request(packed({"v": 1, "type": "keepalive", "id": rid, "x": 1}))
    assert refused.value.request_id is None


def test_a_map_with_an_extension_value_is_refused() -> None:
    body = msgpack.packb({"v": 1, "type": "keepalive", "id": 1, "x": msgpack.ExtType(5, b"")})
    with pytest.raises(FrameDecodeError):
        decode_request(body)


def test_the_errors_are_also_the_standard_exceptions_callers_already_catch() -> None:
    assert isinstance(LeaseTimeout("no grant"), TimeoutError)
    assert isinstance(Unavailable("down"), ConnectionError)
    assert not isinstance(LeaseRevoked("gone"), OSError)
    assert str(Unavailable("down", path="/s/a.jsonl")) == "unavailable: down [/s/a.jsonl]"


def test_a_revocation_has_its_own_code_and_keeps_its_reason_through_pickling() -> None:
    revoked = error_for("revoked", "lease L1 was revoked", "/s/a.jsonl")
    assert type(revoked) is LeaseRevoked and revoked.code == "revoked"
    original = LeaseRevoked("gone", path="/s/a.jsonl", reason="max_hold")
    copy = pickle.loads(pickle.dumps(original))
    assert (type(copy), copy.code, copy.reason, copy.path) == (
        LeaseRevoked,
        "revoked",
        "max_hold",
        "/s/a.jsonl",
    )
    timeout = pickle.loads(pickle.dumps(LeaseTimeout("late", path="/s/a.jsonl")))
    assert isinstance(timeout, TimeoutError) and timeout.path == "/s/a.jsonl"


def test_frame_decode_errors_survive_pickling() -> None:
    error = FrameDecodeError("bad", request_id="r9")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.detail, copy.request_id, copy.code) == (
        FrameDecodeError,
        "bad",
        "r9",
        "bad_frame",
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_decode_to_a_valid_message_or_a_frame_error(body: bytes) -> None:
    for decode in (decode_request, decode_reply):
        try:
            message = decode(body)
        except FrameDecodeError:
            continue
        assert isinstance(message, BaseModel)  # only if the bytes happen to be a valid message


# Framing ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(REQUESTS + REPLIES), max_size=8),
    st.lists(st.integers(min_value=0, max_value=4096), max_size=20),
)
def test_the_frame_reader_splits_a_stream_at_any_chunk_boundaries(
    messages: list[BaseModel], cuts: list[int]
) -> None:
    stream = b"".join(frame(m) for m in messages)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    reader = FrameReader(max_frame_bytes=4096)
    bodies: list[bytes] = []
    for start, end in itertools.pairwise(points):
        bodies += reader.feed(stream[start:end])
    assert bodies == [encode(m) for m in messages]
    assert reader.pending == 0


def test_the_frame_reader_refuses_an_oversized_length_before_its_body_arrives() -> None:
    reader = FrameReader(max_frame_bytes=100)
    assert reader.feed(HEADER.pack(100) + b"x" * 100) == [b"x" * 100]  # the limit is inclusive
    assert reader.feed(HEADER.pack(101)[:3]) == []  # not even a whole header yet
    with pytest.raises(TooLarge) as refused:
        reader.feed(HEADER.pack(101)[3:])  # the header alone is enough to refuse
    assert refused.value.code == "too_large"
    huge = FrameReader(max_frame_bytes=1 << 20)
    with pytest.raises(TooLarge):
        huge.feed(struct.pack(">I", 0xFFFFFFFF) + b"\x00" * 16)
    assert huge.pending <= 4 + 16


def test_the_frame_reader_returns_the_frames_before_an_oversized_header_with_the_error() -> None:
    reader = FrameReader(max_frame_bytes=100)
    bodies, error = reader.feed_until_error(HEADER.pack(2) + b"ok" + HEADER.pack(101))
    assert bodies == [b"ok"]
    assert isinstance(error, TooLarge)
    with pytest.raises(TooLarge):  # ``feed`` raises and keeps nothing
        FrameReader(max_frame_bytes=100).feed(HEADER.pack(2) + b"ok" + HEADER.pack(101))


def test_a_reader_holds_only_its_first_frame_to_the_hello_cap_and_says_how_much_room_is_left() -> (
    None
):
    reader = FrameReader(max_frame_bytes=1000, first_frame_bytes=10)
    assert reader.room == HEADER.size + 10
    assert reader.feed(HEADER.pack(5)[:2]) == []
    assert reader.room == HEADER.size + 10 - 2, "never more than one hello is buffered"
    assert reader.feed(HEADER.pack(5)[2:] + b"hello" + HEADER.pack(500) + b"y" * 500) == [
        b"hello",
        b"y" * 500,
    ], "the frames after the first are held to the frame limit"
    assert reader.room is None
    with pytest.raises(TooLarge, match="11 bytes exceeds the 10 allowed here"):
        FrameReader(max_frame_bytes=1000, first_frame_bytes=10).feed(HEADER.pack(11))


def test_one_unpack_reads_every_frame_and_names_what_it_refused() -> None:
    assert unpack_map(msgpack.packb({"k": 1})) == {"k": 1}
    with pytest.raises(FrameDecodeError, match="a channel frame must be a map"):
        unpack_map(msgpack.packb([1]), "a channel frame")
    with pytest.raises(FrameDecodeError, match="extension type 5"):
        unpack_map(msgpack.packb({"k": msgpack.ExtType(5, b"x")}))
    with pytest.raises(FrameDecodeError, match="not msgpack"):
        unpack_map(b"\xc1")


# Dispatch ---------------------------------------------------------------------------------

CONSUMED_OUTSIDE_ACTORS: dict[type, tuple[Any, ...]] = {
    internal.Configured: (driver, sessionlane.system.runtime.service),
    internal.HoldersAwaited: (sessionlane.system.runtime.service,),
    internal.Opened: (driver,),
    internal.LaneOutput: (driver,),
    internal.Drained: (driver, sessionlane.system.runtime.service),
    internal.GatewayStarted: (sessionlane.system.runtime.service,),
    internal.GatewayFailed: (sessionlane.system.runtime.service,),
    internal.Pong: (sessionlane.system.runtime.service,),
    # A lane's call and a file's reply as the links take them from and hand them to their
    # host (encoded to and decoded from channel frames): no actor sends them since every
    # request goes over a channel.
    internal.FileReply: (sessionlane.actors.links,),
    internal.LaneCall: (sessionlane.actors.links,),
}
"""Replies that end outside the actor system (or never leave a process), and the modules that
take them."""


def actor_handlers() -> dict[str, set[type]]:
    """Each actor's handler table, from instances built outside any actor system."""
    return {cls.__name__: set(cls().handlers()) for cls in (SessionFile, Registry, Lane, Gateway)}


def test_actor_classes_can_be_built_outside_an_actor_system() -> None:
    lane = Lane()
    assert lane.state is None
    assert set(lane.handlers()) == set(lane._table)


def test_a_lane_handles_every_request_its_agent_may_send() -> None:
    assert union_members(internal.LaneRequest) <= set(Lane().handlers())


def test_every_internal_message_is_handled_by_an_actor_or_consumed_by_its_caller() -> None:
    handled = set().union(*actor_handlers().values())
    members = union_members(internal.InternalMessage)
    orphans = {m.__name__ for m in members if m not in handled and m not in CONSUMED_OUTSIDE_ACTORS}
    assert orphans == set()
    assert set(CONSUMED_OUTSIDE_ACTORS) <= members
    for message, consumers in CONSUMED_OUTSIDE_ACTORS.items():
        for module in consumers:
            assert getattr(module, message.__name__, None) is message, (message, module)


def test_every_internal_message_class_is_in_the_union() -> None:
    classes = {
        obj
        for obj in vars(internal).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseModel)
        and obj.__module__ == internal.__name__
        and "kind" in obj.model_fields
    }
    assert classes == union_members(internal.InternalMessage)


def test_every_wire_reply_a_lane_may_pass_on_is_a_reply_type() -> None:
    # LaneOutput and FileReply carry any wire reply or event.
    for message in REPLIES:
        assert internal.LaneOutput(uid="u", name="n", message=message).message == message


CONVENTION_CONSUMED_OUTSIDE_ACTORS: dict[type, tuple[Any, ...]] = {
    convention.Joined: (sessionlane.system.runtime.service,),
    convention.JoinRefused: (sessionlane.system.runtime.service,),
}
"""The convention's answers to the Service's ``Join``, which it waits for outside the system."""


def test_every_convention_message_class_is_in_the_union() -> None:
    classes = {
        obj
        for obj in vars(convention).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseModel)
        and obj.__module__ == convention.__name__
        and "kind" in obj.model_fields
    }
    assert classes == union_members(convention.ConventionMessage)


def test_every_convention_message_is_handled_by_an_actor_or_consumed_by_its_caller() -> None:
    shells = (Registry, Relay, Directory, Claimant)
    handled = set().union(*(set(cls.handlers(cls.__new__(cls))) for cls in shells))
    members = union_members(convention.ConventionMessage)
    outside = CONVENTION_CONSUMED_OUTSIDE_ACTORS
    orphans = {m.__name__ for m in members if m not in handled and m not in outside}
    assert orphans == set()
    for message, consumers in outside.items():
        for module in consumers:
            assert getattr(module, message.__name__, None) is message, (message, module)
