"""Pipelined appends (``Lease.append_pipelined``), written once for both surfaces.

``lease_append_pipelined`` is an operation like those of ``_ops``: a generator that yields
its calls and returns its result, with no I/O. Besides single ``Call``s it yields ``Batch``es:
many requests sent on the connection with a window of them unanswered; a surface drives one
with a ``Pipe`` (which requests to send next, the outcomes in order) and sends its frames
``grouped`` into a few writes. The guarantee that nothing after a failed append is written is
the service's (each append names the one before it: ``Append.after``); this module builds the
requests, rides out a restart (resending the unanswered appends one at a time) and says, in
``PipelineBroken``, which records were written.
"""

from __future__ import annotations

import secrets
from collections.abc import Generator, Iterator, Sequence
from typing import Any, NamedTuple

import msgpack

from sessionlane.messages.codec import HEADER
from sessionlane.messages.errors import (
    DiskError,
    LeaseRevoked,
    PipelineBroken,
    SessionLaneError,
    StaleFence,
    Unavailable,
    UnknownOutcome,
    error_for,
)
from sessionlane.messages.wire import (
    PROTOCOL_VERSION,
    Append,
    Appended,
    Durability,
    Error,
    Reply,
)
from sessionlane.system.client._checks import check_durability
from sessionlane.system.client._core import AppendResult, ConnectionLost
from sessionlane.system.client._ops import (
    MAX_REVIVALS,
    Batch,
    Call,
    Core,
    LeaseView,
    Op,
    released_by_append,
    revive,
)
from sessionlane.system.client._records import check_records

__all__ = [
    "MAX_WINDOW",
    "Pipe",
    "PipelinedAppend",
    "append_frame",
    "grouped",
    "lease_append_pipelined",
]


