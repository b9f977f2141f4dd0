"""A reply's wire bytes built from its fields (``reply_maps``) are those ``codec.frame`` gives.

Hypothesis builds every reply type from its own field types (validated, so only replies the
service could send), as built and as copied with a new id (the core copies answers so), and
compares the bytes of ``reply_frame_bytes`` with ``frame``'s, and the channel's reply frame
with a dump through pydantic.
"""

from __future__ import annotations

import typing
from typing import Any

import msgpack
from hypothesis import given, reject
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from sessionlane.messages.channel import reply_frame
from sessionlane.messages.codec import HEADER, frame
from sessionlane.messages.reply_maps import FLAT_REPLIES, reply_frame_bytes, reply_map
from sessionlane.messages.wire import Reply, StatusReply

REPLY_TYPES = typing.get_args(typing.get_args(Reply)[0])


def _fields(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={name: st.from_type(f.annotation) for name, f in model.model_fields.items()},
    )


@st.composite
def replies(draw: st.DrawFn) -> BaseModel:
    model = draw(st.sampled_from(REPLY_TYPES))
    fields = draw(_fields(model))
    fields.pop("type", None)
    fields.pop("v", None)
    try:
        message = model.model_validate(fields)
    except ValidationError:
        reject()
    if draw(st.booleans()):
        message = message.model_copy(update={"id": draw(st.integers(0, 2**40) | st.text())})
    try:
        frame(message)
    except OverflowError:  # an int msgpack cannot carry: no frame either way
        reject()
    return message


def test_every_reply_but_status_is_flat() -> None:
    assert set(FLAT_REPLIES) == set(REPLY_TYPES) - {StatusReply}


@given(replies())
def test_a_reply_frame_built_by_hand_is_byte_identical_to_codecs(message: BaseModel) -> None:
    assert reply_map(message) == message.model_dump(mode="python", exclude_none=True)
    assert reply_frame_bytes(message) == frame(message)


@given(replies(), st.text(min_size=1, max_size=20))
def test_a_channel_reply_frame_is_byte_identical_to_pydantics_dump(
    message: BaseModel, uid: str
) -> None:
    dumped = message.model_dump(mode="python", exclude_none=True)
    body = msgpack.packb({"k": "reply", "u": uid, "m": dumped}, use_bin_type=True)
    assert reply_frame(uid, message) == HEADER.pack(len(body)) + body
