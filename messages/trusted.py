"""The few models a SessionFile builds on every lease cycle, built without validating them.

A SessionFile answers each call with a reply it makes itself from values it already holds as
their types (``Appended``, ``Granted``, ``Released``), wraps each in a ``FileReply``, and
serves each call as a ``LaneCall`` around a request that was validated as it was decoded.
Validating those again costs 0.9-1.5 us a model (``LaneCall`` the most: its ``request`` is
checked against the members of the request union), some 4 % of the file process's CPU per
fused lease cycle in its profile (docs/hot-path.md, "Effect records and replies, the tenth
session"). Pydantic's own way around validation, ``model_construct``, measured slower than
validating (2.5 against 1.3 us for an ``Appended``): it looks up every field's default.

So each function here builds its model as ``model_construct`` would, from a dict written
out in the model's field order (the order its wire map and ``repr`` follow), with the
defaults filled in: 0.55-0.65 us (``tests/record_cost.py``). Only values the caller produced
itself, typed by mypy through each function's signature, may be given: never a value read
from a socket or a file that was not validated. ``tests/test_trusted.py`` checks, with
Hypothesis, that each one is equal to the validated model, with the same field order, the
same fields set, the same wire bytes and pickles, and that a field added to a model fails it
until its builder is updated.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

from sessionlane.messages.internal import FileReply, LaneCall, LaneRef, LaneRequest
from sessionlane.messages.wire import Appended, Granted, Purpose, Released, Reply, RequestId

__all__ = ["appended", "file_reply", "granted", "lane_call", "released"]

_M = TypeVar("_M", bound=BaseModel)

_new = object.__new__
_set = object.__setattr__


def _built(cls: type[_M], values: dict[str, Any], given: frozenset[str]) -> _M:
    """``cls.model_construct``'s result for ``values`` (every field, in field order), whose
    ``given`` were passed explicitly (``model_fields_set``)."""
    model = _new(cls)
    _set(model, "__dict__", values)
    _set(model, "__pydantic_fields_set__", set(given))
    _set(model, "__pydantic_extra__", None)
    _set(model, "__pydantic_private__", None)
    return model


_APPENDED = frozenset({"id", "offset", "lines", "fence", "released", "offsets"})
_GRANTED = frozenset({"id", "lease", "fence", "path", "purpose", "secret"})
_RELEASED = frozenset({"id", "lease"})
_FILE_REPLY = frozenset({"path", "message", "lane"})
_LANE_CALL = frozenset({"lane", "path", "canonical", "request"})


def appended(
    id: RequestId | None,
    offset: int,
    lines: int,
    fence: int,
    released: bool | None,
    offsets: list[int] | None = None,
) -> Appended:
    """``Appended(id=id, offset=offset, lines=lines, fence=fence, released=released,
    offsets=offsets)``."""
    values = {
        "v": 1,
        "id": id,
        "type": "appended",
        "offset": offset,
        "lines": lines,
        "fence": fence,
        "released": released,
        "offsets": offsets,
    }
    return _built(Appended, values, _APPENDED)


def granted(
    id: RequestId | None, lease: str, fence: int, path: str, purpose: Purpose, secret: str | None
) -> Granted:
    """``Granted(id=id, lease=lease, fence=fence, path=path, purpose=purpose, secret=secret)``."""
    values = {
        "v": 1,
        "id": id,
        "type": "granted",
        "lease": lease,
        "fence": fence,
        "path": path,
        "purpose": purpose,
        "secret": secret,
    }
    return _built(Granted, values, _GRANTED)


def released(id: RequestId | None, lease: str) -> Released:
    """``Released(id=id, lease=lease)``."""
    return _built(Released, {"v": 1, "id": id, "type": "released", "lease": lease}, _RELEASED)


def file_reply(path: str, message: Reply, lane: str) -> FileReply:
    """``FileReply(path=path, message=message, lane=lane)``."""
    values = {"kind": "file_reply", "path": path, "message": message, "lane": lane}
    return _built(FileReply, values, _FILE_REPLY)


def lane_call(lane: LaneRef, path: str, canonical: bool, request: LaneRequest) -> LaneCall:
    """``LaneCall(lane=lane, path=path, canonical=canonical, request=request)``; ``request``
    was validated when it was decoded."""
    values = {
        "kind": "lane_call",
        "lane": lane,
        "path": path,
        "canonical": canonical,
        "request": request,
    }
    return _built(LaneCall, values, _LANE_CALL)
