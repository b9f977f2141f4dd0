"""Who the gateway admits, and what a connection may cost before it is admitted. Pure.

The gateway (``sessionlane.system.gateway.gateway``) asks these questions; nothing here touches a
socket or a clock (times are passed in, in milliseconds):

* :class:`Policy` and :func:`hello_refusal`: at ``hello``, with a ``token_file`` the token
  proof decides (``sessionlane.messages.handshake``; a token sent in clear is refused); without
  one, the peer's uid (read once, at accept, by ``sessionlane.system.gateway.peercred``) must
  be the service's own, unless ``allow_other_users``.
* :class:`ProofDelays`: a wrong token proof pushes back when the next proof of the same peer
  (its uid, else its host) is checked, doubling up to 8 s: guessing is slowed per peer, in a
  table of bounded size.
  :func:`startup_refusal`: where the platform cannot tell who a peer is, a service without a
  token refuses to start.
* :func:`connection_cap`: ``max_connections``, lowered so the gateway's process always keeps
  descriptors for thespian and its channels under its ``RLIMIT_NOFILE``.
* :class:`HelloDeadlines`: connections that have not said hello, oldest first, so one sweep
  timer closes the late ones.
* :class:`AcceptBackoff` (from ``sessionlane.actors.endpoint``, where the acceptor uses it): after
  ``accept`` fails for want of descriptors, when to try again.
* :class:`RateLimit`: how often a warning about strangers may reach the log.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable
from dataclasses import dataclass, field

from sessionlane.actors.endpoint import AcceptBackoff

__all__ = [
    "CLEAR_TOKEN_REFUSAL",
    "MAX_HELLO_BYTES",
    "NO_PROOF_REFUSAL",
    "WRONG_PROOF_REFUSAL",
    "AcceptBackoff",
    "HelloDeadlines",
    "Policy",
    "ProofDelays",
    "RateLimit",
    "connection_cap",
    "hello_refusal",
    "startup_refusal",
]

MAX_HELLO_BYTES = 4 * 1024
"""The largest frame accepted before the hello: an unadmitted peer makes us buffer no more."""
_FD_RESERVE_MIN = 64
"""Descriptors always left to the gateway's process beyond its client connections: thespian's
own sockets (one per message in flight), the log, the channels to SessionFiles."""


@dataclass(frozen=True)
class Policy:
    """The gateway's admission rule, fixed at start."""

    token: str | None
    """From ``token_file``: when set, a client must prove it knows it, whoever the peer is."""
    allow_other_users: bool
    """Without a token, admit peers of any user (else only ``service_uid``'s)."""
    service_uid: int

    @property
    def by_peer(self) -> bool:
        """Whether the peer's uid decides (no token, other users not allowed)."""
        return self.token is None and not self.allow_other_users

    @property
    def reads_uid(self) -> bool:
        """Whether the peer's uid is read at accept: it decides, or (with a token) it keeps
        other users' unadmitted connections under the per-user cap."""
        return self.by_peer or self.token is not None

    def is_stranger(self, peer_uid: int | None) -> bool:
        """Whether an unadmitted connection from ``peer_uid`` falls under the strangers' cap.

        Without a token, every peer but the service's user (the uid check will refuse it).
        With one, a peer whose user is known and is not the service's: it may hold the
        token, but until it proved it, it must not crowd the service's own user out.
        """
        if self.by_peer:
            return peer_uid != self.service_uid
        return self.token is not None and peer_uid is not None and peer_uid != self.service_uid


def startup_refusal(
    policy: Policy, identifies_peers: bool, platform: str = sys.platform
) -> str | None:
    """Why a gateway with ``policy`` must not listen here, or None.

    ``identifies_peers``: whether this platform can tell a peer's uid
    (``sessionlane.system.gateway.peercred.identifies_peers``).
    """
    if not policy.by_peer or identifies_peers:
        return None
    return (
        f"on this platform ({platform}) the gateway cannot tell which user a connection comes"
        " from, so it would serve every local user: set token_file (clients prove they know its"
        " content), or allow_other_users = true to admit every local user knowingly"
    )


CLEAR_TOKEN_REFUSAL = (
    "the token was sent in clear; this service takes only a proof of it (hello with a nonce,"
    " then proof: docs/protocol.md): upgrade the client, and replace the token if it may"
    " have been seen"
)
NO_PROOF_REFUSAL = (
    "this service has a token_file: the client must prove the token (hello with a nonce, then"
    " proof); give the client the token"
)
WRONG_PROOF_REFUSAL = "wrong token proof: the client's token is not the service's"


def hello_refusal(
    policy: Policy, peer_uid: int | None, token: str | None, nonce: bytes | None = None
) -> str | None:
    """Why a hello (carrying ``token`` in clear, or ``nonce`` for the token proof) from a peer
    running as ``peer_uid`` is refused, or None.

    With a token, None means "challenge it": the proof that follows decides. ``peer_uid``
    None means the peer's user could not be told. The detail is what the ``unauthorized``
    error says to the client: why, and what the operator can do.
    """
    if policy.token is not None:
        if token is not None:
            return CLEAR_TOKEN_REFUSAL
        if nonce is None:
            return NO_PROOF_REFUSAL
        return None
    if policy.allow_other_users or peer_uid == policy.service_uid:
        return None
    remedy = "configure token_file or allow_other_users"
    if peer_uid is None:
        return (
            "the peer's user cannot be told (not a local connection, or it is gone);"
            f" only the service's user (uid {policy.service_uid}) is served; {remedy}"
        )
    return (
        f"peer runs as uid {peer_uid}, not the service's user (uid {policy.service_uid}); {remedy}"
    )


