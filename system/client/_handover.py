"""Who reads a link's socket: its reader thread, or a caller that reads its own reply.

The sync client's reader thread reads every reply and wakes the caller that waits for it:
two thread wake-ups and a hand-over of the GIL per request. On a direct channel
(``docs/direct-channel.md``) a caller may instead take the *read role* and read until its own
reply has come (``docs/hot-path.md``, "The reader-thread hop"). The rules that keep the two
from racing for the socket:

- whoever ``recv``s holds ``Reading.lock``, and feeds the one ``FrameReader`` of the link and
  delivers every whole frame it got before it lets go (so frames are delivered in the order
  they came, whoever read them);
- a caller takes the role only if nobody holds it (``try_take``; else it waits on its waiter as
  before), and while it has it the socket's interest in the reader thread's epoll is off, so
  the reader thread is not woken for what the caller will read. Giving back turns it on again:
  epoll is level-triggered, so whatever came after is the reader thread's;
- on EOF or an error the caller gives the socket back without reading further: the reader
  thread sees the same end and its loss path (``SessionLane._drop``) stays the only one.

The reader thread may have been woken just before a caller turned the interest off: it then
waits for the lock and reads without blocking (``MSG_DONTWAIT``), finding nothing if the
caller read it all.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from sessionlane.messages.codec import FrameReader
from sessionlane.system.client._core import INCOMING_FRAME_BYTES

__all__ = ["Done", "Reading"]

READ_BYTES = 256 * 1024


class Done(Protocol):
    """What a caller reads until (``Reading.read_until``): a ``threading.Event`` will do."""

    def is_set(self) -> bool: ...


class Reading:
    """The read side of one link's socket: the read role's lock, the link's frame reader and
    the frames read but not delivered yet, and the epoll its reader thread waits in."""

    __slots__ = (
        "broken",
        "caller_reads",
        "deliver",
        "epoll",
        "fd",
        "frames",
        "lock",
        "own_poll",
        "pending",
        "sock",
    )

    def __init__(
        self, sock: socket.socket, deliver: Callable[[bytes], None], *, caller_reads: bool
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.deliver = deliver
        """Decode a frame's body and act on it (``SessionLane._deliver``)."""
        self.caller_reads = caller_reads
        """A caller may take the read role (direct channels); else only the reader thread reads."""
        self.lock = threading.Lock()
        """Held by whoever ``recv``s, until what it read is delivered."""
        self.frames = FrameReader(INCOMING_FRAME_BYTES)
        self.pending: deque[bytes] = deque()
        """Whole frames read and not delivered yet (oldest first): left by a caller
        interrupted while delivering, for the next reader."""
        self.epoll = select.epoll()
        """The reader thread's; a caller reading turns the socket's interest off in it."""
        self.epoll.register(self.fd, select.EPOLLIN)
        self.own_poll = select.poll()
        """The caller's, used only by the holder of the read role."""
        self.own_poll.register(self.fd, select.POLLIN)
        self.broken: BaseException | None = None
        """What a caller met delivering a frame (a bad frame): the reader thread raises it
        next time it holds the lock, so that its loss path reports it."""

    def close(self) -> None:
        self.epoll.close()

    def wait(self, timeout: float) -> bool:
        """The reader thread: True once the socket may be readable, False after ``timeout``."""
        return bool(self.epoll.poll(timeout))

    def _deliver_pending(self) -> None:
        while self.pending:
            self.deliver(self.pending.popleft())

    def _break(self, exc: BaseException) -> None:
        """A caller met ``exc`` delivering: the link is done for, the reader thread says why."""
        self.broken = exc
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread

    def read_some(self) -> bool:
        """The reader thread, holding the read lock: read what is there without blocking and
        deliver each whole frame. False: the peer closed the connection (EOF). ``OSError``,
        ``ValueError`` (a closed socket) and a bad frame are the reader thread's to report,
        and so is one met by a caller before (``broken``)."""
        if self.broken is not None:
            raise self.broken
        self._deliver_pending()
        try:
            data = self.sock.recv(READ_BYTES, socket.MSG_DONTWAIT)
        except BlockingIOError:  # a caller read it first
            return True
        if not data:
            return False
        self.pending.extend(self.frames.feed(data))
        self._deliver_pending()
        return True

    def try_take(self) -> bool:
        """Take the read role if it is free: the reader thread's interest is then off."""
        if not self.caller_reads or not self.lock.acquire(blocking=False):
            return False
        try:
            self.epoll.modify(self.fd, 0)
        except (OSError, ValueError):  # closed under us: the reader thread's to report
            self.lock.release()
            return False
        return True

    def give_back(self) -> None:
        """End the read role: the reader thread reads again (level-triggered: anything that
        came meanwhile wakes it). Frames an interrupted caller left are delivered first."""
        try:
            if self.pending and self.broken is None:
                try:
                    self._deliver_pending()
                except Exception as exc:
                    self._break(exc)
        finally:
            with contextlib.suppress(OSError, ValueError):  # closed: the reader is leaving
                self.epoll.modify(self.fd, select.EPOLLIN)
            self.lock.release()

    def read_until(self, done: Done, deadline: float | None) -> None:
        """Holding the read role, read and deliver until ``done`` is set, the peer closed the
        connection or failed, or ``deadline`` (``time.monotonic``) passed. Never raises for
        the socket: its end is the reader thread's to report once this gives the socket back."""
        while not done.is_set():
            if deadline is None:
                wait = -1
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                wait = max(1, int(left * 1000))
            try:
                if not self.own_poll.poll(wait):
                    continue
                data = self.sock.recv(READ_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except (OSError, ValueError):
                return
            if not data:
                return
            try:
                self.pending.extend(self.frames.feed(data))
                self._deliver_pending()
            except Exception as exc:
                self._break(exc)
                return
