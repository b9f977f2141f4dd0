"""Frames of a direct channel between the gateway and one SessionFile (never on the wire).

Why a channel: a thespian TCP message costs about 1 ms of CPU, and a request through the actor
chain (gateway -> Lane -> Registry -> SessionFile -> Lane -> gateway) took five of them. Once
the gateway knows a file's SessionFile it connects to it over a Unix socket in the abstract
namespace (no file, nothing on the network) and exchanges these frames: one ``send`` and one
``select`` wake-up per hop, a few tens of microseconds. thespian still creates, supervises and
passivates the SessionFile; the Registry still resolves and confines every path.

Every frame is ``sessionlane.messages.codec``'s length prefix plus a msgpack map with a kind ``k``:

gateway -> SessionFile
    ``{"k": "hello", "v": 1, "token": T}``   first frame: the token from the ``ChannelOffer``
    ``{"k": "call", "u": uid, "n": lane name, "pr": priority, "rq": request}``
SessionFile -> gateway
    ``{"k": "welcome", "v": 1, "path": P, "inc": incarnation}``   or the connection closes
    ``{"k": "reply", "u": uid, "m": reply}``

``rq`` and ``m`` are wire messages as a map (``sessionlane.messages.wire``), validated on arrival
with the same models as a client's frames: both processes are ours, but a frame that does not
validate is a bug to report, never something to act on. No pickle crosses a channel.

A local client's direct channel (``docs/direct-channel.md``) reaches the same listener. Its
first frame is ``{"k": "direct", "v": 1, "ticket": T}`` (the ticket of a ``direct_offer``),
answered ``{"k": "welcome", "v": 1, "path": P, "lane": L}`` or by closing; after it, the client
sends wire requests and the file answers wire replies and events, exactly as on the gateway's
connection (``sessionlane.messages.codec``), never these frames.

``v`` is the channel's version (:data:`CHANNEL_VERSION`), in the hello and the welcome: a
gateway and a SessionFile of different versions refuse each other at the handshake instead of
misreading each other's frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
from pydantic import TypeAdapter, ValidationError

from sessionlane.messages.codec import HEADER, FrameDecodeError, unpack_map
from sessionlane.messages.internal import LaneRequest
from sessionlane.messages.lean_records import lean_record
from sessionlane.messages.reply_maps import reply_map
from sessionlane.messages.wire import Priority, Reply

__all__ = [
    "CHANNEL_VERSION",
    "DIRECT_VERSION",
    "ChannelCall",
    "ChannelDirectHello",
    "ChannelHello",
    "ChannelReply",
    "ChannelWelcome",
    "call_frame",
    "decode_direct_welcome",
    "decode_from_file",
    "decode_from_gateway",
    "direct_hello_frame",
    "direct_welcome_frame",
    "hello_frame",
    "reply_frame",
    "welcome_frame",
]

_LANE_REQUEST: TypeAdapter[Any] = TypeAdapter(LaneRequest)
_REPLY: TypeAdapter[Any] = TypeAdapter(Reply)
_PRIORITIES = ("recovery", "interactive", "background")
CHANNEL_VERSION = 2
DIRECT_VERSION = 1
"""The version of a client's direct-channel hello and welcome."""


@dataclass(frozen=True, slots=True)
class ChannelHello:
    token: str


@dataclass(frozen=True, slots=True)
class ChannelDirectHello:
    """A local client's first frame on a direct channel: the ticket it was given."""

    ticket: str


@lean_record
class ChannelCall:
    uid: str
    name: str
    priority: Priority
    request: Any
    """A ``LaneRequest``."""


@dataclass(frozen=True, slots=True)
class ChannelWelcome:
    path: str
    incarnation: int


@lean_record
class ChannelReply:
    uid: str
    message: Any
    """A ``Reply``."""


def _pack(data: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(data, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def _dump(message: Any) -> dict[str, Any]:
    return reply_map(message)


def hello_frame(token: str) -> bytes:
    return _pack({"k": "hello", "v": CHANNEL_VERSION, "token": token})


def call_frame(uid: str, name: str, priority: Priority, request: Any) -> bytes:
    return _pack({"k": "call", "u": uid, "n": name, "pr": priority, "rq": _dump(request)})


def welcome_frame(path: str, incarnation: int) -> bytes:
    return _pack({"k": "welcome", "v": CHANNEL_VERSION, "path": path, "inc": incarnation})


def reply_frame(uid: str, message: Any) -> bytes:
    return _pack({"k": "reply", "u": uid, "m": _dump(message)})


def direct_hello_frame(ticket: str) -> bytes:
    return _pack({"k": "direct", "v": DIRECT_VERSION, "ticket": ticket})


def direct_welcome_frame(path: str, lane: str) -> bytes:
    return _pack({"k": "welcome", "v": DIRECT_VERSION, "path": path, "lane": lane})


def decode_direct_welcome(body: bytes) -> str:
    """The path a direct channel's welcome names; ``FrameDecodeError`` on anything else."""
    data = unpack_map(body, "a direct channel's welcome")
    if data.get("k") != "welcome" or data.get("v") != DIRECT_VERSION:
        raise FrameDecodeError("not a direct channel's welcome")
    return _str(data, "path")


def _check_version(data: dict[str, Any]) -> None:
    if data.get("v") != CHANNEL_VERSION:
        version = data.get("v")
        raise FrameDecodeError(f"channel version {version!r} (this is {CHANNEL_VERSION})")


def _str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise FrameDecodeError(f"channel frame field {key!r} must be a string")
    return value


def decode_from_gateway(body: bytes) -> ChannelHello | ChannelDirectHello | ChannelCall:
    """A frame the SessionFile received; ``FrameDecodeError`` on anything else."""
    data = unpack_map(body, "a channel frame")
    kind = data.get("k")
    if kind == "hello":
        _check_version(data)
        return ChannelHello(token=_str(data, "token"))
    if kind == "direct":
        if data.get("v") != DIRECT_VERSION:
            raise FrameDecodeError(f"direct channel version {data.get('v')!r}")
        return ChannelDirectHello(ticket=_str(data, "ticket"))
    if kind != "call":
        raise FrameDecodeError(f"unexpected channel frame kind {kind!r}")
    priority = data.get("pr")
    if priority not in _PRIORITIES:
        raise FrameDecodeError(f"bad lane priority {priority!r}")
    try:
        request = _LANE_REQUEST.validate_python(data.get("rq"))
    except ValidationError as exc:
        raise FrameDecodeError(f"bad channel request: {exc.errors()[0]['msg']}") from None
    return ChannelCall(
        uid=_str(data, "u"), name=_str(data, "n"), priority=priority, request=request
    )


def decode_from_file(body: bytes) -> ChannelWelcome | ChannelReply:
    """A frame the gateway received; ``FrameDecodeError`` on anything else."""
    data = unpack_map(body, "a channel frame")
    kind = data.get("k")
    if kind == "welcome":
        _check_version(data)
        incarnation = data.get("inc")
        if not isinstance(incarnation, int):
            raise FrameDecodeError("welcome without an incarnation")
        return ChannelWelcome(path=_str(data, "path"), incarnation=incarnation)
    if kind != "reply":
        raise FrameDecodeError(f"unexpected channel frame kind {kind!r}")
    try:
        message = _REPLY.validate_python(data.get("m"))
    except ValidationError as exc:
        raise FrameDecodeError(f"bad channel reply: {exc.errors()[0]['msg']}") from None
    return ChannelReply(uid=_str(data, "u"), message=message)
