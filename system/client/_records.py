"""What the client refuses before sending: records that cannot be stored, frames too large.

Refusing here rather than at the service keeps msgpack's and pydantic's own exceptions out of
the caller's way, and the connection and its leases untouched: the service answers a bad
record with an error, and an oversized frame by closing the connection.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from sessionlane.messages.codec import HEADER
from sessionlane.messages.errors import InvalidRecord, TooLarge
from sessionlane.messages.wire import Record

__all__ = [
    "MAX_FRAME_BYTES",
    "MAX_RECORD_BYTES",
    "MAX_RECORD_DEPTH",
    "check_frame",
    "check_records",
]

MAX_RECORD_BYTES = 1_048_576
"""The service's default ``max_record_bytes``: the client's default check before sending."""
MAX_FRAME_BYTES = 8_388_608
"""The service's default ``max_frame_bytes``: a bigger frame would make it close the connection."""
MAX_RECORD_DEPTH = 100
"""The gateway's nesting limit for records
(``sessionlane.messages.client_frames.MAX_RECORD_DEPTH``)."""
_MSGPACK_INTS = (-(2**63), 2**64 - 1)


def check_records(
    records: Sequence[Any], *, max_record_bytes: int | None, allow_empty: bool = False
) -> list[Record]:
    """``records`` as a list, or ``InvalidRecord`` before anything is sent.

    A record must be a JSON object the service can store as one strict JSONL line: string
    keys; values that are objects, arrays (lists or tuples), strings, finite numbers
    (integers that msgpack carries), booleans or null; nested at most
    :data:`MAX_RECORD_DEPTH` levels; at most ``max_record_bytes`` once encoded (``None``:
    leave the size to the service). An empty batch is refused unless ``allow_empty`` (a
    rewrite may empty the file).
    """
    if not records and not allow_empty:
        raise InvalidRecord("empty batch: at least one record is required")
    checked: list[Record] = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InvalidRecord(f"record {index}: not a JSON object (got {type(record).__name__})")
        why, bound = _unstorable(record)
        if why is not None:
            raise InvalidRecord(f"record {index}: {why}")
        if bound is not None and (max_record_bytes is None or bound <= max_record_bytes):
            checked.append(record)  # it encodes, within the limit: no need to encode it here
            continue
        try:
            text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            size = len(text.encode("utf-8")) + 1
        except (TypeError, ValueError) as exc:  # e.g. a lone surrogate in a string
            raise InvalidRecord(f"record {index}: not serialisable as JSON: {exc}") from None
        if max_record_bytes is not None and size > max_record_bytes:
            raise InvalidRecord(
                f"record {index}: {size} bytes encoded, over max_record_bytes ({max_record_bytes})"
            )
        checked.append(record)
    return checked


_CHARS_PER_CHAR = 6
"""The most a string's character takes in a JSON line: ``\\u001f`` (UTF-8 takes at most 4)."""
_INT_CHARS = 20
"""The longest 64-bit integer in JSON: ``-9223372036854775808``, ``18446744073709551615``."""
_FLOAT_CHARS = 32
"""More than the longest ``repr`` of a finite float (24 characters)."""
Where = tuple["Where | None", str | int]
"""Where a value sits in a record: its parent's place and its key or index (built only to name
it in an error)."""


def _unstorable(record: dict[str, Any]) -> tuple[str | None, int | None]:
    """Why ``record`` is no strict JSON object (or None), and an upper bound of its JSONL
    line's bytes (None: a string that does not encode as UTF-8, for ``json.dumps`` to name).
    Iterative: depth is bounded anyway."""
    bound = 1  # the line's newline
    stack: list[tuple[Any, int, Where | None]] = [(record, 1, None)]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_RECORD_DEPTH:
            return f"nested deeper than {MAX_RECORD_DEPTH} levels", None
        if isinstance(value, str):
            if not value.isascii() and not _encodes(value):
                return None, None
            bound += 2 + _CHARS_PER_CHAR * len(value)
        elif isinstance(value, dict):
            bound += 2 + 2 * len(value)  # braces, a colon and at most a comma per member
            for key, item in value.items():
                if not isinstance(key, str):
                    return f"key {key!r} at {_named(where) or 'top level'} is not a string", None
                if not key.isascii() and not _encodes(key):
                    return None, None
                bound += 2 + _CHARS_PER_CHAR * len(key)
                stack.append((item, depth + 1, (where, key)))
        elif isinstance(value, list | tuple):
            bound += 2 + len(value)
            stack.extend((item, depth + 1, (where, i)) for i, item in enumerate(value))
        elif isinstance(value, bool) or value is None:
            bound += 5
        elif isinstance(value, int):
            if not _MSGPACK_INTS[0] <= value <= _MSGPACK_INTS[1]:
                return f"integer at {_named(where)} is out of the 64-bit range", None
            bound += _INT_CHARS
        elif isinstance(value, float):
            if not math.isfinite(value):
                return f"{value} at {_named(where)} is not a JSON number", None
            bound += _FLOAT_CHARS
        else:
            return f"{type(value).__name__} at {_named(where)} is not a JSON value", None
    return None, bound


def _encodes(text: str) -> bool:
    """``text`` encodes as UTF-8 (no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _named(where: Where | None) -> str:
    """``where`` as the errors name it: ``a.b[2].c``."""
    steps: list[str | int] = []
    while where is not None:
        where, step = where
        steps.append(step)
    name = ""
    for step in reversed(steps):
        if isinstance(step, int):
            name += f"[{step}]"
        elif name:
            name += f".{step}"
        else:
            name = step
    return name


def check_frame(data: bytes, max_frame_bytes: int | None) -> bytes:
    """``data`` (a whole frame), or ``TooLarge`` if the service would refuse it.

    The service answers an oversized frame by closing the connection; refused here, nothing
    is sent and the connection and its leases stay as they were.
    """
    body = len(data) - HEADER.size
    if max_frame_bytes is not None and body > max_frame_bytes:
        raise TooLarge(
            f"a frame of {body} bytes exceeds max_frame_bytes ({max_frame_bytes}); nothing sent"
        )
    return data