def connection_cap(max_connections: int, nofile_soft: int) -> int:
    """How many connections the gateway keeps open at most.

    ``max_connections`` unless the soft ``RLIMIT_NOFILE`` (``nofile_soft``; negative for
    unlimited) would not leave a quarter of itself (at least 64) to the rest of the process:
    past the limit, thespian could not even answer the supervisor's ping.
    """
    if nofile_soft < 0:
        return max_connections
    reserve = max(_FD_RESERVE_MIN, nofile_soft // 4)
    return max(1, min(max_connections, nofile_soft - reserve))


@dataclass
class HelloDeadlines:
    """Connections waiting for their hello, by deadline (accept order: the timeout is fixed)."""

    timeout_ms: float
    _due: dict[int, float] = field(default_factory=dict)  # connection id -> deadline

    def add(self, conn: int, now: float) -> None:
        self._due[conn] = now + self.timeout_ms

    def discard(self, conn: int) -> None:
        self._due.pop(conn, None)

    def expired(self, now: float) -> list[int]:
        """The connections past their deadline at ``now``, removed, oldest first."""
        late: list[int] = []
        for conn, due in self._due.items():
            if due > now:
                break
            late.append(conn)
        for conn in late:
            del self._due[conn]
        return late

    def next_due(self) -> float | None:
        """The earliest deadline still pending."""
        return next(iter(self._due.values()), None)

    def __len__(self) -> int:
        return len(self._due)


@dataclass
class RateLimit:
    """At most one event per ``period_ms``; the others are counted for the next one to say."""

    period_ms: float = 10_000
    _next: float = float("-inf")
    _suppressed: int = 0

    def allow(self, now: float) -> int | None:
        """None if the event at ``now`` is suppressed; else how many were since the last one."""
        if now < self._next:
            self._suppressed += 1
            return None
        self._next = now + self.period_ms
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


@dataclass
class _Strikes:
    """One peer's record of wrong proofs."""

    failures: int = 0
    """Wrong proofs since the last right one (or since it was forgotten)."""
    pending: int = 0
    """Proofs waiting for their turn to be checked."""
    next_at: float = 0.0
    """When the next proof of this peer may be checked."""


@dataclass
class ProofDelays:
    """When each peer's next token proof may be checked; wrong proofs push it back.

    A peer is what the gateway can tell apart: a uid where it is known, else a host. Its
    first proof is checked at once; after ``n`` wrong ones, each next proof waits
    ``base_ms * 2**(n-1)`` (at most ``max_ms``) after the one before it, whether it turns out
    right or wrong, so sending many proofs at once does not guess faster. A right proof
    forgets the peer; so does ``forget_ms`` without a proof. The table keeps the
    ``max_peers`` most recently active peers (memory stays bounded whatever the peers).
    A proof that would wait more than ``max_wait_ms`` is refused at once, unchecked.
    """

    base_ms: float = 250.0
    max_ms: float = 8_000.0
    forget_ms: float = 60_000.0
    max_wait_ms: float = 30_000.0
    max_peers: int = 4_096
    _peers: dict[Hashable, _Strikes] = field(default_factory=dict)

    def delay(self, strikes: int) -> float:
        """The wait after a proof, for a peer with ``strikes`` wrong or pending proofs."""
        if strikes <= 0:
            return 0.0
        return float(min(self.max_ms, self.base_ms * 2 ** min(strikes - 1, 32)))

    def slot(self, peer: Hashable, now: float) -> float | None:
        """When a proof from ``peer`` that arrived at ``now`` may be checked (the turn is
        taken); None if it would wait too long (refuse it at once)."""
        strikes = self._peers.pop(peer, None)
        if strikes is None or (strikes.pending == 0 and now - strikes.next_at > self.forget_ms):
            strikes = _Strikes(next_at=now)
        at = max(now, strikes.next_at)
        self._peers[peer] = strikes  # most recently active last
        if at - now > self.max_wait_ms:
            return None
        # Without wrong proofs, a burst of proofs (a pool connecting at once) is not spaced.
        spacing = self.delay(strikes.failures + strikes.pending) if strikes.failures else 0.0
        strikes.next_at = at + spacing
        strikes.pending += 1
        while len(self._peers) > self.max_peers:
            del self._peers[next(iter(self._peers))]
        return at

    def checked(self, peer: Hashable, right: bool, now: float) -> None:
        """A proof of ``peer`` whose turn came was ``right`` or not (``now``: when)."""
        strikes = self._peers.get(peer)
        if strikes is None:  # forgotten meanwhile (the table was full)
            if right:
                return
            strikes = self._peers[peer] = _Strikes(next_at=now)
            strikes.pending = 1
        strikes.pending = max(0, strikes.pending - 1)
        if right:
            strikes.failures = 0
            if strikes.pending == 0:
                del self._peers[peer]
            return
        strikes.failures += 1
        strikes.next_at = max(strikes.next_at, now + self.delay(strikes.failures))

    def abandoned(self, peer: Hashable) -> None:
        """A proof waiting for its turn will not be checked (its connection closed)."""
        strikes = self._peers.get(peer)
        if strikes is not None:
            strikes.pending = max(0, strikes.pending - 1)

    def __len__(self) -> int:
        return len(self._peers)
