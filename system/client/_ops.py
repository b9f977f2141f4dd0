"""The client's operations, written once for both surfaces as generators of calls.

Each public method (``Lane.acquire``, ``Lease.append``, ...) is one generator here: it checks
its arguments, builds its request, ``yield``s a :class:`Call` and receives the reply (or, thrown
in, the ``SessionLaneError`` of a call that got none), and returns the method's result or
raises its error. It updates the lease bookkeeping of the ``ClientCore`` and never does I/O:
the sync surface drives it with blocking calls, the asyncio one with awaited calls, and the
unit tests with replies of their own. A surface must close a generator it stops driving
(``generator.close()``) so that its ``finally`` clauses run at once.
"""

from __future__ import annotations

import secrets
from collections.abc import Generator, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from sessionlane.messages.errors import (
    LeaseRevoked,
    LeaseTimeout,
    NotHolder,
    SessionLaneError,
    StaleFence,
    Unavailable,
    UnknownOutcome,
    error_for,
)
from sessionlane.messages.wire import (
    Abandon,
    Abandoned,
    Acquire,
    Append,
    Appended,
    Durability,
    Error,
    ExternalChangeKind,
    Granted,
    OnContention,
    Priority,
    Purpose,
    ReclaimTicket,
    Recover,
    Release,
    Reply,
    Rewrite,
    Rewritten,
    Skipped,
    Status,
    StatusReply,
)
from sessionlane.system.client._checks import (
    check_abandon,
    check_acquire,
    check_durability,
    check_path,
    check_recover,
)
from sessionlane.system.client._core import (
    AppendResult,
    ClientCore,
    ConnectionLost,
    LeaseState,
    OutOfBudget,
    anchor,
    log,
)
from sessionlane.system.client._records import check_records

__all__ = [
    "Batch",
    "Call",
    "Finished",
    "LeaseView",
    "Op",
    "abandon",
    "acquire",
    "advance",
    "lane_append",
    "lease_append",
    "raise_if_error",
    "recover",
    "release",
    "released_by_append",
    "revive",
    "revive_all",
    "rewrite",
    "status",
]

R = TypeVar("R")


class Call(NamedTuple):
    """Send ``request`` and return its final reply (or raise the ``SessionLaneError`` of a call
    that got none: ``Unavailable``, ``TooLarge``). (Named tuples, not frozen dataclasses, for
    the records made on every call: a third of the cost to build.)"""

    request: Any
    timeout: float | None = None
    """How long the request may wait on the service (``None``: the client's ``timeout``)."""
    reconnect: bool = True
    """Reconnect first if the connection is down (never for a lease's own requests)."""
    after: float = 0.0
    """Seconds to let pass before sending (a retry while the service is stopping)."""
    deadline: float | None = None
    """When (``ClientCore.clock`` time) the caller's own budget ends: a reconnect for this call
    tries no longer (``OutOfBudget``). None: ``reconnect_for`` alone bounds it."""


class Batch(NamedTuple):
    """Send ``requests`` in order on the connection, at most ``window`` unanswered at a time,
    and return the outcomes of those sent, in order (a final reply, or the
    ``SessionLaneError`` of one that got none). After the first outcome that is an error,
    nothing more is sent; the ones already sent are still awaited. A surface drives it with a
    ``Pipe``."""

    requests: list[Any]
    window: int


RETRY_AFTER_S = 0.2
"""How long a request refused ``shutting_down`` waits before it is sent again (to the next
service, once this one's connection is gone)."""
MAX_REVIVALS = 8
"""How many connections one operation tries in turn before it gives up on a restart."""


Op = Generator[Call, Reply, R]
"""An operation: yields calls, receives their replies, returns its result."""

Core = ClientCore[Any, Any]


def raise_if_error(reply: Reply, path: str | None = None) -> Reply:
    """Turn an ``error`` reply into its exception; return anything else."""
    if isinstance(reply, Error):
        raise error_for(reply.code, reply.detail, reply.path or path)
    return reply


# Lanes and the connection ------------------------------------------------------------------


def acquire(
    core: Core,
    lane: str,
    priority: Priority,
    path: str,
    purpose: Purpose,
    *,
    wait_timeout: float | None,
    max_hold: float | None,
    on_contention: OnContention,
) -> Op[LeaseState | None]:
    """``Lane.acquire``: the granted lease's state (tracked), or None when skipped."""
    check_acquire(path, purpose, wait_timeout, max_hold, on_contention)
    path = anchor(path)
    request = Acquire(
        lane=lane,
        path=path,
        purpose=purpose,
        priority=priority,
        wait_timeout_ms=None if wait_timeout is None else int(wait_timeout * 1000),
        max_hold_ms=None if max_hold is None else max(1, int(max_hold * 1000)),
        on_contention=on_contention,
    )
    # No wait timeout: the service's own applies; wait for it up to a day.
    reply = yield from _ride_out(core, request, wait_timeout or 24 * 3600.0, wait_timeout)
    reply = raise_if_error(reply, path)
    if isinstance(reply, Skipped):
        return None
    assert isinstance(reply, Granted), reply
    return core.track(reply, lane, priority)


