"""The I/O-free part of the clients: addresses, request ids, reply routing, lease state.

The sync and asyncio clients wrap this core in their own I/O; both behave the same because
routing, error mapping and lease bookkeeping live here.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from messages.codec import HEADER
from messages.errors import (
    InvalidRecord,
    LeaseRevoked,
    SessionLaneError,
    StaleFence,
    TooLarge,
    Unavailable,
    error_for,
)
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
    Record,
    Reply,
    Revoked,
)
from system.config import ConfigError, parse_listen

__all__ = [
    "AppendResult",
    "ClientCore",
    "LeaseState",
    "LeaseView",
    "acquire_request",
    "acquire_wait",
    "anchor",
    "append_result",
    "check_frame",
    "check_records",
    "default_address",
    "library_logger",
    "parse_address",
    "raise_if_error",
    "token_text",
]

DEFAULT_ADDRESS = "tcp://127.0.0.1:7420"
ADDRESS_ENV = "SESSIONLANE_LISTEN"
"""The variable the service reads its ``listen`` from; a client without an address uses it too."""
MAX_RECORD_BYTES = 1_048_576
"""The service's default ``max_record_bytes``: the clients' default check before sending."""
MAX_FRAME_BYTES = 8_388_608
"""The service's default ``max_frame_bytes``: a bigger frame would make it close the connection."""
MAX_RECORD_DEPTH = 100
"""The gateway's nesting limit for records (``system.gateway.gateway._MAX_RECORD_DEPTH``)."""
_MSGPACK_INTS = (-(2**63), 2**64 - 1)


class AppendResult(NamedTuple):
    """Where an append landed: byte offset of its first line, lines written, the fence."""

    offset: int
    lines: int
    fence: int


def library_logger(name: str) -> logging.Logger:
    """The module logger of a client: silent unless the host application configures logging.

    A library must not write to its host's stderr: without a handler of the host's, Python's
    last-resort handler would print every warning there. The ``NullHandler`` stops that and
    nothing else (records still propagate to whatever handlers the host installs).
    """
    logger = logging.getLogger(name)
    logger.addHandler(logging.NullHandler())
    return logger


def default_address() -> str:
    """``$SESSIONLANE_LISTEN`` (what a service in the same environment listens on), else
    ``tcp://127.0.0.1:7420``."""
    return os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def parse_address(address: str) -> tuple[str, Any]:
    """``HOST:PORT`` or ``tcp://HOST:PORT`` -> ("tcp", (host, port)); ``unix:///path`` ->
    ("unix", path). The service's own parser (``system.config.parse_listen``): one syntax.

    Raises ``ValueError`` naming the accepted forms.
    """
    try:
        parsed = parse_listen(address)
    except ConfigError as exc:
        raise ValueError(f"not a sessionlane address: {exc.message}") from None
    if parsed[0] == "unix":
        return "unix", parsed[1]
    return "tcp", (parsed[1], parsed[2])


def token_text(token: str | None) -> str | None:
    """The token as the service compares it: surrounding whitespace (a file's trailing
    newline) is not part of it, as the service strips its own ``token_file``."""
    return None if token is None else token.strip()


def check_records(
    records: Sequence[Any], *, max_record_bytes: int | None, allow_empty: bool = False
) -> list[Record]:
    """``records`` as a list, or ``InvalidRecord`` before anything is sent.

    A record must be a JSON object the service can store as one strict JSONL line: string
    keys; values that are objects, arrays (lists or tuples), strings, finite numbers
    (integers that msgpack carries), booleans or null; nested at most
    :data:`MAX_RECORD_DEPTH` levels; at most ``max_record_bytes`` once encoded (``None``:
    leave the size to the service). Refusing here rather than at the service keeps msgpack's
    and pydantic's own exceptions out of the caller's way and the connection untouched.
    """
    if not records and not allow_empty:
        raise InvalidRecord("empty batch: at least one record is required")
    checked: list[Record] = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InvalidRecord(f"record {index}: not a JSON object (got {type(record).__name__})")
        if (why := _unstorable(record)) is not None:
            raise InvalidRecord(f"record {index}: {why}")
        try:
            text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            size = len(text.encode("utf-8")) + 1
        except (TypeError, ValueError) as exc:  # e.g. a lone surrogate in a string
            raise InvalidRecord(f"record {index}: not serialisable as JSON: {exc}") from None
        if max_record_bytes is not None and size > max_record_bytes:
            raise InvalidRecord(
                f"record {index}: {size} bytes encoded, over max_record_bytes ({max_record_bytes})"
            )
        checked.append(record)
    return checked


def _unstorable(record: dict[str, Any]) -> str | None:
    """Why ``record`` is no strict JSON object, or None. Iterative: depth is bounded anyway."""
    stack: list[tuple[Any, int, str]] = [(record, 1, "")]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_RECORD_DEPTH:
            return f"nested deeper than {MAX_RECORD_DEPTH} levels"
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    return f"key {key!r} at {where or 'top level'} is not a string"
                stack.append((item, depth + 1, f"{where}.{key}" if where else key))
        elif isinstance(value, list | tuple):
            stack.extend((item, depth + 1, f"{where}[{i}]") for i, item in enumerate(value))
        elif isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        elif isinstance(value, int):
            if not _MSGPACK_INTS[0] <= value <= _MSGPACK_INTS[1]:
                return f"integer at {where} is out of the 64-bit range"
        elif isinstance(value, float):
            if not math.isfinite(value):
                return f"{value} at {where} is not a JSON number"
        else:
            return f"{type(value).__name__} at {where} is not a JSON value"
    return None


def check_frame(data: bytes, max_frame_bytes: int | None) -> bytes:
    """``data`` (a whole frame), or ``TooLarge`` if the service would refuse it.

    The service answers an oversized frame by closing the connection; refused here, nothing
    is sent and the connection and its leases stay as they were.
    """
    body = len(data) - HEADER.size
    if max_frame_bytes is not None and body > max_frame_bytes:
        raise TooLarge(
            f"a frame of {body} bytes exceeds max_frame_bytes ({max_frame_bytes}); nothing sent"
        )
    return data


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
