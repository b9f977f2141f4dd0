"""A file actor's code run in the zygote before it freezes, so every file's process finds it warm.

Every SessionFile is forked from the zygote (``sessionlane.system.runtime.zygote``) and shares
its pages until it writes to them. What a file's process writes the first time it runs a piece
of code is not only its own objects: CPython 3.11 quickens each code object it runs (the
adaptive bytecode and its inline caches live in the code object), pydantic and ``typing`` build
validators, caches and interned strings on first use, and the allocator carves fresh pools.
Done once in the zygote, all of that is in the frozen parent's pages, shared by every file,
instead of being made again (and dirtying a page) in each file's process.

:func:`warm_up` drives a real ``SessionFile`` outside any actor system (thespian is not started;
its ``send`` and ``wakeupAfter`` are replaced, and every message it receives or sends goes
through ``pickle`` as thespian's transport would carry it) on a throwaway file in a private
temporary directory (under ``/dev/shm`` where there is one), ten times: ``FileInit`` with a
listener bound ahead (as the zygote binds one for each child it parks,
``sessionlane.actors.ahead``), a client connected to that listener (hello, acquire, an append
acknowledged after its ``fdatasync``, a second lane queued and granted on release), the same
through a carried channel, then the actor's exit. Nothing reaches the service: the directory,
the socket and the file are gone when it returns, and the process's title is left as it was. It
is best effort: any failure is logged at debug level and the zygote forks its children cold, as
before.

Measured in ``docs/cost-model.md`` ("Warming the zygote").
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import socket
import tempfile
from typing import Any

import setproctitle
from thespian.actors import ActorExitRequest, WatchMessage

from sessionlane.actors import ahead
from sessionlane.actors.ahead import BoundAhead
from sessionlane.actors.carried import split_frames
from sessionlane.actors.session_file import SessionFile
from sessionlane.actors.session_file_serving import Serving
from sessionlane.messages.carried import CarriedCalls, CarriedReplies
from sessionlane.messages.channel import (
    ChannelReply,
    call_frame,
    decode_from_file,
    hello_frame,
)
from sessionlane.messages.codec import FrameReader
from sessionlane.messages.internal import FileInit, FileSettings
from sessionlane.messages.wire import Acquire, Append, Appended, Granted, Queued, Release, Released

__all__ = ["WARM_UP", "warm_up"]

log = logging.getLogger(__name__)

WARM_UP = True
"""Whether the zygote runs :func:`warm_up` before it freezes (read in the zygote: set it before
the system starts; ``False`` forks cold children, for a before/after measurement)."""

REHEARSALS = 10
"""How many times the whole rehearsal runs. CPython 3.11 quickens a code object on its 8th
call (``QUICKENING_WARMUP_DELAY``) and specializes each instruction once its adaptive counter
runs out: code run fewer times in the zygote is still written to by every child."""

SCRATCH = "/dev/shm"
"""The rehearsal's directory goes here if it is a writable directory (see ``_scratch``)."""

_MAX_FRAME = 1 << 20
"""The largest reply frame the rehearsal's client takes (its replies are a few hundred bytes)."""

_PASSES = 32
"""Turns at most to settle one exchange (each a ``WatchMessage`` of the ready descriptors)."""


def warm_up() -> bool:
    """Run a SessionFile through a short life on a throwaway file; whether it all ran."""
    title = setproctitle.getproctitle()
    quiet = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # the rehearsal's file is nobody's business
    try:
        with tempfile.TemporaryDirectory(prefix="sessionlane-warm-up-", dir=_scratch()) as root:
            for _ in range(REHEARSALS):
                _Rehearsal(os.path.realpath(root)).run()
    except Exception as exc:  # never fatal: the children are then forked cold
        failure: Exception | None = exc
    else:
        failure = None
    finally:
        logging.disable(quiet)
        setproctitle.setproctitle(title)  # FileInit retitled us "file <path>"
    if failure is not None:
        log.debug("the zygote's warm-up failed: %r", failure, exc_info=failure)
    return failure is None


def _scratch() -> str | None:
    """Where the rehearsal's files go: memory (``/dev/shm``) where there is one, so that its
    fsyncs cost nothing on a slow disk; else the system's temp dir."""
    return SCRATCH if os.path.isdir(SCRATCH) and os.access(SCRATCH, os.W_OK | os.X_OK) else None