def _ride_out(
    core: Core, request: Acquire, timeout: float, wait_timeout: float | None
) -> Op[Reply]:
    """The final reply to ``request``; with ``reconnect_for``, a restart of the service (the
    connection lost, or ``shutting_down``) sends it again to the next one, saying how long it
    waited so far so that it keeps its place, with what is left of its wait timeout.

    The wait timeout bounds the ride-out too: a service still away when it ends raises
    ``LeaseTimeout`` (its cause the ``Unavailable``), however long ``reconnect_for`` is.
    Bounded: at most ``MAX_REVIVALS`` lost connections, and ``shutting_down`` answers for at
    most ``reconnect_for`` seconds."""
    started = core.clock()
    deadline = None if wait_timeout is None else started + wait_timeout
    revivals = 0
    after = 0.0
    while True:
        try:
            reply = yield Call(request, timeout=timeout, after=after, deadline=deadline)
        except Unavailable as exc:
            spent = deadline is not None and core.clock() >= deadline
            if core.reconnects and (isinstance(exc, OutOfBudget) or spent):
                raise LeaseTimeout(
                    f"not granted within {wait_timeout:.1f} s: the service was away ({exc.detail})",
                    path=request.path,
                ) from exc
            revivals += 1
            if not core.reconnects or revivals > MAX_REVIVALS or _unreachable(exc):
                raise
            after = 0.0
        else:
            stopping = isinstance(reply, Error) and reply.code == "shutting_down"
            late = core.clock() - started > core.settings.reconnect_for
            if not stopping or not core.reconnects or late:
                return reply
            after = RETRY_AFTER_S  # the stopping service answers this until it is gone
        waited = core.clock() - started
        update: dict[str, Any] = {"waited_ms": int(waited * 1000)}
        if wait_timeout is not None:
            timeout = wait_timeout - waited
            if timeout <= 0:
                raise LeaseTimeout(
                    f"not granted within {wait_timeout:.1f} s (the service restarted meanwhile)",
                    path=request.path,
                )
            update["wait_timeout_ms"] = int(timeout * 1000)
        request = request.model_copy(update=update)


def _unreachable(exc: Unavailable) -> bool:
    """The reconnect itself failed, after retrying for ``reconnect_for``: give up."""
    return exc.detail.startswith("cannot reach")


def lane_append(
    core: Core, lane: str, path: str, records: Sequence[Any], durability: Durability | None
) -> Op[AppendResult]:
    """``Lane.append``: a short write queued like a ``write`` lease."""
    check_path(path)
    check_durability(durability)
    path = anchor(path)
    checked = check_records(records, max_record_bytes=core.settings.max_record_bytes)
    request = Append(lane=lane, path=path, records=checked, durability=durability)
    try:
        reply = yield Call(request)
    except ConnectionLost as exc:
        raise _unknown(request, exc, path, None) from exc
    return _appended(raise_if_error(reply, path))


def _unknown(
    request: Append | Rewrite, exc: ConnectionLost, path: str, reason: str | None
) -> UnknownOutcome:
    """A write whose connection ended after it was sent: it may or may not be in the file."""
    detail = f"{exc.detail}: the {request.type} may or may not be in the file, read it to know"
    return UnknownOutcome(detail, path=path, reason=reason)


def abandon(core: Core, lane: str, path: str | None, reason: str | None) -> Op[list[str]]:
    """``Lane.abandon``: the ids of the leases the service dropped (now revoked here)."""
    check_abandon(path, reason)
    request = Abandon(lane=lane, path=anchor(path) if path else None, reason=reason)
    # The file drops the lane's direct channels with it, and their leases: those are its own
    # lanes' (docs/direct-channel.md), not in its answer.
    direct = core.direct_held(lane, request.path)
    reply = raise_if_error((yield Call(request)), path)
    assert isinstance(reply, Abandoned), reply
    leases = sorted(set(reply.leases) | {state.lease for state in direct})
    core.abandoned(leases, direct)
    return leases


