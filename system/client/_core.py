"""The I/O-free core of the client: one client's settings, connections, requests and leases.

``ClientCore`` is the state both surfaces (``_sync``'s thread, ``_async``'s task) drive with
what happened on their sockets, passing the time in; it answers with what to do: the bytes of
a request, the waiter a reply is for, a frame to send on its own (a keepalive, the release of
a grant nobody waits for), the waiters to fail when a connection is lost. It never touches a
socket, a thread, an event loop or a clock.

Invariants:

- a request id is used once per client (ids grow across reconnects);
- a request waits on exactly one connection (``Link``) and gets one final reply (``queued`` is
  progress, not an answer), or fails when that connection is lost, or is given up by its
  caller; a grant to an acquire given up is released as soon as it arrives;
- a lease belongs to the connection that granted it: when that connection ends, every lease
  is revoked (``connection_lost``, or ``connection_closed`` by ``close()``), except that with
  ``reconnect_for`` a lease that has a reclaim secret is *suspended* instead: the next
  connection reclaims it (same lease, same fence) or, refused, revokes it (``restart``), as
  does a reconnect that tried for the whole ``reconnect_for`` in vain (one window per loss);
- once closed, a client opens no connection again;
- nothing is sent on a connection before its other end was found to be the expected service:
  its socket's owner (``_verify.service_refusal``; by default this user, unless a token is given)
  and, with a token, its proof of the token (:meth:`ClientCore.welcomed`). The token itself
  is never sent (``sessionlane.messages.handshake``);
- a lease taken on a direct channel (``_direct``, ``docs/direct-channel.md``) is written and
  released on that channel only, and ends with it, or with the gateway's connection.

About 740 lines: the direct channels' routing is ``_direct.DirectRoutes``; what stays here is
where it meets the leases and the links (and, when a direct channel closes under a lease, the
question to the gateway that decides the reason the holder is told: ``probe``), and the one
ride-out window per lost connection, which ends the suspended leases (``connect_plan``,
``reconnect_failed``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

from tenacity import retry_if_exception_type, stop_after_delay, wait_exponential

from sessionlane.messages.codec import frame
from sessionlane.messages.errors import LeaseRevoked, Unauthorized, Unavailable, error_for
from sessionlane.messages.handshake import NONCE_BYTES, client_proof, matches, server_proof
from sessionlane.messages.wire import (
    AbortRequested,
    Acquire,
    Challenge,
    Error,
    ExternalChange,
    ExternalChangeKind,
    Granted,
    Hello,
    Keepalive,
    Proof,
    Recover,
    Release,
    Reply,
    RequestId,
    Revoked,
    Welcome,
)
from sessionlane.system.client._checks import check_options
from sessionlane.system.client._direct import DirectRoutes, DirectUnknown, Key
from sessionlane.system.client._frames import request_frame
from sessionlane.system.client._records import MAX_FRAME_BYTES, MAX_RECORD_BYTES, check_frame
from sessionlane.system.client._verify import resolve_user
from sessionlane.system.config import ConfigError, parse_listen

__all__ = [
    "Answer",
    "AppendResult",
    "ClientCore",
    "ConnectionLost",
    "LeaseState",
    "Link",
    "NotSent",
    "OutOfBudget",
    "Send",
    "Settings",
    "anchor",
    "default_address",
    "log",
    "parse_address",
]

DEFAULT_ADDRESS = "tcp://127.0.0.1:7420"
ADDRESS_ENV = "SESSIONLANE_LISTEN"
"""The variable the service reads its ``listen`` from; a client without an address uses it too."""
REPLY_MARGIN_S = 10.0
"""How much longer than its own timeout a request may take before the service is deemed gone."""
INCOMING_FRAME_BYTES = 64 * 1024 * 1024
"""The largest reply frame accepted (a status of many files is large; 64 MiB is not sane)."""
RETRYABLE = (ConnectionRefusedError, FileNotFoundError, ConnectionResetError)
"""Connect failures worth retrying: nobody listening yet (a service restarting)."""

log = logging.getLogger("sessionlane.client")  # the public package's name: what users configure
# A library must not write to its host's stderr: without a handler of the host's, Python's
# last-resort handler would print every warning there. The NullHandler stops that and nothing
# else (records still propagate to whatever handlers the host installs).
log.addHandler(logging.NullHandler())

W = TypeVar("W")
"""How a surface waits for a reply (a thread's waiter, an asyncio future)."""
T = TypeVar("T")
"""A surface's open connection (a socket, a stream pair)."""


def default_address() -> str:
    """``$SESSIONLANE_LISTEN`` (what a service in the same environment listens on), else
    ``tcp://127.0.0.1:7420``."""
    return os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def parse_address(address: str) -> tuple[str, Any]:
    """``HOST:PORT`` or ``tcp://HOST:PORT`` -> ("tcp", (host, port)); ``unix:///path`` ->
    ("unix", path). The service's own parser (``sessionlane.system.config.parse_listen``): one
    syntax.

    Raises ``ValueError`` naming the accepted forms.
    """
    try:
        parsed = parse_listen(address)
    except ConfigError as exc:
        raise ValueError(f"not a sessionlane address: {exc.message}") from None
    if parsed[0] == "unix":
        return "unix", parsed[1]
    return "tcp", (parsed[1], parsed[2])


def anchor(path: str | os.PathLike[str]) -> str:
    """Relative paths are the caller's: anchor them at the caller's directory.

    No lexical ``..`` folding: the service resolves symlinks first, as the OS would.
    """
    path = os.fspath(path)
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


class ConnectionLost(Unavailable):
    """The connection a request was sent on ended before its reply (an ``Unavailable``; a
    write's outcome is then unknown)."""


class NotSent(Unavailable):
    """A request whose connection failed while it was being sent: the service served none
    of it (a frame cut short is dropped with the connection, never read as a request)."""


class OutOfBudget(Unavailable):
    """A reconnect cut short by its caller's own budget (an acquire's wait), not by
    ``reconnect_for``: the service may still come back for others."""


@dataclass(frozen=True)
class Settings:
    """What ``connect`` / ``connect_async`` were given (see ``connect`` for each one)."""

    address: str
    token: str | None
    timeout: float = 30.0
    keepalive: float = 5.0
    reconnect_for: float = 0.0
    max_record_bytes: int | None = MAX_RECORD_BYTES
    max_frame_bytes: int | None = MAX_FRAME_BYTES
    service_user: int | str | None = None
    """Who must own the service's socket: a uid, ``"*"`` (anyone), or None: this process's
    user without a token, no owner check with one (its proof decides). See
    :func:`service_refusal`."""
    direct: bool = True
    """Ask for direct channels to the files this client leases (``docs/direct-channel.md``);
    the service offers them only to a client on its own host."""

    @classmethod
    def of(cls, address: str | None, token: str | None, **options: Any) -> Settings:
        """The settings of a new client; a malformed address, an unknown ``service_user`` or a
        bad option (``sessionlane.system.client._checks``) raises ``ValueError`` here, not at
        the first call. The token is compared as the service compares it: surrounding
        whitespace (a file's trailing newline) is not part of it."""
        address = default_address() if address is None else address
        parse_address(address)
        check_options(options)
        options["service_user"] = resolve_user(options.get("service_user"))
        return cls(address, None if token is None else token.strip(), **options)

    def retry_policy(self, window: float | None = None) -> dict[str, Any]:
        """The arguments of the tenacity ``Retrying`` / ``AsyncRetrying`` of a connect: retry
        a refusal for ``window`` seconds (default ``reconnect_for``; 0: one attempt), backing
        off to 1 s."""
        return {
            "stop": stop_after_delay(self.reconnect_for if window is None else window),
            "wait": wait_exponential(multiplier=0.05, max=1.0),
            "retry": retry_if_exception_type(RETRYABLE),
            "reraise": True,
        }

    def unreachable(self, exc: OSError) -> Unavailable:
        """The error of a connect that failed (after its retries)."""
        # The system's words for the errno: asyncio words its own ("Connect call failed").
        why = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
        return Unavailable(f"cannot reach sessionlane at {self.address}: {why}")

    def reply_limit(self, timeout: float | None) -> float:
        """How long to wait for the reply of a request that may itself wait ``timeout``."""
        return (self.timeout if timeout is None else timeout) + REPLY_MARGIN_S


class AppendResult(NamedTuple):
    """Where an append landed: byte offset of its first line, lines written, the fence."""

    offset: int
    lines: int
    fence: int


@dataclass
class LeaseState:
    """What the client knows about one lease, updated by events as they arrive."""

    lease: str
    path: str
    fence: int
    purpose: str
    lane: str = ""
    """The lane name that holds it (a reclaim is asked on the same name)."""
    priority: str = "interactive"
    secret: str | None = None
    """The reclaim secret ``granted`` carried (None: an older service; never reclaimed)."""
    suspended: bool = False
    """The connection ended (a service restart?): reclaim before the next write."""
    abort_requested: bool = False
    revoked: str | None = None
    """The revocation reason (``max_hold``, ``recovery``, ``connection_lost``, ...) or None."""
    external_changes: list[ExternalChangeKind] = field(default_factory=list)
    released: bool = False
    """Every level of the lease was released."""
    holds: int = 0
    """Nesting depth: a reentrant grant of a held lease shares this state and adds one."""

    def check_usable(self) -> None:
        """Raise ``LeaseRevoked`` (nothing sent) if this lease may no longer write."""
        if self.revoked is not None:
            raise LeaseRevoked(
                f"lease {self.lease} was revoked ({self.revoked}); nothing was written",
                path=self.path,
                reason=self.revoked,
            )
        if self.released:
            raise LeaseRevoked(
                f"lease {self.lease} was released", path=self.path, reason="released"
            )


@dataclass(eq=False)
class Link(Generic[W, T]):
    """One connection: its transport, its requests in flight, when it last sent."""

    transport: T
    generation: int
    last_sent: float
    pending: dict[RequestId, W] = field(default_factory=dict)
    """The waiter of each request sent on this connection and not answered yet."""
    orphans: set[RequestId] = field(default_factory=set)
    """Acquires whose caller stopped waiting: a grant that still comes is released."""
    lost: str | None = None
    """Why the connection ended, once it has."""
    nonce: bytes | None = None
    """With a token: this client's nonce of the token proof, sent in the hello."""
    challenge: bytes | None = None
    """With a token: the service's nonce, from its ``challenge``."""


class Answer(NamedTuple, Generic[W]):
    """Wake ``waiter`` with ``reply``, the final reply to its request."""

    waiter: W
    reply: Reply


class Send(NamedTuple):
    """Send ``data`` on the connection, expecting no answer (failures are the reader's)."""

    data: bytes


class ClientCore(Generic[W, T]):
    """The state of one client (``SessionLane`` or ``AsyncSessionLane``): see the module.

    Not thread-safe: the sync surface calls it under its lock.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.link: Link[W, T] | None = None
        """The open connection, or None (never opened, lost, or closed)."""
        self.closed = False
        self.server: str | None = None
        """The service's name and version, from the welcome of the last connection."""
        self.leases: dict[str, LeaseState] = {}
        """The leases held on ``link``, by lease id."""
        self._last_id = 0
        self._generation = 0
        self.orphaned: set[str] = set()
        """Leases whose direct channel closed under them while the gateway's connection was up:
        the file's process ended, or the whole service did. ``probe`` asks the gateway; its
        answer revokes them ``actor_restart`` (as the gateway says it of the leases it routed),
        the gateway connection's loss ``connection_lost``."""
        self._probe: str | None = None
        self._probes = 0
        self.service_uid: int | None = None
        """The uid the service's socket was found to run as (a direct channel's peer must be
        the same), or None when unknown (no direct channel then)."""
        self.direct: DirectRoutes[Link[W, T]] = DirectRoutes(settings.direct)
        """Which requests go on which direct channel (``docs/direct-channel.md``)."""
        self.clock: Callable[[], float] = time.monotonic
        """What the operations read the time from (seconds; tests replace it)."""
        self.connect_failures = 0
        """How many reconnects tried for the whole ``reconnect_for`` and failed: a call that
        waited for one of them (a reclaim, a lease's call) shares its outcome, never starting a
        window of its own (:meth:`connect_plan`)."""
        self._connect_failure = ""
        """The detail of the last of those failures."""

    # Connections ---------------------------------------------------------------------------

    def opened(self, transport: T, now: float) -> tuple[Link[W, T], Hello]:
        """A connection was opened on ``transport``: its link, and the hello to send on it
        first. The link becomes the client's only once welcomed: no other request may go out
        before the hello (the service would close the connection)."""
        if self.closed:
            raise Unavailable("the connection was closed")
        self._generation += 1
        link: Link[W, T] = Link(transport, self._generation, last_sent=now)
        if self.settings.token is not None:
            link.nonce = os.urandom(NONCE_BYTES)
        direct = True if self.direct.ask else None
        return link, Hello(client=f"python:{os.getpid()}", nonce=link.nonce, direct=direct)

    def challenged(self, link: Link[W, T], reply: Reply) -> Proof | None:
        """The proof to send if ``reply`` (to the hello) is the service's ``challenge``; None
        if it is the final reply (for :meth:`welcomed`).

        Raises ``Unauthorized`` if the service challenges a client that has no token.
        """
        if isinstance(reply, Error) and link.nonce is not None and "nonce" in reply.detail:
            raise Unauthorized(
                f"the service at {self.settings.address} is older than this client: it does"
                f" not take the token proof ({reply.code}: {reply.detail}); upgrade the"
                " service (this client never sends the token itself)"
            )
        if not isinstance(reply, Challenge):
            return None
        if self.settings.token is None or link.nonce is None:
            raise Unauthorized(
                f"the service at {self.settings.address} requires a token (it has a"
                " token_file): connect with token="
            )
        link.challenge = reply.nonce
        return Proof(proof=client_proof(self.settings.token, link.nonce, reply.nonce))

    def welcomed(self, link: Link[W, T], reply: Reply) -> None:
        """The final reply to ``link``'s hello arrived: from now on ``link`` carries the
        requests.

        Raises the error it carries (``Unauthorized``, ...), ``Unauthorized`` if, with a
        token, the service did not prove it knows it, or ``Unavailable`` if the client was
        closed meanwhile; the surface then drops the link.
        """
        if isinstance(reply, Error):
            if self.direct.hello_refused(reply.code, reply.detail):
                raise DirectUnknown(f"an older service: {reply.detail}")
            raise error_for(reply.code, reply.detail, reply.path)
        if self.closed or link.lost is not None:
            raise Unavailable("the connection was closed")
        if not isinstance(reply, Welcome):
            raise Unauthorized(f"the service answered the hello with {reply.type}")
        token = self.settings.token
        if token is not None:
            where = f"the service at {self.settings.address}"
            if link.nonce is None or link.challenge is None:
                raise Unauthorized(
                    f"{where} did not ask for the token proof: it has no token_file, or it is"
                    " not the service; nothing was sent (connect without the token if the"
                    " service has none)"
                )
            if not matches(reply.proof, server_proof(token, link.nonce, link.challenge)):
                raise Unauthorized(
                    f"{where} did not prove it knows the token: it is not the service, or its"
                    " token_file holds another token; nothing was sent"
                )
        self.server = reply.server
        self.link = link
        self.direct.welcomed(bool(reply.direct) and self.service_uid is not None)

    def connect_plan(self, deadline: float | None, seen: int) -> tuple[float | None, bool]:
        """How long a reconnect may keep trying (None: ``reconnect_for``), and whether that is
        the whole ``reconnect_for`` (its failure is then shared: :meth:`reconnect_failed`).

        ``deadline`` (``clock`` time): the caller's own budget ends then, and the reconnect with
        it. ``seen``: ``connect_failures`` when the caller decided to call (under the surface's
        lock, with the state it checked). Raises the shared failure if a reconnect failed since
        (the caller waited for it: one ride-out window, not one more), ``OutOfBudget`` if the
        budget is spent.
        """
        if self.connect_failures != seen:
            raise Unavailable(self._connect_failure)
        if deadline is None:
            return None, True
        left = deadline - self.clock()
        if left <= 0:
            raise self.out_of_budget()
        if left >= self.settings.reconnect_for:
            return None, True
        return left, False

    def out_of_budget(self) -> OutOfBudget:
        """What a reconnect cut short by its caller's budget raises."""
        return OutOfBudget(
            f"cannot reach sessionlane at {self.settings.address} within the caller's budget"
        )

    def reconnect_failed(self, error: Unavailable) -> None:
        """A reconnect tried for the whole ``reconnect_for`` and failed: the service did not
        come back in time. Every suspended lease is lost now (``restart``), and the callers
        that waited for that reconnect fail with ``error`` (:meth:`connect_plan`)."""
        if not self.reconnects:
            return
        self.connect_failures += 1
        self._connect_failure = error.detail
        for state in self.suspended():
            self.not_reclaimed(state)

    def link_for(self, reconnect: bool) -> Link[W, T] | None:
        """The connection a request goes on, or None: reconnect first (only if ``reconnect``;
        a lease's requests never go on a connection other than the one that granted it)."""
        if self.closed:
            raise Unavailable("the connection was closed")
        if self.link is None and not reconnect:
            raise Unavailable("not connected")
        return self.link

    def keepalive(self, link: Link[W, T], now: float) -> tuple[float, bytes | None]:
        """Seconds until the next look, and a keepalive to send now if nothing was sent for
        ``keepalive`` seconds. The service hears from us only when we send: keep alive by what
        we sent, not by what we received (a holder fed events may send nothing for long)."""
        if link is not self.link:  # not welcomed yet (nothing goes before the hello), or lost
            return self.settings.keepalive, None
        due = link.last_sent + self.settings.keepalive - now
        if due > 0:
            return due, None
        link.last_sent = now
        return self.settings.keepalive, frame(Keepalive(id=f"ka{link.generation}"))

    def lost(
        self, link: Link[W, T], reason: str, revoked: str = "connection_lost", *, ask: bool = False
    ) -> list[W]:
        """``link`` is over: its leases are revoked (if it was the client's link) and the
        returned waiters must fail with :meth:`lost_error`. Idempotent (a second call: []).
        ``ask``: the service's side closed it (its reader saw the end), so a direct channel's
        leases wait for the gateway's answer to :meth:`probe`; a send of ours that failed
        decides at once."""
        if link.lost is not None:
            return []
        link.lost = reason
        if self.link is link:
            self.link = None
            self._revoke_all(revoked, suspend=not self.closed and self.reconnects)
        elif self._direct_lost(link, revoked, ask):
            log.debug("sessionlane %s: direct channel ended: %s", self.settings.address, reason)
            return self._take_waiters(link)
        if not self.closed:
            log.warning("sessionlane %s: %s", self.settings.address, reason)
        return self._take_waiters(link)

    def _take_waiters(self, link: Link[W, T]) -> list[W]:
        waiters = list(link.pending.values())
        link.pending.clear()
        return waiters

    # Direct channels -----------------------------------------------------------------------

    def direct_opened(self, key: Key, transport: T, now: float) -> Link[W, T]:
        """A direct channel for ``key`` was opened and welcomed on ``transport``."""
        self._generation += 1
        link: Link[W, T] = Link(transport, self._generation, last_sent=now)
        self.direct.links[key] = link
        return link

    def direct_refusal(self, key: Key, reason: str) -> None:
        """No direct channel for ``key`` on this connection: its requests use the gateway."""
        log.debug("sessionlane %s: no direct channel to %s: %s", self.settings.address, key, reason)
        self.direct.refuse(key, self.clock())

    def _direct_lost(self, link: Link[W, T], revoked: str, ask: bool) -> bool:
        """If ``link`` is a direct channel: forget it, its leases revoked (those the gateway's
        loss did not already suspend or revoke), or, with ``reconnect_for``, suspended as the
        gateway's loss would (a crashed service may close the channel first: the reclaim
        decides). False for any other link."""
        gone = self.direct.lost(link)
        if gone is None:
            return False
        suspend = not self.closed and self.reconnects
        for lease in gone:
            state = self.leases.get(lease)
            if state is None or state.suspended:
                continue
            if suspend and state.secret is not None:
                state.suspended = True
                continue
            if ask and self.link is not None and not self.closed:
                self.orphaned.add(lease)  # the gateway's answer to ``probe`` says why
                continue
            state.revoked = revoked
            del self.leases[lease]
        return True

    def probe(self) -> bytes | None:
        """A keepalive to send on the gateway's connection now, if a direct channel closed under
        held leases (``orphaned``) and none is out yet: if the gateway answers, the service lives
        and only the file's process ended under them."""
        if not self.orphaned or self._probe is not None or self.link is None:
            return None
        self._probes += 1
        self._probe = f"probe{self._probes}"
        return frame(Keepalive(id=self._probe))

    def settle_orphan(self, lease: str, reason: str) -> None:
        """If ``lease`` waits for the gateway's answer (``orphaned``), end it now with
        ``reason``: a request of its holder failed meanwhile, so the answer would come too late
        to be told."""
        if lease in self.orphaned:
            self.orphaned.discard(lease)
            state = self.leases.pop(lease, None)
            if state is not None:
                state.revoked = reason

    def _probed(self) -> None:
        """The gateway answered ``probe``: the orphaned leases' file restarted under them."""
        self._probe = None
        for lease in self.orphaned:
            state = self.leases.pop(lease, None)
            if state is not None:
                state.revoked = "actor_restart"
        self.orphaned.clear()

    def direct_held(self, lane: str, path: str | None) -> list[LeaseState]:
        """The leases held on the direct channels of ``lane`` (to ``path`` only, if given)."""
        return [self.leases[x] for x in self.direct.held(lane, path) if x in self.leases]

    def resend_unsent(self, link: Link[W, T], request: Any) -> bool:
        """Whether ``request``, which could not be sent on the direct channel ``link`` (the
        file had just closed it), goes again: one that opens its (path, lane)'s channel (an
        acquire, a lane-less append), which the gateway, or a new channel, then takes."""
        return link is not self.link and self.direct.opens_channel(request)

    def resend_on_loss(self, link: Link[W, T], request: Any) -> bool:
        """Whether ``request``, lost with the direct channel ``link`` before its answer, may be
        sent again: an acquire (the file abandons whatever a closed channel was granted or
        waited for, so a grant cannot have survived; a write's outcome stays unknown)."""
        return isinstance(request, Acquire) and link is not self.link and link.lost is not None

    def direct_links(self) -> list[Link[W, T]]:
        """Every open direct channel (to close when the gateway's connection ends)."""
        return list(self.direct.links.values())

    @staticmethod
    def lost_error(link: Link[W, T]) -> Unavailable:
        """What a request whose connection ended gets (a write: ``UnknownOutcome``, see
        ``_ops``)."""
        return ConnectionLost(f"connection lost before the reply ({link.lost})")

    @staticmethod
    def no_reply(request: Any, limit: float) -> Unavailable:
        """What a request that got no reply within ``limit`` seconds gets."""
        return Unavailable(f"no reply to {request.type} within {limit:.0f} s")

    def close(self) -> list[W]:
        """The client is closed: its leases end (``connection_closed``) and no request goes out
        again. Returns the waiters to fail, as :meth:`lost` does; the surface closes the link
        it had (``self.link`` before this call)."""
        self.closed = True
        if self.link is None:
            return []
        return self.lost(self.link, "closed by the client", revoked="connection_closed")

    # Requests and replies ------------------------------------------------------------------

    def request(
        self,
        link: Link[W, T],
        message: Any,
        waiter: W,
        now: float,
        encode: Callable[[Any, int], bytes] | None = None,
    ) -> tuple[Any, bytes]:
        """The id and bytes of ``message`` sent on ``link``, its reply awaited by ``waiter``.

        ``encode``: makes the frame of ``message`` with an id (the frame ``codec.frame`` makes
        of it, built faster: a pipeline's appends). Raises ``TooLarge`` (nothing registered,
        nothing to send) for a frame the service would refuse, ``Unavailable`` if ``link`` is
        already lost.
        """
        if link.lost is not None:
            raise Unavailable(f"not connected ({link.lost})")
        self._last_id += 1
        rid = self._last_id
        data = check_frame((encode or request_frame)(message, rid), self.settings.max_frame_bytes)
        link.pending[rid] = waiter
        link.last_sent = now
        return rid, data

    def given_up(self, link: Link[W, T], rid: Any, message: Any) -> None:
        """The caller of request ``rid`` stopped waiting (no reply in time, or cancelled)
        before its answer: a grant that still comes must not pin the path."""
        if link.pending.pop(rid, None) is not None and isinstance(message, Acquire | Recover):
            link.orphans.add(rid)

    def received(self, link: Link[W, T], reply: Reply) -> Answer[W] | Send | None:
        """A reply or event arrived on ``link``: what to do with it."""
        if reply.id is None:
            self._apply_event(reply)
            return None
        if link is self.link and reply.id == self._probe:
            self._probed()
            return None
        if reply.type == "queued":
            return None
        waiter = link.pending.pop(reply.id, None)
        if waiter is not None:
            if isinstance(reply, Granted) and link is not self.link:
                self.direct.leases[reply.lease] = link
            return Answer(waiter, reply)
        if reply.id in link.orphans:
            link.orphans.discard(reply.id)
            if isinstance(reply, Granted):
                log.info("releasing lease %s: its acquire was given up", reply.lease)
                return Send(frame(Release(id=f"orphan{reply.id}", lease=reply.lease)))
        return None

    # Leases --------------------------------------------------------------------------------

    @property
    def reconnects(self) -> bool:
        """Whether a lost connection is ridden out (``reconnect_for`` > 0)."""
        return self.settings.reconnect_for > 0

    def suspended(self) -> list[LeaseState]:
        """The leases waiting to be reclaimed on the next connection."""
        return [state for state in self.leases.values() if state.suspended]

    def reclaimed(self, state: LeaseState, granted: Granted) -> None:
        """The service gave ``state`` back after a restart."""
        assert granted.lease == state.lease and granted.fence == state.fence, granted
        state.suspended = False
        self.leases[state.lease] = state

    def not_reclaimed(self, state: LeaseState) -> None:
        """The service refused to give ``state`` back (or could not be reached): it is lost."""
        state.suspended = False
        state.revoked = "restart"
        if self.leases.get(state.lease) is state:
            del self.leases[state.lease]

    def track(self, granted: Granted, lane: str = "", priority: str = "interactive") -> LeaseState:
        """Record a grant; a reentrant grant of a lease already tracked shares its state.

        Sharing matters: events and the final release must reach every nesting level, so an
        inner ``with`` block neither hides a later revocation from the outer one nor ends it.
        """
        state = self.leases.get(granted.lease)
        if state is None:
            state = LeaseState(
                granted.lease,
                granted.path,
                granted.fence,
                granted.purpose,
                lane=lane,
                priority=priority,
                secret=granted.secret,
            )
            self.leases[granted.lease] = state
        state.holds += 1
        return state

    def untrack(self, state: LeaseState) -> None:
        """One level of ``state`` was released (or given up); the last one forgets it."""
        state.holds -= 1
        if state.holds > 0:
            return
        state.released = True
        self.direct.leases.pop(state.lease, None)
        if self.leases.get(state.lease) is state:
            del self.leases[state.lease]

    def abandoned(self, leases: list[str], direct: Sequence[LeaseState] = ()) -> None:
        """The service confirmed an ``abandon``: those leases are gone (``direct``: those of
        its direct channels, which may already be gone with their channel)."""
        for lease in leases:
            if (state := self.leases.pop(lease, None)) is not None:
                state.revoked = "abandoned"
        for state in direct:
            state.revoked = "abandoned"

    def _apply_event(self, event: Reply) -> None:
        """Apply an event (a message without id) to the lease it concerns."""
        match event:
            case Revoked() if event.reason == "shutdown" and self.reconnects:
                # A stopping service keeps the lease record: reclaim it from the next one.
                if (state := self.leases.get(event.lease)) is not None:
                    if state.secret is not None:
                        state.suspended = True
                    else:
                        del self.leases[event.lease]
                        state.revoked = event.reason
            case Revoked():
                self.direct.leases.pop(event.lease, None)
                if (state := self.leases.pop(event.lease, None)) is not None:
                    state.revoked = event.reason
            case AbortRequested():
                if (state := self.leases.get(event.lease)) is not None:
                    state.abort_requested = True
            case ExternalChange():
                if (state := self.leases.get(event.lease)) is not None:
                    state.external_changes.append(event.kind)
            case _:
                log.debug("ignored an event of type %s", event.type)

    def _revoke_all(self, reason: str, *, suspend: bool = False) -> None:
        """Every lease ends; with ``suspend``, those that can be reclaimed wait for it."""
        for lease, state in list(self.leases.items()):
            if suspend and state.secret is not None:
                state.suspended = True
                continue
            state.revoked = reason
            del self.leases[lease]
        self.orphaned.clear()  # revoked or suspended with the rest
        self._probe = None
