"""The checks every client-facing endpoint makes of a decoded request, beyond its model.

Two endpoints take frames from clients: the gateway (``sessionlane.system.gateway``) and a
SessionFile's direct channels (``sessionlane.actors.direct_channels``). Both decode with
``sessionlane.messages.codec.decode_request`` (unknown fields, types and sizes: ``bad_frame``),
hold frames to ``max_frame_bytes`` (``too_large``, then the connection closes), and refuse
records nested too deep with ``invalid_record`` here, before anything is written, and close
a client that leaves more than :data:`MAX_CLIENT_OUTPUT_BYTES` of replies unread.
"""

from __future__ import annotations

from typing import Any

from sessionlane.messages.wire import Append, Error, Rewrite

__all__ = ["MAX_CLIENT_OUTPUT_BYTES", "MAX_RECORD_DEPTH", "record_refusal", "too_deep"]

MAX_CLIENT_OUTPUT_BYTES = 32 * 1024 * 1024
"""A client connection whose unread output exceeds this is closed: it stopped reading."""

MAX_RECORD_DEPTH = 100
"""Deepest nesting of maps and lists accepted in a record.

A record may travel pickled through actors (calls routed through the Registry); pickling a
record nested about 500 deep exceeds the recursion limit, and thespian then drops the message
(the request would never be answered). Real transcript records nest a dozen levels at most.
"""


def too_deep(records: list[Any]) -> str | None:
    """Why ``records`` nest deeper than :data:`MAX_RECORD_DEPTH`, or None (iterative)."""
    for index, record in enumerate(records):
        stack: list[tuple[Any, int]] = [(record, 1)]
        while stack:
            value, depth = stack.pop()
            if depth > MAX_RECORD_DEPTH:
                return f"record {index}: nested deeper than {MAX_RECORD_DEPTH} levels"
            if isinstance(value, dict):
                stack.extend((v, depth + 1) for v in value.values())
            elif isinstance(value, list):
                stack.extend((v, depth + 1) for v in value)
    return None


def record_refusal(request: Any) -> Error | None:
    """The ``invalid_record`` answer to an ``append``/``rewrite`` whose records nest too
    deep, or None for any other request and for records that pass."""
    if isinstance(request, Append | Rewrite) and (why := too_deep(request.records)) is not None:
        return Error(id=request.id, code="invalid_record", detail=why)
    return None