def recover(core: Core, path: str, reason: str, grace: float, lane: str) -> Op[LeaseState]:
    """``SessionLane.recover``: the recovery lease's state (tracked)."""
    check_recover(path, reason, grace, lane)
    path = anchor(path)
    request = Recover(lane=lane, path=path, reason=reason, grace_ms=int(grace * 1000))
    timeout = grace + core.settings.timeout
    reply = raise_if_error((yield Call(request, timeout=timeout)), path)
    assert isinstance(reply, Granted), reply
    return core.track(reply)


def status(path: str | None) -> Op[StatusReply]:
    """``SessionLane.status``."""
    reply = raise_if_error((yield Call(Status(path=anchor(path) if path else None))), path)
    assert isinstance(reply, StatusReply), reply
    return reply


def _appended(reply: Reply) -> AppendResult:
    assert isinstance(reply, Appended), reply
    return AppendResult(reply.offset, reply.lines, reply.fence)


# Leases ------------------------------------------------------------------------------------


class LeaseView:
    """What both surfaces' ``Lease`` objects are: one level of a granted lease.

    One object per grant; a reentrant grant gets its own view of the shared state, so each
    ``with`` level releases exactly once. Events update the state as they arrive.
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
            raise LeaseRevoked(f"lease {self.id} was released", path=self.path, reason="released")
        self.state.check_usable()

    def __repr__(self) -> str:
        return f"Lease({self.id!r}, path={self.path!r}, fence={self.fence}, purpose={self.purpose})"


def lease_append(
    core: Core,
    lease: LeaseView,
    records: Sequence[Any],
    durability: Durability | None,
    release: bool = False,
) -> Op[AppendResult]:
    """``Lease.append``: all or nothing, under the lease's fence. ``release``: the service
    releases this level of the lease once the records are durable (append and release); it
    then counts as released here. Refused or failed, the lease is still held."""
    check_durability(durability)
    if not isinstance(release, bool):
        raise TypeError(f"release must be a bool, got {release!r}")
    lease.check_usable()
    checked = check_records(records, max_record_bytes=core.settings.max_record_bytes)
    request = Append(
        lease=lease.id,
        fence=lease.fence,
        records=checked,
        durability=durability,
        aid=secrets.token_hex(8),  # resent after a restart, it is not written twice
        release=release or None,
    )
    result = _appended((yield from _lease_call(core, lease, request)))
    if release:
        released_by_append(core, lease)
    return result


def released_by_append(core: Core, lease: LeaseView) -> None:
    """The service released this level of ``lease`` with an append (``Append.release``)."""
    lease.level_released = True
    core.untrack(lease.state)


def rewrite(core: Core, lease: LeaseView, records: Sequence[Any]) -> Op[int]:
    """``Lease.rewrite``: the line count of the rewritten file."""
    lease.check_usable()
    checked = check_records(
        records, max_record_bytes=core.settings.max_record_bytes, allow_empty=True
    )
    reply = yield from _lease_call(
        core, lease, Rewrite(lease=lease.id, fence=lease.fence, records=checked)
    )
    assert isinstance(reply, Rewritten), reply
    return reply.lines


def release(core: Core, lease: LeaseView, quiet: bool) -> Op[None]:
    """``Lease.release``: one level, once. ``quiet``: a lease already gone is no error."""
    if lease.level_released:
        return
    try:
        if quiet and lease.state.revoked is not None:
            return
        lease.check_usable()
        yield from _lease_call(core, lease, Release(lease=lease.id))
    except (NotHolder, LeaseRevoked, Unavailable):
        if not quiet:
            raise
    finally:
        lease.level_released = True
        core.untrack(lease.state)


def _lease_call(core: Core, lease: LeaseView, request: Any) -> Op[Reply]:
    """The reply to a request of ``lease``, or its error.

    No reply because the connection was lost: the lease went with it (``LeaseRevoked``; for a
    write, ``UnknownOutcome``: it may be in the file), unless it is suspended
    (``reconnect_for``): then it is reclaimed from the restarted service and the request sent
    again if that cannot write twice (an append with its ``aid``, a release). A reclaim that
    fails (refused, or the service not back within the one ride-out window) ends it with
    ``LeaseRevoked`` (``restart``), or ``UnknownOutcome`` for a write already sent once;
    a reply that is only late stays ``Unavailable``. A ``stale_fence`` answer means the lease is
    gone even if its ``revoked`` event is still on the way.
    """
    resendable = isinstance(request, Release) or getattr(request, "aid", None) is not None
    sent: ConnectionLost | None = None  # a send of this write whose answer was lost
    windows = core.connect_failures  # one more by the end: the service did not come back
    for attempt in range(MAX_REVIVALS + 1):
        if lease.state.suspended:
            try:
                yield from revive(core, lease.state)
                lease.check_usable()  # the reclaim another call waited for gave up
            except LeaseRevoked as revoked:
                away = isinstance(revoked.__cause__, Unavailable) or (
                    core.connect_failures != windows
                )
                if getattr(request, "release", None) and not away:
                    # Refused by a live service: an append that releases may have done so
                    # before the restart, and the lease record then answers it as written
                    # and released (anything else: an error). A service still away after
                    # the window is not asked again (one window per loss).
                    reply = yield Call(request)
                    if isinstance(reply, Error) and reply.code == "stale_fence":
                        # Not "not written": the record keeps only the file's last appends
                        # that released, and the next holder may have released since.
                        if sent is not None:
                            raise _unknown(request, sent, lease.path, revoked.reason) from None
                        raise revoked from None
                    return raise_if_error(reply, lease.path)
                if sent is not None and isinstance(request, Append | Rewrite):
                    raise _unknown(request, sent, lease.path, revoked.reason) from revoked
                raise
        try:
            reply = yield Call(request, reconnect=False)
        except Unavailable as exc:
            if lease.state.suspended and resendable and attempt < MAX_REVIVALS:
                if isinstance(exc, ConnectionLost):
                    sent = exc
                continue  # the service restarted: take the lease back, then send again
            # Its direct channel ended and this request could not be answered either: no
            # need to wait for the gateway's word (``ClientCore.probe``).
            core.settle_orphan(lease.id, "connection_lost")
            if isinstance(exc, ConnectionLost) and isinstance(request, Append | Rewrite):
                reason = lease.state.revoked or "connection_lost"
                raise _unknown(request, exc, lease.path, reason) from exc
            if lease.state.revoked is not None or lease.state.suspended:
                reason = lease.state.revoked or "connection_lost"
                raise LeaseRevoked(
                    f"lease {lease.id} lost: {exc.detail}", path=lease.path, reason=reason
                ) from exc
            raise
        break
    try:
        return raise_if_error(reply, lease.path)
    except StaleFence:
        if lease.state.revoked is None:
            lease.state.revoked = "stale_fence"
        raise


def revive(core: Core, state: LeaseState) -> Op[None]:
    """Take a suspended lease back from the restarted service: the same lease and fence, or
    ``LeaseRevoked`` (reason ``restart``) when it is refused or the service is not back in
    time. Safe to run twice at once: the service grants a second reclaim of a lease again.
    One ride-out window in all: a reclaim that waited for another call's reconnect shares
    its failure (``ClientCore.connect_plan``), which has already revoked the lease."""
    assert state.secret is not None
    ticket = ReclaimTicket(lease=state.lease, fence=state.fence, secret=state.secret)
    request = Acquire(
        lane=state.lane,
        path=state.path,
        purpose=state.purpose,  # type: ignore[arg-type]
        priority=state.priority,  # type: ignore[arg-type]
        reclaim=ticket,
    )
    after = 0.0
    for _ in range(MAX_REVIVALS + 1):
        if not state.suspended:
            return
        try:
            reply = yield Call(request, after=after)
        except Unavailable as exc:
            if _unreachable(exc):
                core.not_reclaimed(state)
                raise LeaseRevoked(
                    f"lease {state.lease} lost: {exc.detail}", path=state.path, reason="restart"
                ) from exc
            continue  # the new connection went too: once more
        if isinstance(reply, Granted):
            core.reclaimed(state, reply)
            return
        assert isinstance(reply, Error), reply
        if reply.code == "shutting_down":
            after = RETRY_AFTER_S  # still the stopping service: ask the next one
            continue
        core.not_reclaimed(state)
        raise LeaseRevoked(
            f"lease {state.lease} not reclaimed: {reply.detail}", path=state.path, reason="restart"
        )
    core.not_reclaimed(state)
    raise LeaseRevoked(f"lease {state.lease} not reclaimed", path=state.path, reason="restart")


def revive_all(core: Core) -> Op[None]:
    """Reclaim every suspended lease (a surface runs this as soon as a connection is lost,
    so a holder that is waiting on its model does not miss the grace)."""
    for state in core.suspended():
        try:
            yield from revive(core, state)
        except LeaseRevoked as exc:  # its holder learns it at its next call (``revoked``)
            log.warning("sessionlane %s: %s", core.settings.address, exc.detail)


class Finished(NamedTuple, Generic[R]):
    """An operation's result."""

    value: R


def advance(op: Generator[Call | Batch, Any, R], outcome: Any) -> Call | Batch | Finished[R]:
    """Resume ``op`` with the outcome of its last call (None: start it): its next call, or
    its result. Raises what ``op`` raises."""
    try:
        if outcome is None:
            return next(op)
        if isinstance(outcome, SessionLaneError):
            return op.throw(outcome)
        return op.send(outcome)
    except StopIteration as stop:
        return Finished(stop.value)
