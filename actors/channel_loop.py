"""The file's process serves its channel sockets in its own turn while thespian has nothing to do.

A SessionFile on direct channels gets every frame as a ``WatchMessage``: one whole pass of
thespian's loop per readable socket (``TCPTransport._runWithExpiry`` builds its descriptor
lists from its transmit intents, incoming and open sockets and timers, polls them, queues the
``WatchMessage``, and its actor manager dispatches it), about 30% of the file process's CPU
(``docs/hot-path.md``). ``ChannelLoop`` lets the file, at the end of its turn, wait for its own
channel descriptors itself and serve what they bring as the ``WatchMessage`` thespian would
have delivered, in the same turn, as long as thespian has nothing to do.

This is the transport's wait moved into the file's turn, not a handler blocking its mailbox
(the project's rule: handlers never block). Every descriptor thespian would wait for is in the same
``poll``: its listen socket and its open sockets (a message for the actor arrives on one of
them, or on a new connection to the listener, which is how thespian also wakes itself for a
signal or a message to self). The turn goes back to thespian the moment it may have anything
to do:

* one of its descriptors is readable, or ``poll`` reports a bad descriptor;
* it has work queued: transmit intents (the actor sent a message in its turn: a send returns at
  once, it is never held up here), transmits waiting for a socket or for their turn, finished
  transmits to complete, received envelopes, realized wakeups, the actor manager's receive
  queue, a shutdown or child-exit signal noted, or the actor is exiting;
* a connection thespian accepted but has not finished reading (``_incomingSockets``: a peer's
  first message, half received, or a stranger's idle connection waiting for its key hello) is
  readable or due: its socket is in the same ``poll`` unless thespian pauses it
  (``backoffPause``), and the wait never outlasts its ``delay``, as in thespian's own wait;
* a timer is due: the wait never outlasts the transport's ``run_time`` (the first pending
  ``wakeupAfter``; ``addWakeup`` lowers it as a turn arms a new one), so a lease's expiry or a
  commit timer fires on time while clients keep the file busy;
* ``hold_ms`` since the turn began (``channel_loop_ms``, default 50 ms): thespian's own
  housekeeping that no descriptor or queue announces (idle sockets expire after 20 minutes) runs
  at least that often, for one pass per ``hold_ms`` of a busy file, a fraction of a percent.

What the actor itself must not hold the turn for (a carried connection's frames come in thespian
messages; a retiring file) is the actor's to say before each round (``SessionFile.hold``).

STYLE 11 would put thespian's internals in ``system/runtime``; this module stays in ``actors/``
because ``SessionFile.hold`` drives it between rounds of its own turn, with its own fds and
pipe: moving the transport-reading half out (installed and injected, as ``poll_loop`` is) would
split one wait across two layers for no change in what is read, and was not judged small and
safe enough for a fix round.

It reads thespian 4.0.1's internals, so it checks them once per process (``unsupported``):
the version, and that the transport's loop, its ``__init__``, the wakeup mixin and the actor
manager still use the names read here (their code objects' names: no source is read). If
anything differs, ``attach`` gives no loop and the file returns its watch to thespian after
every turn, as before. An actor outside a multiproc TCP system (a test driving it by hand,
the zygote's warm-up) gets no loop either.

Group commit keeps its rules: a round is a ``WatchMessage`` handled by the same code, so an ack
still leaves only after the fdatasync that covers it. A turn that awaits the end of its pass
watches the always-readable pipe (``Serving.ready_fd``); thespian's next pass would report it
at once, with whatever channel socket is readable then, and so does the next round, from a
``poll`` that does not wait.
"""

from __future__ import annotations

import functools
import logging
import math
import select
import time
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["DEFAULT_HOLD_MS", "SUPPORTED_THESPIAN", "ChannelLoop", "Returned", "unsupported"]

log = logging.getLogger(__name__)

SUPPORTED_THESPIAN = "4.0.1"
"""The thespian whose internals this module reads: the one pin of the project's code, kept here
because this layer may not import ``sessionlane.system`` (``system.runtime.loopback`` and the
patches that check it import it from here)."""

DEFAULT_HOLD_MS = 50
"""How long one turn may serve channels before thespian gets a pass (``channel_loop_ms``)."""

Returned = Literal[
    "thespian", "received", "sending", "receiving", "signalled", "timer", "held", "error"
]
"""Why a turn went back to thespian (``ChannelLoop.returns``)."""

_READ = select.POLLIN | select.POLLPRI
_ANY = _READ | select.POLLERR | select.POLLHUP | select.POLLNVAL