class Pipe:
    """A ``Batch`` in progress: which requests to send next, the outcomes so far. Pure.

    The window is refilled a quarter at a time (``refill``), not one request per answer:
    the service then reads the appends in groups and writes each group at once
    (``docs/pipelining.md``), and the client makes one send per group."""

    def __init__(self, batch: Batch) -> None:
        self.requests = batch.requests
        self.window = batch.window
        self.refill = max(1, batch.window // 4)
        self.sent = 0
        self.outcomes: list[Reply | SessionLaneError] = []
        self.stopped = False
        self.error: SessionLaneError | None = None
        """Why the requests after the ones sent were not sent (their sending failed)."""

    def to_send(self) -> list[Any]:
        """The requests to send now, to fill the window (none once stopped)."""
        if self.stopped:
            return []
        upto = min(len(self.requests), len(self.outcomes) + self.window)
        if self.waiting and upto - self.sent < self.refill and upto < len(self.requests):
            return []  # wait for more room: the next answers come soon
        chunk = self.requests[self.sent : upto]
        self.sent = max(self.sent, upto)
        return chunk

    def not_sent(self, count: int, error: SessionLaneError) -> None:
        """The last ``count`` requests given by ``to_send`` were not sent: nothing more goes."""
        self.sent -= count
        self.stopped = True
        self.error = self.error or error

    def answered(self, outcome: Reply | SessionLaneError) -> None:
        """The outcome of the oldest request still unanswered."""
        self.outcomes.append(outcome)
        if isinstance(outcome, Error | SessionLaneError):
            self.stopped = True

    @property
    def waiting(self) -> int:
        """Requests sent and not answered yet."""
        return self.sent - len(self.outcomes)

    def result(self) -> list[Reply | SessionLaneError]:
        return self.outcomes + ([self.error] if self.error is not None else [])


class PipelinedAppend(NamedTuple):
    """One append of a pipeline: the ``Append`` it is on the wire (``append_frame`` makes
    the same frame), built without a model's validation, which would find nothing: every
    field is the pipeline's own (the lease's id and fence, a record ``check_records``
    passed, append ids of 16 hex digits). A model costs 4 us to build, this 0.4 us."""

    lease: str
    fence: int
    records: list[Any]
    aid: str
    after: str | None
    durability: Durability | None
    release: bool | None = None
    v: int = PROTOCOL_VERSION
    type: str = "append"
    lane: None = None
    path: None = None


def append_frame(request: Append | PipelinedAppend, rid: int) -> bytes:
    """The frame ``codec.frame`` makes of ``request`` with the id ``rid``, built from its
    fields (a pipeline's appends: a seventh of the time of a dump of the model). The fields
    left out are those ``codec.encode`` leaves out: the ones that are None."""
    body: dict[str, Any] = {"v": request.v, "id": rid, "type": "append"}
    body["records"] = request.records
    for name in _APPEND_OPTIONAL:
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    data: bytes = msgpack.packb(body, use_bin_type=True)
    return HEADER.pack(len(data)) + data


_APPEND_OPTIONAL = ("lease", "fence", "lane", "path", "durability", "aid", "after", "release")
"""``Append``'s fields after ``records`` (``test_client_pipeline`` checks they are all)."""


def grouped(frames: list[bytes], size: int) -> Iterator[bytes]:
    """``frames`` joined into writes of about ``size`` bytes (a larger frame goes alone)."""
    group: list[bytes] = []
    length = 0
    for data in frames:
        if group and length + len(data) > size:
            yield b"".join(group)
            group, length = [], 0
        group.append(data)
        length += len(data)
    if group:
        yield b"".join(group)


MAX_WINDOW = 1024
"""The largest ``window`` a pipeline may ask for."""


def lease_append_pipelined(
    core: Core,
    lease: LeaseView,
    records: Sequence[Any],
    window: int,
    durability: Durability | None,
    release: bool = False,
) -> Generator[Call | Batch, Any, list[AppendResult]]:
    """``Lease.append_pipelined``: one append per record, up to ``window`` in flight, in order.

    Each append names the one before it (``after``), so the service writes none after one that
    was not written. A failure raises ``PipelineBroken`` saying which were written. A lost
    connection of a suspended lease (``reconnect_for``) reclaims the lease and resends, one at
    a time, the appends that were sent and not answered (their ``aid`` answers the written ones
    as they were), then goes on with the window.

    ``release``: the last append releases this level of the lease once durable (append and
    release); then the lease counts as released. A pipeline that stops before it leaves the
    lease held.
    """
    check_durability(durability)
    if not isinstance(release, bool):
        raise TypeError(f"release must be a bool, got {release!r}")
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
        raise ValueError(f"window must be an int from 1 to {MAX_WINDOW}, got {window!r}")
    lease.check_usable()
    checked = check_records(records, max_record_bytes=core.settings.max_record_bytes)
    requests: list[PipelinedAppend] = []
    before: str | None = None
    lease_id, fence = lease.id, lease.fence
    for record in checked:
        aid = secrets.token_hex(8)
        requests.append(PipelinedAppend(lease_id, fence, [record], aid, before, durability))
        before = aid
    if release and requests:
        requests[-1] = requests[-1]._replace(release=True)
    results: list[AppendResult] = []
    resend_until = 0  # appends before this index were sent before a restart: one at a time
    revivals = 0
    while len(results) < len(requests):
        start = len(results)
        if lease.state.suspended:
            yield from _revive_pipeline(core, lease, results, resend_until - start)
        careful = start < resend_until
        end = resend_until if careful else len(requests)
        outcomes = yield Batch(requests[start:end], 1 if careful else window)
        for outcome in outcomes:
            if not isinstance(outcome, Appended):
                break
            results.append(AppendResult(outcome.offset, outcome.lines, outcome.fence))
        if len(results) == end:
            continue
        failed = outcomes[len(results) - start]
        sent = len(outcomes) - (len(results) - start)  # answered otherwise, from ``failed`` on
        if isinstance(failed, Unavailable) and lease.state.suspended and revivals < MAX_REVIVALS:
            revivals += 1
            resend_until = max(resend_until, len(results) + sent)
            continue
        rest = outcomes[len(results) - start :]
        raise _broken(
            lease, results, failed, rest, resend_until - len(results) if careful else None
        )
    if release and requests:
        released_by_append(core, lease)
    return results


def _revive_pipeline(
    core: Core, lease: LeaseView, results: list[AppendResult], unknown: int
) -> Op[None]:
    """Reclaim the suspended lease of a pipeline, or raise its ``PipelineBroken``."""
    try:
        yield from revive(core, lease.state)
    except LeaseRevoked as exc:
        raise _broken(lease, results, exc, [], max(0, unknown)) from exc


def _broken(
    lease: LeaseView,
    results: list[AppendResult],
    failed: Reply | SessionLaneError,
    rest: list[Reply | SessionLaneError],
    unknown: int | None,
) -> PipelineBroken:
    """The error of a pipeline stopped at append ``len(results)``: ``failed`` is its outcome,
    ``rest`` the outcomes of it and the ones sent after it. ``unknown``: how many from it on
    may be in the file whatever they were answered (sent before a restart), or None to tell
    from ``rest``."""
    cause = failed if isinstance(failed, SessionLaneError) else None
    if cause is None:
        assert isinstance(failed, Error), failed
        cause = error_for(failed.code, failed.detail, failed.path or lease.path)
    if isinstance(cause, StaleFence) and lease.state.revoked is None:
        lease.state.revoked = "stale_fence"
    if isinstance(cause, ConnectionLost):
        reason = lease.state.revoked or "connection_lost"
        cause = UnknownOutcome(
            f"{cause.detail}: the append may or may not be in the file, read it",
            path=lease.path,
            reason=reason,
        )
    if unknown is None:
        # A lost answer, a failed sync (it fails every ack it covered), a bug: maybe written.
        maybe = [i for i, o in enumerate(rest) if _maybe_written(o)]
        unknown = maybe[-1] + 1 if maybe else 0
    index = len(results)
    if unknown:
        what = f"appends {index} to {index + unknown - 1} may or may not be in the file (read it)"
        what += ", and the ones after them were not written"
    else:
        what = f"append {index} and the ones after it were not written"
    return PipelineBroken(
        f"pipeline stopped after {index} appends written: {cause.code}: {cause.detail}; {what}",
        path=lease.path,
        written=tuple(results),
        failed=index,
        cause=cause,
        unknown=unknown,
    )


def _maybe_written(outcome: Reply | SessionLaneError) -> bool:
    """May the append answered ``outcome``, after the one that stopped its pipeline, be in the
    file? An ``appended`` there can only come from appends resent for us in bulk (a
    convention's member resending a restarted owner's appends): it is written, and so may be
    every one before it."""
    if isinstance(outcome, Appended):
        return True
    if isinstance(outcome, Error):
        return outcome.code in ("io_error", "disk_full", "read_only", "internal", "unknown_outcome")
    return isinstance(outcome, Unavailable | DiskError) or type(outcome) is SessionLaneError
