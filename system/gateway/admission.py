"""Who the gateway admits, and what a connection may cost before it is admitted. Pure.

The gateway (``sessionlane.system.gateway.gateway``) asks these questions; nothing here touches a
socket or a clock (times are passed in, in milliseconds):

* :class:`Policy` and :func:`hello_refusal`: at ``hello``, with a ``token_file`` the token
  decides; without one, the peer's uid (read once, at accept, by
  ``sessionlane.system.gateway.peercred``) must be the service's own, unless ``allow_other_users``.
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

import hmac
import sys
from dataclasses import dataclass, field

from sessionlane.actors.endpoint import AcceptBackoff

__all__ = [
    "MAX_HELLO_BYTES",
    "AcceptBackoff",
    "HelloDeadlines",
    "Policy",
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
    """From ``token_file``: when set, a hello must carry it, whoever the peer is."""
    allow_other_users: bool
    """Without a token, admit peers of any user (else only ``service_uid``'s)."""
    service_uid: int

    @property
    def by_peer(self) -> bool:
        """Whether the peer's uid decides (no token, other users not allowed)."""
        return self.token is None and not self.allow_other_users


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
        " from, so it would serve every local user: set token_file (clients present its"
        " content), or allow_other_users = true to admit every local user knowingly"
    )


def hello_refusal(policy: Policy, peer_uid: int | None, token: str | None) -> str | None:
    """Why a hello carrying ``token`` from a peer running as ``peer_uid`` is refused, or None.

    ``peer_uid`` None means the peer's user could not be told. The detail is what the
    ``unauthorized`` error says to the client: why, and what the operator can do.
    """
    if policy.token is not None:
        given = (token or "").encode()
        if hmac.compare_digest(given, policy.token.encode()):
            return None
        return "bad or no token"
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
