"""A model built by ``sessionlane.messages.trusted`` is the model validation would build.

Hypothesis draws the fields a SessionFile passes (only values validation accepts: the file
builds them from its own typed state), builds each model both ways and compares what anything
downstream can see: equality, the field order and values of ``__dict__`` (the wire map is
built from it: ``reply_maps``), the fields set, ``repr``, hashing, a copy with a new id, a
pickle round trip, and the wire bytes (``codec.frame``, the channel's reply frame).
A field added to a model makes the ``__dict__`` comparison fail until its builder has it.
"""

from __future__ import annotations

import pickle
import typing
from typing import Any

import pytest
from hypothesis import given, reject
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from sessionlane.messages import trusted
from sessionlane.messages.channel import reply_frame
from sessionlane.messages.codec import frame
from sessionlane.messages.internal import FileReply, LaneCall, LaneRef
from sessionlane.messages.reply_maps import reply_frame_bytes
from sessionlane.messages.wire import Acquire, Append, Appended, Granted, Purpose, Release, Released

ids = st.one_of(st.none(), st.text(max_size=12), st.integers(-(2**63), 2**63 - 1))
ints = st.integers(0, 2**63 - 1)
texts = st.text(min_size=1, max_size=40)
purposes = st.sampled_from(typing.get_args(Purpose))


def _validated(model: type[BaseModel], **fields: Any) -> Any:
    try:
        return model(**fields)
    except ValidationError:
        reject()


def _same(built: BaseModel, validated: BaseModel) -> None:
    assert type(built) is type(validated)
    assert built == validated
    assert list(built.__dict__.items()) == list(validated.__dict__.items())
    assert built.model_fields_set == validated.model_fields_set
    assert repr(built) == repr(validated)
    assert pickle.loads(pickle.dumps(built)) == validated


def _same_reply(built: BaseModel, validated: BaseModel, new_id: Any) -> None:
    _same(built, validated)
    if getattr(validated, "offsets", None) is None:
        assert hash(built) == hash(validated)
    else:  # a list field: neither hashes
        with pytest.raises(TypeError):
            hash(built)
    assert reply_frame_bytes(built) == frame(validated) == frame(built)
    assert reply_frame("lane-uid", built) == reply_frame("lane-uid", validated)
    copied = built.model_copy(update={"id": new_id})
    _same(copied, validated.model_copy(update={"id": new_id}))
    assert reply_frame_bytes(copied) == frame(validated.model_copy(update={"id": new_id}))


offsets = st.one_of(st.none(), st.lists(ints, min_size=1, max_size=5))


@given(ids, ints, ints, ints, st.sampled_from([None, True]), offsets, ids)
def test_an_appended_built_trusted_is_the_validated_one(
    rid: Any,
    offset: int,
    lines: int,
    fence: int,
    released: bool | None,
    starts: list[int] | None,
    new_id: Any,
) -> None:
    validated = _validated(
        Appended,
        id=rid,
        offset=offset,
        lines=lines,
        fence=fence,
        released=released,
        offsets=starts,
    )
    built = trusted.appended(rid, offset, lines, fence, released, starts)
    _same_reply(built, validated, new_id)


@given(ids, texts, ints, texts, purposes, st.one_of(st.none(), texts), ids)
def test_a_granted_built_trusted_is_the_validated_one(
    rid: Any, lease: str, fence: int, path: str, purpose: Purpose, secret: str | None, new_id: Any
) -> None:
    validated = _validated(
        Granted, id=rid, lease=lease, fence=fence, path=path, purpose=purpose, secret=secret
    )
    _same_reply(trusted.granted(rid, lease, fence, path, purpose, secret), validated, new_id)


@given(ids, texts, ids)
def test_a_released_built_trusted_is_the_validated_one(rid: Any, lease: str, new_id: Any) -> None:
    validated = _validated(Released, id=rid, lease=lease)
    _same_reply(trusted.released(rid, lease), validated, new_id)


@given(texts, ids, texts, st.text(max_size=12))
def test_a_file_reply_built_trusted_is_the_validated_one(
    path: str, rid: Any, lease: str, lane: str
) -> None:
    message = _validated(Released, id=rid, lease=lease)
    built = trusted.file_reply(path, message, lane)
    validated = FileReply(path=path, message=message, lane=lane)
    _same(built, validated)
    assert hash(built) == hash(validated)


requests = st.one_of(
    st.builds(Acquire, id=ids, path=texts, lane=texts, purpose=purposes),
    st.builds(Release, id=ids, lease=texts),
    st.builds(
        Append,
        id=ids,
        path=texts,
        lease=texts,
        fence=ints,
        records=st.lists(st.dictionaries(st.text(max_size=5), st.integers()), min_size=1),
        release=st.sampled_from([None, True]),
    ),
)


@given(texts, texts, st.booleans(), st.data())
def test_a_lane_call_built_trusted_is_the_validated_one(
    uid: str, path: str, canonical: bool, data: st.DataObject
) -> None:
    try:
        request = data.draw(requests)
    except ValidationError:
        reject()
    lane = LaneRef(uid=uid, name="w", address=("channel", 3), priority="background")
    built = trusted.lane_call(lane, path, canonical, request)
    validated = LaneCall(lane=lane, path=path, canonical=canonical, request=request)
    _same(built, validated)
    assert built.request is request
