"""A reply model as the msgpack map the wire carries, without pydantic's serializer.

Every reply a SessionFile sends (``appended``, ``granted``, ``released``, ``queued``, an
``error``...) is a frozen model of ``sessionlane.messages.wire`` whose fields hold only
scalars, bytes and lists of strings. For those, the map ``model_dump(mode="python",
exclude_none=True)`` builds is the instance's own ``__dict__`` without its ``None`` values, in
the same (field) order: :func:`reply_map` builds it so, at about a third of ``model_dump``'s
cost, and leaves every other model (``status``, with nested models) to ``model_dump``.
``tests/test_reply_maps.py`` checks, with Hypothesis over every reply type, that the bytes are
those ``codec.frame`` gives.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import msgpack
from pydantic import BaseModel

from sessionlane.messages.codec import HEADER
from sessionlane.messages.wire import Reply

__all__ = ["FLAT_REPLIES", "reply_frame_bytes", "reply_map"]

_SCALARS = (str, int, bool, float, bytes, type(None))


def _flat(annotation: Any) -> bool:
    """Whether values of ``annotation`` dump as themselves (no model, no dict, no ``Any``)."""
    if annotation in _SCALARS:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return all(isinstance(arg, _SCALARS) for arg in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _flat(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list):
        return all(_flat(arg) for arg in typing.get_args(annotation))
    return False


def _flat_models(union: Any) -> frozenset[type[BaseModel]]:
    members = typing.get_args(typing.get_args(union)[0])
    return frozenset(
        m for m in members if all(_flat(f.annotation) for f in m.model_fields.values())
    )


FLAT_REPLIES = _flat_models(Reply)
"""The reply types whose map is their ``__dict__`` less its ``None`` values (all but
``status``), derived from their fields' types."""


def reply_map(message: BaseModel) -> dict[str, Any]:
    """``message.model_dump(mode="python", exclude_none=True)``, cheaper for a flat reply."""
    if type(message) in FLAT_REPLIES:
        return {k: v for k, v in message.__dict__.items() if v is not None}
    data: dict[str, Any] = message.model_dump(mode="python", exclude_none=True)
    return data


def reply_frame_bytes(message: BaseModel) -> bytes:
    """The wire frame of ``message``: what ``codec.frame`` gives, byte for byte."""
    body: bytes = msgpack.packb(reply_map(message), use_bin_type=True)
    return HEADER.pack(len(body)) + body
