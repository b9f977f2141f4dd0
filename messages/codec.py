"""The msgpack codec and the length-prefixed framing of the gateway protocol.

A frame is a 4-byte big-endian length followed by one msgpack map. ``encode`` turns a model
into a frame body, ``decode_request``/``decode_reply`` turn a body back into a model of the
matching union. Decoding never executes anything: msgpack maps only, no ext types, bounded
sizes. Every failure is a ``BadFrame`` (or ``TooLarge``) carrying the request id when one
could be read, so the gateway can answer the request it belongs to.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
from pydantic import BaseModel, TypeAdapter, ValidationError

from sessionlane.messages.errors import BadFrame, TooLarge
from sessionlane.messages.wire import PROTOCOL_VERSION, Reply, Request

__all__ = [
    "HEADER",
    "FrameDecodeError",
    "FrameReader",
    "decode_reply",
    "decode_request",
    "encode",
    "frame",
    "take_frame",
    "unpack_map",
]

HEADER = struct.Struct(">I")

_REQUEST: TypeAdapter[Request] = TypeAdapter(Request)
_REPLY: TypeAdapter[Reply] = TypeAdapter(Reply)


class FrameDecodeError(BadFrame):
    """A body that is not a valid message; ``request_id`` is set when the map had a usable id."""

    def __init__(self, detail: str, request_id: str | int | None = None):
        super().__init__(detail)
        self.request_id = request_id

    def __reduce__(self) -> tuple[object, ...]:
        return (FrameDecodeError, (self.detail, self.request_id))


def encode(message: BaseModel) -> bytes:
    """The msgpack body of ``message`` (unset optional fields are left out)."""
    data = message.model_dump(mode="python", exclude_none=True)
    out: bytes = msgpack.packb(data, use_bin_type=True)
    return out


def frame(message: BaseModel) -> bytes:
    """``encode`` plus the 4-byte length prefix."""
    body = encode(message)
    return HEADER.pack(len(body)) + body


def unpack_map(body: bytes, what: str = "a frame") -> dict[str, Any]:
    """The msgpack map in ``body``; ``FrameDecodeError`` on anything else.

    The one msgpack unpack of every frame, the wire's and a channel's
    (``sessionlane.messages.channel``): string keys only, no extension types (nothing is ever
    constructed from a frame but plain maps, lists and scalars). ``what`` names the frame in the
    error's detail.
    """
    try:
        data = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
        )
    except FrameDecodeError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise FrameDecodeError(f"{what} is not msgpack: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise FrameDecodeError(f"{what} must be a map, not {type(data).__name__}")
    return data


def _refuse_ext(code: int, data: bytes) -> Any:
    raise FrameDecodeError(f"msgpack extension type {code} is not allowed")


def _usable_id(data: dict[str, Any]) -> str | int | None:
    rid = data.get("id")
    if isinstance(rid, bool):
        return None
    if isinstance(rid, int | str):
        return rid
    return None


def _decode(body: bytes, adapter: TypeAdapter[Any]) -> Any:
    data = unpack_map(body)
    if data.get("v") != PROTOCOL_VERSION:
        raise FrameDecodeError(
            f"unsupported protocol version {data.get('v')!r} (this is {PROTOCOL_VERSION})",
            _usable_id(data),
        )
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "frame"
        raise FrameDecodeError(f"{where}: {first['msg']}", _usable_id(data)) from None


def decode_request(body: bytes) -> Request:
    """A client-to-service message; raises ``FrameDecodeError`` on anything else."""
    result: Request = _decode(body, _REQUEST)
    return result


def decode_reply(body: bytes) -> Reply:
    """A service-to-client message; raises ``FrameDecodeError`` on anything else."""
    result: Reply = _decode(body, _REPLY)
    return result


def take_frame(buf: bytearray, max_bytes: int, limit_name: str | None = None) -> bytes | None:
    """The first frame's body, removed from ``buf``, or None while it is incomplete.

    A header announcing more than ``max_bytes`` raises ``TooLarge`` at once, before any of
    that body is awaited (its detail names the limit ``limit_name``, else its value). What
    follows the frame stays in ``buf``, unparsed.
    """
    if len(buf) < HEADER.size:
        return None
    (length,) = HEADER.unpack_from(buf)
    if length > max_bytes:
        limit = limit_name or f"the {max_bytes} allowed here"
        raise TooLarge(f"frame of {length} bytes exceeds {limit}")
    if len(buf) < HEADER.size + length:
        return None
    body = bytes(buf[HEADER.size : HEADER.size + length])
    del buf[: HEADER.size + length]
    return body


class FrameReader:
    """Incremental splitter of a byte stream into frame bodies. Pure: no socket, no clock.

    ``feed`` returns the complete bodies received so far. A length over ``max_frame_bytes``
    raises ``TooLarge`` before any of that body is buffered: the caller answers and closes.
    With ``first_frame_bytes``, the first frame (a hello, from a peer not yet admitted; the
    first ``small_frames`` of them) is held to that smaller limit, and :attr:`room` says how
    much more may be buffered until it is whole: an unadmitted peer never makes its reader
    hold more than one hello.
    """

    def __init__(self, max_frame_bytes: int, first_frame_bytes: int | None = None):
        self.max_frame_bytes = max_frame_bytes
        self.first_frame_bytes = first_frame_bytes
        self.frames = 0
        """Bodies taken so far."""
        self.small_frames = 1
        """How many first frames are held to ``first_frame_bytes`` (the owner raises it when
        the handshake has more than one step before the peer is admitted)."""
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        bodies, error = self.feed_until_error(data)
        if error is not None:
            raise error
        return bodies

    def feed_until_error(self, data: bytes) -> tuple[list[bytes], TooLarge | None]:
        """Like ``feed``, but the bodies completed before an oversized header are returned
        with the error instead of being discarded: the frames a peer sent before its bad
        one deserve their answers."""
        self._buf += data
        bodies: list[bytes] = []
        while True:
            try:
                if self.frames < self.small_frames and self.first_frame_bytes is not None:
                    body = take_frame(self._buf, self.first_frame_bytes)
                else:
                    body = take_frame(self._buf, self.max_frame_bytes, "max_frame_bytes")
            except TooLarge as exc:
                return bodies, exc
            if body is None:
                return bodies, None
            self.frames += 1
            bodies.append(body)

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet make a whole frame."""
        return len(self._buf)

    @property
    def room(self) -> int | None:
        """Bytes that may still be buffered before the first frame is whole (None: no cap)."""
        if self.frames >= self.small_frames or self.first_frame_bytes is None:
            return None
        return HEADER.size + self.first_frame_bytes - len(self._buf)
