"""Pipelined appends (``Lease.append_pipelined``), written once for both surfaces.

``lease_append_pipelined`` is an operation like those of ``_ops``: a generator that yields
its calls and returns its result, with no I/O. Besides single ``Call``s it yields ``Batch``es:
many requests sent on the connection with a window of them unanswered; a surface drives one
with a ``Pipe`` (which requests to send next, the outcomes in order) and sends its frames
``grouped`` into a few writes. The guarantee that nothing after a failed append is written is
the service's (each append names the one before it: ``Append.after``); this module builds the
requests, rides out a restart (resending the unanswered appends one at a time) and says, in
``PipelineBroken``, which records were written.

The records go in groups (``plan_groups``): one append carries up to a quarter of the window's
records, asks for the offset of each line (``Append.offsets``), and is written all or nothing;
the window counts records in flight. The caller still gets one ``AppendResult`` per record,
and ``PipelineBroken`` speaks of records. Most of the CPU a pipelined record cost the file
and the client was paid per append, and is now shared by a group's records
(``docs/pipelining.md``: 36 -> 10 us per record in the file's process).
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
    "plan_groups",
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
    offsets: bool | None = None
    packed: bytes | None = None
    """``records`` packed (msgpack), when known: ``append_frame`` puts these bytes in the
    frame instead of packing the records again. Not a field of the wire."""
    v: int = PROTOCOL_VERSION
    type: str = "append"
    lane: None = None
    path: None = None


def append_frame(request: Append | PipelinedAppend, rid: int) -> bytes:
    """The frame ``codec.frame`` makes of ``request`` with the id ``rid``, built from its
    fields (a pipeline's appends: a seventh of the time of a dump of the model). The fields
    left out are those ``codec.encode`` leaves out: the ones that are None."""
    packed = getattr(request, "packed", None)
    if packed is None:
        body: dict[str, Any] = {"v": request.v, "id": rid, "type": "append"}
        body["records"] = request.records
        for name in _APPEND_OPTIONAL:
            value = getattr(request, name)
            if value is not None:
                body[name] = value
        data: bytes = msgpack.packb(body, use_bin_type=True)
        return HEADER.pack(len(data)) + data
    # the same map, its records' bytes put in as they are (a map is its header, then each
    # key and value packed one after the other)
    rest = [(n, v) for n in _APPEND_OPTIONAL if (v := getattr(request, n)) is not None]
    pack = _PACKER.pack
    parts = [_PACKER.pack_map_header(4 + len(rest))]
    parts += [pack("v"), pack(request.v), pack("id"), pack(rid), _TYPE_APPEND, pack("records")]
    parts.append(packed)
    for name, value in rest:
        parts += [pack(name), pack(value)]
    data = b"".join(parts)
    return HEADER.pack(len(data)) + data


_APPEND_OPTIONAL = (
    "lease",
    "fence",
    "lane",
    "path",
    "durability",
    "aid",
    "after",
    "release",
    "offsets",
)
"""``Append``'s fields after ``records`` (``test_client_pipeline`` checks they are all)."""
_PACKER = msgpack.Packer(use_bin_type=True)
_TYPE_APPEND = _PACKER.pack("type") + _PACKER.pack("append")


def plan_groups(
    records: Sequence[Any], window: int, max_frame_bytes: int | None, room: int
) -> list[tuple[list[Any], bytes]]:
    """``records`` in groups of at most a quarter of ``window`` (at least one), each a group's
    records and their msgpack array, packed once: a group is cut early where its frame would
    come within ``room`` bytes of ``max_frame_bytes`` (the frame body the service refuses,
    closing the connection). A record too large alone is a group alone (its frame is refused
    before it is sent: ``TooLarge``)."""
    size = max(1, window // 4)
    limit = None if max_frame_bytes is None else max_frame_bytes - room
    pack = _PACKER.pack
    groups: list[tuple[list[Any], bytes]] = []
    members: list[Any] = []
    parts: list[bytes] = []
    length = 0
    for record in records:
        part = pack(record)
        if members and (
            len(members) == size or (limit is not None and length + len(part) + 5 > limit)
        ):
            groups.append((members, _PACKER.pack_array_header(len(members)) + b"".join(parts)))
            members, parts, length = [], [], 0
        members.append(record)
        parts.append(part)
        length += len(part)
    if members:
        groups.append((members, _PACKER.pack_array_header(len(members)) + b"".join(parts)))
    return groups


_FRAME_ROOM = 512
"""Bytes of an append's frame besides its records, at most: the other fields (a lease id of
at most 128 characters, ids of 16 hex digits, a fence) and their names."""


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
    """``Lease.append_pipelined``: the records in groups, one append per group, up to
    ``window`` records in flight, in order; one ``AppendResult`` per record.

    Each append names the one before it (``after``), so the service writes none after one that
    was not written. A failure raises ``PipelineBroken`` saying which records were written. A
    lost connection of a suspended lease (``reconnect_for``) reclaims the lease and resends,
    one at a time, the appends that were sent and not answered (their ``aid`` answers the
    written ones as they were), then goes on with the window.

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
    lease_id, fence = lease.id, lease.fence
    room = _FRAME_ROOM + len(lease_id.encode())
    groups = plan_groups(checked, window, core.settings.max_frame_bytes, room)
    requests: list[PipelinedAppend] = []
    before: str | None = None
    for members, packed in groups:
        aid = secrets.token_hex(8)
        offsets = True if len(members) > 1 else None
        requests.append(
            PipelinedAppend(
                lease_id, fence, members, aid, before, durability, offsets=offsets, packed=packed
            )
        )
        before = aid
    if release and requests:
        requests[-1] = requests[-1]._replace(release=True)
    in_flight = max(1, window // max(1, window // 4))  # appends: ``window`` records at most
    results: list[AppendResult] = []
    done = 0  # appends answered ``appended``: their records' results are in ``results``
    resend_until = 0  # appends before this index were sent before a restart: one at a time
    revivals = 0
    while done < len(requests):
        start = done
        if lease.state.suspended:
            yield from _revive_pipeline(core, lease, results, requests[start:resend_until])
        careful = start < resend_until
        end = resend_until if careful else len(requests)
        outcomes = yield Batch(requests[start:end], 1 if careful else in_flight)
        for outcome, request in zip(outcomes, requests[start:end], strict=False):
            if not isinstance(outcome, Appended):
                break
            each = _record_results(outcome, len(request.records))
            if each is None:
                break
            results += each
            done += 1
        if done == end:
            continue
        failed = outcomes[done - start]
        if isinstance(failed, Appended):  # written, but its lines' offsets are missing
            failed = SessionLaneError(
                f"append {done} of the pipeline was answered without the offsets of its "
                f"{len(requests[done].records)} lines",
                code="internal",
            )
        sent = len(outcomes) - (done - start)  # answered otherwise, from ``failed`` on
        if isinstance(failed, Unavailable) and lease.state.suspended and revivals < MAX_REVIVALS:
            revivals += 1
            resend_until = max(resend_until, done + sent)
            continue
        rest = [failed, *outcomes[done - start + 1 :]]
        unknown = resend_until - done if careful else None
        raise _broken(lease, results, failed, rest, requests[done:], unknown)
    if release and requests:
        released_by_append(core, lease)
    return results


def _record_results(reply: Appended, records: int) -> list[AppendResult] | None:
    """The result of each of the ``records`` records of an append answered ``reply``, or
    None if it does not say where each line is."""
    if records == 1:
        return [AppendResult(reply.offset, 1, reply.fence)]
    offsets = reply.offsets
    if offsets is None or len(offsets) != records or reply.lines != records:
        return None
    return [AppendResult(offset, 1, reply.fence) for offset in offsets]


def _revive_pipeline(
    core: Core, lease: LeaseView, results: list[AppendResult], unsure: list[PipelinedAppend]
) -> Op[None]:
    """Reclaim the suspended lease of a pipeline, or raise its ``PipelineBroken`` (``unsure``:
    the appends sent before the loss and not answered, which may be in the file)."""
    try:
        yield from revive(core, lease.state)
    except LeaseRevoked as exc:
        raise _broken(lease, results, exc, [], unsure, len(unsure)) from exc


def _broken(
    lease: LeaseView,
    results: list[AppendResult],
    failed: Reply | SessionLaneError,
    rest: list[Reply | SessionLaneError],
    left: Sequence[PipelinedAppend],
    unknown: int | None,
) -> PipelineBroken:
    """The error of a pipeline stopped at the append after those whose records' results are
    ``results``: ``failed`` is its outcome, ``rest`` the outcomes of it and the ones sent
    after it, ``left`` the appends from it on. ``unknown``: how many appends from it on may
    be in the file whatever they were answered (sent before a restart), or None to tell from
    ``rest``. The error counts records: ``failed`` is the index of the first record of the
    failed append, ``unknown`` the records of the appends that may be in the file."""
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
    unknown = sum(len(request.records) for request in left[: max(0, unknown)])
    index = len(results)
    if unknown:
        what = f"records {index} to {index + unknown - 1} may or may not be in the file"
        what += " (read it), and the ones after them were not written"
    else:
        what = f"record {index} and the ones after it were not written"
    return PipelineBroken(
        f"pipeline stopped after {index} records written: {cause.code}: {cause.detail}; {what}",
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