# The names each thespian function must still use (its code's names, nested code included) for
# the loop to read what it reads: the version is pinned, this catches a patched or moved copy.
_EXPECTED: dict[str, tuple[str, ...]] = {
    "TCPTransport.__init__": (
        "_transmitIntents",
        "_waitingTransmits",
        "_incomingSockets",
        "_incomingEnvelopes",
        "_finished_intents",
        "_openSockets",
        "_checkChildren",
        "_shutdownSignalled",
        "_watches",
    ),
    "TCPTransport._runWithExpiry": (
        "run_time",
        "_incomingEnvelopes",
        "_transmitIntents",
        "_waitingTransmits",
        "_incomingSockets",
        "backoffPause",
        "delay",
        "_openSockets",
        "socket",
        "fileno",
        "_watches",
        "WatchMessage",
        "_finished_intents",
        "_aborting_run",
    ),
    "TCPTransport.interrupt_wait": ("_shutdownSignalled", "_checkChildren", "connect"),
    "wakeupTransportBase.addWakeup": ("run_time", "_pendingWakeups"),
    "wakeupTransportBase._update_runtime": ("run_time", "_pendingWakeups"),
    "wakeupTransportBase._deliver_wakeups": ("_activeWakeups",),
    "asyncTransportBase.__init__": ("_aTB_queuedPendingTransmits",),
    "ActorManager.handleMessages": ("_receiveQueue", "_handleOneMessage"),
    "ActorManager._handleOneMessage": ("actorInst", "receiveMessage", "set_watch", "filenos"),
}


