"""The frames of the client's requests, built by hand from the request's fields.

``request_frame(message, rid)`` is byte for byte ``codec.frame(message.model_copy(update={"id":
rid}))``: the msgpack map of the fields in their declared order, unset (None) ones left out,
nested models as maps of their own set fields, the 4-byte length in front. pydantic's copy and
dump cost about 5 us per request against 1 us for this (``docs/hot-path.md``, "The client's
share"); a request is still a validated model when it is built, so what goes out was checked.
``tests/test_client_frames.py`` holds the two equal over every request type (Hypothesis).
"""

from __future__ import annotations

from typing import Any

import msgpack
from pydantic import BaseModel

from sessionlane.messages.codec import HEADER
from sessionlane.messages.wire import RequestId

__all__ = ["request_frame"]

_FIELDS: dict[type[BaseModel], tuple[str, ...]] = {}
"""Each model class's field names, in the order pydantic dumps them."""


def _fields(cls: type[BaseModel]) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(cls.model_fields)
    return names


def _plain(message: BaseModel, rid: RequestId | None = None) -> dict[str, Any]:
    """``message.model_dump(exclude_none=True)`` (``id`` replaced by ``rid`` if given), for
    the models the wire's requests are made of: fields that are scalars, bytes, dicts and lists
    of plain values, or models of those."""
    values = message.__dict__
    body: dict[str, Any] = {}
    for name in _fields(type(message)):
        value = rid if name == "id" and rid is not None else values[name]
        if value is None:
            continue
        if isinstance(value, BaseModel):
            value = _plain(value)
        body[name] = value
    return body


def request_frame(message: BaseModel, rid: RequestId) -> bytes:
    """The frame of request ``message`` sent with id ``rid`` (see the module)."""
    data: bytes = msgpack.packb(_plain(message, rid), use_bin_type=True)
    return HEADER.pack(len(data)) + data
