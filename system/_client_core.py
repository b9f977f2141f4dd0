"""The I/O-free part of the clients: addresses, request ids, reply routing, lease state.

The sync and asyncio clients wrap this core in their own I/O; both behave the same because
routing, error mapping and lease bookkeeping live here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from messages.errors import LeaseRevoked, SessionLaneError, StaleFence, Unavailable, error_for
from messages.wire import (
    AbortRequested,
    Acquire,
    Appended,
    Error,
    ExternalChange,
    ExternalChangeKind,
    OnContention,
    Priority,
    Purpose,
    Reply,
    Revoked,
)

__all__ = [
    "AppendResult",
    "ClientCore",
    "LeaseState",
    "LeaseView",
    "acquire_request",
    "acquire_wait",
    "anchor",
    "append_result",
    "parse_address",
    "raise_if_error",
]

DEFAULT_ADDRESS = "tcp://127.0.0.1:7420"


class AppendResult(NamedTuple):
    """Where an append landed: byte offset of its first line, lines written, the fence."""

    offset: int
    lines: int
    fence: int


def parse_address(address: str) -> tuple[str, Any]:
    """``tcp://HOST:PORT`` -> ("tcp", (host, port)); ``unix:///path`` -> ("unix", path)."""
    if address.startswith("unix://"):
        return "unix", address[len("unix://") :]
    if address.startswith("tcp://"):
        rest = address[len("tcp://") :]
        host, _, port = rest.rpartition(":")
        return "tcp", (host.strip("[]") or "127.0.0.1", int(port))
    raise ValueError(f"not a sessionlane address: {address!r} (tcp://HOST:PORT or unix:///path)")


def anchor(path: str) -> str:
    """Relative paths are the caller's: anchor them at the caller's directory.

    No lexical ``..`` folding: the service resolves symlinks first, as the OS would.
    """
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def acquire_request(
    lane: str,
    priority: Priority,
    path: str,
    purpose: Purpose,
    *,
    wait_timeout: float | None,
    max_hold: float | None,
    on_contention: OnContention,
) -> Acquire:
    """The ``acquire`` request of ``Lane.acquire`` (``path`` already anchored)."""
    return Acquire(
        lane=lane,
        path=path,
        purpose=purpose,
        priority=priority,
        wait_timeout_ms=None if wait_timeout is None else int(wait_timeout * 1000),
        max_hold_ms=None if max_hold is None else max(1, int(max_hold * 1000)),
        on_contention=on_contention,
    )


def acquire_wait(wait_timeout: float | None) -> float:
    """How long an acquire may wait for its grant (no wait timeout: a day)."""
    return wait_timeout if wait_timeout is not None else 24 * 3600.0


def append_result(reply: Reply) -> AppendResult:
    assert isinstance(reply, Appended), reply
    return AppendResult(reply.offset, reply.lines, reply.fence)


def raise_if_error(reply: Reply, path: str | None = None) -> Reply:
    """Turn an ``error`` reply into its exception; return anything else."""
    if isinstance(reply, Error):
        raise error_for(reply.code, reply.detail, reply.path or path)
    return reply


@dataclass
class LeaseState:
    """What the client knows about one lease, updated by events as they arrive."""

    lease: str
    path: str
    fence: int
    purpose: str
    abort_requested: bool = False
    abort_grace_ms: int | None = None
    revoked: str | None = None
    """The revocation reason (``max_hold``, ``recovery``, ``connection_lost``, ...) or None."""
    external_changes: list[ExternalChangeKind] = field(default_factory=list)
    released: bool = False
    """Every level of the lease was released."""
    holds: int = 0
    """Nesting depth: a reentrant grant of a held lease shares this state and adds one."""

    def check_usable(self) -> None:
        if self.revoked is not None:
            raise LeaseRevoked(
                f"lease {self.lease} was revoked ({self.revoked}); nothing was written",
                path=self.path,
            )
        if self.released:
            raise LeaseRevoked(f"lease {self.lease} was released", path=self.path)