def _names(code: Any) -> set[str]:
    """The names ``code`` uses, with those of the code nested in it (lambdas, comprehensions)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _names(const)
    return names


@functools.cache
def unsupported() -> str | None:
    """Why the loop cannot run with the installed thespian, or None (checked once per process:
    the zygote's warm-up asks, so every file's process inherits the answer)."""
    try:
        from importlib import metadata

        version = metadata.version("thespian")
        if version != SUPPORTED_THESPIAN:
            return f"thespian {version} is installed, the loop reads {SUPPORTED_THESPIAN}'s"
        from thespian.system.actorManager import ActorManager
        from thespian.system.transport.asyncTransportBase import asyncTransportBase
        from thespian.system.transport.TCPTransport import TCPTransport
        from thespian.system.transport.wakeupTransportBase import wakeupTransportBase

        owners = {
            "TCPTransport": TCPTransport,
            "wakeupTransportBase": wakeupTransportBase,
            "asyncTransportBase": asyncTransportBase,
            "ActorManager": ActorManager,
        }
        for name, needles in _EXPECTED.items():
            owner, method = name.split(".")
            used = _names(getattr(owners[owner], method).__code__)
            missing = [n for n in needles if n not in used]
            if missing:
                return f"thespian's {name} no longer uses {missing[0]!r}"
    except Exception as exc:  # a module or a function that moved
        return f"thespian's internals cannot be checked: {exc!r}"
    return None


class ChannelLoop:
    """One actor's waits for its channel descriptors in its own turn (see the module docstring).

    ``rounds`` counts the waits that found channel input and were served in the turn (each one a
    thespian pass saved); ``returns`` the turns given back to thespian, by reason: ``thespian``
    (one of its descriptors readable, or one ``poll`` called bad), ``received``, ``sending``,
    ``receiving``, ``signalled`` (its queues and flags: ``busy``), ``timer`` (a wakeup due),
    ``held`` (the turn's ``hold_ms`` spent), ``error`` (``poll`` failed, or a wait or a round
    raised: ``failed``).
    """

    def __init__(
        self,
        manager: Any,
        transport: Any,
        hold_ms: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: seconds, monotonic (``attach`` gives the actor's ``now``; tests a fake)."""
        self.manager = manager
        self.transport = transport
        self.hold_s = hold_ms / 1000.0
        self.clock = clock
        self.rounds = 0
        self.returns: dict[Returned, int] = {}
        self._key: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._poll: Any = None
        self._ours: frozenset[int] = frozenset()

    @classmethod
    def attach(cls, actor: Any, hold_ms: float) -> ChannelLoop | None:
        """The loop for ``actor`` (a ``ShellActor`` thespian created), or None: turned off
        (``hold_ms`` 0), an unsupported thespian, or an actor not on thespian's TCP transport."""
        if hold_ms <= 0:
            return None
        why = unsupported()
        manager = getattr(actor, "_myRef", None)
        transport = getattr(manager, "transport", None)
        if why is None and transport is not None:
            from thespian.system.transport.TCPTransport import TCPTransport

            if isinstance(transport, TCPTransport) and hasattr(manager, "_receiveQueue"):
                now_ms = getattr(actor, "now", None)  # the actor's one clock, if it has one
                if now_ms is None:
                    return cls(manager, transport, hold_ms)
                return cls(manager, transport, hold_ms, clock=lambda: now_ms() / 1000.0)
            return None
        if why is not None and transport is not None:
            log.info("serving channels through thespian's loop only: %s", why)
        return None

    def counters(self) -> dict[str, int]:
        """``loop_rounds``, and ``loop_returned_<why>`` for each reason a turn went back."""
        returned = {f"loop_returned_{why}": n for why, n in sorted(self.returns.items())}
        return {"loop_rounds": self.rounds, **returned}

    def until(self) -> float:
        """The end of this turn's hold (``clock`` seconds)."""
        return self.clock() + self.hold_s

    def busy(self) -> Returned | None:
        """Why thespian may have something to do now (its queues and flags), or None."""
        t, m = self.transport, self.manager
        if t._incomingEnvelopes or getattr(t, "_activeWakeups", None):
            return "received"
        if t._transmitIntents or t._waitingTransmits or t._finished_intents:
            return "sending"
        if t._aTB_queuedPendingTransmits or m._receiveQueue:
            return "sending"
        if t._shutdownSignalled or t._checkChildren or getattr(m, "_exiting", False):
            return "signalled"
        if hasattr(t, "_aborting_run"):
            return "signalled"
        return None

    def wait(self, fds: list[int], pipe: int | None, until: float) -> list[int] | None:
        """Wait for the channel descriptors ``fds`` as thespian's pass would; the ready ones
        (``pipe``, the always-readable one of group commit, among them if watched), or None if
        the turn goes back to thespian (counted in ``returns``).

        With ``pipe`` watched nothing is waited for: thespian's next pass would report it at
        once, with whatever else is ready then; so does this one, in a ``poll`` that does not
        wait."""
        why = self.busy()
        if why is None:
            why, ready = self._poll_once(fds, pipe, until)
            if why is None:
                self.rounds += 1
                return ready
        self.returns[why] = self.returns.get(why, 0) + 1
        return None

    def failed(self) -> None:
        """A wait or a round raised: the turn goes back to thespian (counted as ``error``)."""
        self.returns["error"] = self.returns.get("error", 0) + 1

    def _poll_once(
        self, fds: list[int], pipe: int | None, until: float
    ) -> tuple[Returned | None, list[int]]:
        left = until - self.clock()
        remaining = self.transport.run_time.view().remainingSeconds()
        if remaining is not None:
            if remaining <= 0:
                return "timer", []
            left = min(left, remaining)
        incoming = self._incoming_due()
        if incoming is not None:
            if incoming <= 0:
                return "receiving", []
            left = min(left, incoming)
        if left <= 0:
            return "held", []
        channel = [fd for fd in fds if fd != pipe]
        watched = pipe is not None and pipe in fds
        poller = self._poller(channel)
        try:
            polled = poller.poll(0 if watched else math.ceil(left * 1000.0))
        except OSError:
            return "error", []
        ours = self._ours
        ready = []
        for fd, event in polled:
            if fd not in ours or event & select.POLLNVAL:
                return "thespian", []
            ready.append(fd)
        if watched:
            assert pipe is not None
            ready.append(pipe)
        if not ready:
            if incoming is not None and incoming <= left:
                return "receiving", []
            return ("timer" if remaining is not None and remaining <= left else "held"), []
        return None, ready

    def _incoming_due(self) -> float | None:
        """Seconds until the first of thespian's incoming sockets (a connection not yet past
        its first message, a stranger's idle one among them) is due for its own handling (its
        deadline, or the end of a backoff pause), as thespian's wait caps itself; or None."""
        incoming = self.transport._incomingSockets
        if not incoming:
            return None
        from thespian.system.timing import currentTime

        ct = currentTime()
        for inc in incoming.values():
            inc.backoffPause()  # as thespian's wait: a pause that is over is dropped first
        return float(min(inc.delay(ct).total_seconds() for inc in incoming.values()))

    def _poller(self, channel: list[int]) -> Any:
        """A ``poll`` object over ``channel`` and the sockets thespian's own wait would watch,
        kept while they stay: its listener, its open sockets, and its incoming sockets not in a
        backoff pause. A socket already closed (fileno -1) is left to thespian's next pass."""
        t = self.transport
        incoming = [fd for fd, inc in t._incomingSockets.items() if fd and not inc.backoffPause()]
        opened = [s.socket.fileno() for s in t._openSockets.values()]
        theirs = tuple(fd for fd in (t.socket.fileno(), *opened, *incoming) if fd >= 0)
        key = (tuple(channel), theirs)
        if key != self._key:
            poller = select.poll()
            for fd in (*channel, *theirs):
                poller.register(fd, _ANY)
            self._poll, self._key, self._ours = poller, key, frozenset(channel)
        return self._poll
