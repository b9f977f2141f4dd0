"""The I/O-free part of the clients: addresses, request ids, reply routing, lease state.

The sync and asyncio clients wrap this core in their own I/O; both behave the same because
routing, error mapping and lease bookkeeping live here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from messages.errors import LeaseRevoked, SessionLaneError, Unavailable, error_for
from messages.wire import (
    AbortRequested,
    Error,
    ExternalChange,
    ExternalChangeKind,
    Reply,
    Revoked,
)

__all__ = ["AppendResult", "ClientCore", "LeaseState", "parse_address", "raise_if_error"]

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

    def track(self, state: LeaseState) -> None:
        self.leases[state.lease] = state

    def forget(self, lease: str) -> None:
        self.leases.pop(lease, None)


def client_name() -> str:
    return f"python:{os.getpid()}"


def unavailable(detail: str) -> SessionLaneError:
    return Unavailable(detail)