class ClientCore:
    """Request ids, pending requests and leases of one connection."""

    def __init__(self) -> None:
        self._next = 0
        self.leases: dict[str, LeaseState] = {}
        self.events: list[Reply] = []

    def next_id(self) -> int:
        self._next += 1
        return self._next

    def on_event(self, event: Reply) -> None:
        """Apply an event (a message without id) to the lease it concerns."""
        self.events.append(event)
        del self.events[:-256]
        match event:
            case Revoked():
                state = self.leases.pop(event.lease, None)
                if state is not None:
                    state.revoked = event.reason
            case AbortRequested():
                if (state := self.leases.get(event.lease)) is not None:
                    state.abort_requested = True
                    state.abort_grace_ms = event.grace_ms
            case ExternalChange():
                if (state := self.leases.get(event.lease)) is not None:
                    state.external_changes.append(event.kind)

    def lost(self, reason: str = "connection_lost") -> None:
        """The connection is gone: every lease on it is lost (the server abandons them)."""
        for state in self.leases.values():
            state.revoked = reason
        self.leases.clear()

    def track(self, state: LeaseState) -> LeaseState:
        """Record a grant; a reentrant grant of a lease already tracked shares its state.

        Sharing matters: events and the final release must reach every nesting level, so an
        inner ``with`` block neither hides a later revocation from the outer one nor ends it.
        """
        known = self.leases.get(state.lease)
        if known is not None:
            known.holds += 1
            return known
        state.holds = 1
        self.leases[state.lease] = state
        return state

    def untrack(self, state: LeaseState) -> None:
        """One level of ``state`` was released (or given up); the last one forgets it."""
        state.holds -= 1
        if state.holds > 0:
            return
        state.released = True
        if self.leases.get(state.lease) is state:
            del self.leases[state.lease]

    def forget(self, lease: str) -> None:
        self.leases.pop(lease, None)

    def abandoned(self, leases: list[str]) -> None:
        """The service confirmed an ``abandon``: those leases are gone."""
        for lease in leases:
            state = self.leases.pop(lease, None)
            if state is not None:
                state.revoked = "abandoned"


class LeaseView:
    """What both clients' ``Lease`` objects share: state access, usability and reply checks.

    One object per grant; a reentrant grant gets its own view of the shared state, so each
    ``with`` level releases exactly once.
    """

    def __init__(self, state: LeaseState, lane: str):
        self.state = state
        self.lane = lane
        self.level_released = False
        """This view's level was released (other levels of a nested lease may still hold)."""

    @property
    def id(self) -> str:
        """The lease id."""
        return self.state.lease

    @property
    def fence(self) -> int:
        """The fence every write carries."""
        return self.state.fence

    @property
    def path(self) -> str:
        """The canonical path."""
        return self.state.path

    @property
    def purpose(self) -> str:
        return self.state.purpose

    @property
    def abort_requested(self) -> bool:
        """A recovery asked this holder to finish or release."""
        return self.state.abort_requested

    @property
    def revoked(self) -> str | None:
        """The revocation reason, or None while the lease is held."""
        return self.state.revoked

    @property
    def external_changes(self) -> list[ExternalChangeKind]:
        return list(self.state.external_changes)

    def check_usable(self) -> None:
        """Raise ``LeaseRevoked`` (nothing sent) if this lease may no longer write."""
        if self.level_released:
            raise LeaseRevoked(f"lease {self.id} was released", path=self.path)
        self.state.check_usable()

    def checked(self, reply: Reply) -> Reply:
        """The reply to a write or release of this lease, or its exception."""
        try:
            return raise_if_error(reply, self.path)
        except StaleFence:
            if self.state.revoked is None:
                self.state.revoked = "stale_fence"
            raise

    def unreachable(self, exc: Unavailable) -> SessionLaneError:
        """The exception for a request of this lease that got no reply.

        A lost connection has already revoked the lease (its lanes die with it): that is a
        ``LeaseRevoked``; anything else (a reply that is only late) stays ``Unavailable``.
        """
        if self.state.revoked is not None:
            return LeaseRevoked(f"lease {self.id} lost: {exc.detail}", path=self.path)
        return exc

    def __repr__(self) -> str:
        return f"Lease({self.id!r}, path={self.path!r}, fence={self.fence}, purpose={self.purpose})"


def client_name() -> str:
    return f"python:{os.getpid()}"


def unavailable(detail: str) -> SessionLaneError:
    return Unavailable(detail)