class _Rehearsal:
    """One SessionFile driven by hand, and its socket client (``run`` is the whole script)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, "warm-up.jsonl")
        self.sent: list[tuple[Any, Any]] = []
        self.actor = SessionFile({"Thespian Watch Supported": True})
        self.actor.send = lambda address, message: self.sent.append((address, _carried(message)))
        self.actor.wakeupAfter = lambda period, payload=None: None
        self.actor._myRef = _Ref()  # what thespian gives an actor it created: its address
        self.watched: list[int] = []
        self.ids = 0

    def run(self) -> None:
        settings = FileSettings(
            max_hold_ms=300_000,
            wait_timeout_ms=600_000,
            aging_ms=10_000,
            max_queue=256,
            idle_ms=60_000,
            durability="fsync",
            max_record_bytes=1_048_576,
            legacy_lock=False,
        )
        init = FileInit(path=self.path, settings=settings, incarnation=1, root=self.root)
        self.bound, _, _ = BoundAhead.fresh()
        ahead.inherit(ahead.bind(self.bound), self.bound)  # as the zygote parks each child
        try:
            self.deliver(init)
        finally:
            ahead.close_inherited()  # not taken: the file did not activate
        try:
            self.over_socket()
            self.carried()
        finally:
            self.deliver(ActorExitRequest())
        if not os.path.exists(self.path):
            raise RuntimeError("the warm-up file was never written")

    def deliver(self, message: Any, sender: Any = "registry") -> None:
        if not isinstance(message, WatchMessage):  # thespian's own, never on the wire
            message = _carried(message)
        watch = self.actor.receiveMessage(message, sender)
        self.watched = list(watch.filenos) if watch is not None else []

    def settle(self) -> None:
        """Deliver ``WatchMessage``s of the ready descriptors until none is ready."""
        for _ in range(_PASSES):
            ready = select.select(self.watched, [], [], 0)[0] if self.watched else []
            if not ready:
                return
            self.deliver(WatchMessage(ready), sender=None)
        raise RuntimeError("the warm-up's exchange never settled")

    def over_socket(self) -> None:
        """The gateway's way, as a first contact goes: the Registry offered the listener bound
        ahead; a connection to it, two lanes taking turns on one lease."""
        state = self.actor.state
        if not isinstance(state, Serving) or state.channels.server is None:
            return  # channels are off in this service (``SessionFile.channels``): carried only
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5.0)
            client.connect("\0" + self.bound.name)
            _Peer(self, client.sendall, _SocketReplies(client)).turns(self.bound.token)

    def carried(self) -> None:
        """A convention member's way: the same calls as frames inside thespian messages."""
        state = self.actor.state
        if not isinstance(state, Serving):
            raise RuntimeError("the warm-up file is not serving")
        replies = _CarriedReplies(self)
        _Peer(self, replies.deliver, replies).turns(state.channels.carried.token)


def _carried(message: Any) -> Any:
    """``message`` as thespian's TCP transport carries it: pickled, with the sender's address,
    and unpickled (what the file's process does with every message it sends or receives)."""
    _, copy = pickle.loads(pickle.dumps((_Ref.address, message)))
    return copy


class _Ref:
    address = "the warm-up's file actor"
    globalName = None


class _Peer:
    """The client side of one channel: two lanes, one lease handed from the first to the
    second, each appending one record under it."""

    def __init__(self, rehearsal: _Rehearsal, write: Any, replies: Any) -> None:
        self.rehearsal, self.write, self.replies = rehearsal, write, replies

    def call(self, lane: str, request: Any, hello: str = "") -> None:
        r = self.rehearsal
        r.ids += 1
        frames = hello_frame(hello) if hello else b""
        request = request.model_copy(update={"id": r.ids})
        self.write(frames + call_frame(lane, lane, "interactive", request))
        r.settle()

    def answer(self, kind: type) -> Any:
        message = self.replies.take()
        if not isinstance(message, kind):
            raise RuntimeError(f"the warm-up expected {kind.__name__}, got {message!r}")
        return message

    def turns(self, token: str) -> None:
        path = self.rehearsal.path
        self.call("warm-a", Acquire(lane="warm-a", path=path, purpose="prompt"), hello=token)
        first = self.answer(Granted)
        self.call("warm-b", Acquire(lane="warm-b", path=path, purpose="prompt"))
        self.answer(Queued)
        for lane, lease in (("warm-a", first), ("warm-b", None)):
            if lease is None:
                lease = self.answer(Granted)  # handed over on the first lane's release
            record = {"type": "message", "lane": lane, "text": "warm-up"}
            self.call(lane, Append(lease=lease.lease, fence=lease.fence, records=[record]))
            self.answer(Appended)
            self.call(lane, Release(lease=lease.lease))
            self.answer(Released)


class _SocketReplies:
    """Reply frames read from the client's end of a channel socket, one message at a time."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.frames = FrameReader(_MAX_FRAME)
        self.pending: list[Any] = []

    def take(self) -> Any:
        while not self.pending:
            data = self.client.recv(65536)
            if not data:
                raise RuntimeError("the warm-up channel closed")
            for body in self.frames.feed(data):
                frame = decode_from_file(body)
                if isinstance(frame, ChannelReply):
                    self.pending.append(frame.message)
        return self.pending.pop(0)


class _CarriedReplies:
    """Frames carried to the actor in ``CarriedCalls``; its answers read from what it sent."""

    def __init__(self, rehearsal: _Rehearsal) -> None:
        self.rehearsal = rehearsal
        self.pending: list[Any] = []

    def deliver(self, frames: bytes) -> None:
        r = self.rehearsal
        r.deliver(CarriedCalls(r.path, frames), sender="member")

    def take(self) -> Any:
        r = self.rehearsal
        for _, message in r.sent:
            if isinstance(message, CarriedReplies):
                for body in split_frames(message.frames):
                    frame = decode_from_file(body)
                    if isinstance(frame, ChannelReply):
                        self.pending.append(frame.message)
        r.sent.clear()
        if not self.pending:
            raise RuntimeError("the warm-up's carried channel brought no answer")
        return self.pending.pop(0)
