"""What of a file's lease survives a service restart, and who may take it back. Pure: no I/O.

A SessionFile keeps one durable *lease record* per transcript (written by
``sessionlane.actors.lease_record_file``): who holds the file (lease, fence, lane name, the
purposes of each nesting level, priority, when its max hold ends, a digest of its reclaim
secret), the transcript's inode and size after the last write, and the ids of the holder's
last appends with their results. It is rewritten when the holder changes or nests, and after
each write; it is never fsynced (it must survive the death of the process, not of the
machine; see *Limits* in ``docs/contract.md``).

After a restart the file's new actor loads the record. A holder found there within the
service's reclaim grace is *awaited*: the lease table keeps it as the holder (nobody else is
granted), until a client shows the lease, fence and secret (``Acquire.reclaim``) or the grace
ends. ``ReclaimBook.refusal`` says why a reclaim cannot be honoured; the transcript must be
the one the record names, with the size it had after the holder's last write, so a change
made by anyone else (or a record older than the transcript, after a machine crash) refuses
the reclaim rather than granting it over a file that moved on. An empty transcript is the
exception: found empty again, under any inode, nothing the holder wrote is lost (a lock-only
holder may have removed the empty file the service created for it, as the OpenClaw drop-in
does, and the restarted service created it anew).

Appends are de-duplicated across the restart by their ``aid``: the record keeps the last
``MAX_APPENDS`` results of the holder, so an append whose answer was lost is answered as it
was, not written twice. The appends that released their lease (``Append.release``) outlive
their holder in the record (``released``: the file's last ``MAX_RELEASED``, each with its lease,
written with the record that names the next holder or the level left): resent, after a restart
or not, each is answered as written and released, and releases nothing again, not even a level
of a nested lease still held (its entry there is found before the holder's appends).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sessionlane.actors.lease_types import Holder
from sessionlane.messages.lean_records import lean_record
from sessionlane.messages.wire import Append, Appended, Priority, Purpose, ReclaimTicket

__all__ = [
    "MAX_APPENDS",
    "MAX_RELEASED",
    "RECORD_BYTES",
    "RECORD_VERSION",
    "DoneAppend",
    "HeldRecord",
    "LeaseRecord",
    "ReclaimBook",
    "ReleasedAppend",
    "digest",
    "encode_record",
    "parse_record",
]

RECORD_VERSION = 1
RECORD_BYTES = 4096
"""Every record is padded to this size: a rewrite in place never leaves a longer tail."""
MAX_APPENDS = 16
"""Appends remembered per holder for de-duplication; a client resends at most this many."""
MAX_RELEASED = 8
"""Appends that released their lease remembered per file (any holder's, the last ones): a resend
of one is answered as written until this many more have released (a client resends at once).
Fewer are written when the record would not fit in ``RECORD_BYTES`` (the oldest go first)."""

_PURPOSES: frozenset[str] = frozenset({"prompt", "write", "compaction", "recovery"})
_PRIORITIES: frozenset[str] = frozenset({"recovery", "interactive", "background"})


def digest(secret: str) -> str:
    """What the record keeps of a reclaim secret (the secret itself never touches the disk)."""
    return hashlib.sha256(secret.encode()).hexdigest()


@lean_record
class DoneAppend:
    """An append of the holder, as it was answered."""

    aid: str
    offset: int
    lines: int
    fence: int


@lean_record
class ReleasedAppend:
    """An append that released (one level of) its lease (``Append.release``), as answered."""

    lease: str
    done: DoneAppend


@lean_record
class HeldRecord:
    """The holder of a file, as far as a restarted actor needs to know it."""

    lease: str
    fence: int
    lane: str
    """The lane name (shown in ``status`` while awaited)."""
    purposes: tuple[Purpose, ...]
    """One per nesting level, outermost first."""
    priority: Priority
    secret_digest: str
    hold_until_ms: float | None
    """Wall-clock end of its max hold (epoch ms), or None."""


@lean_record
class LeaseRecord:
    """The durable record of one file (``held`` None: nobody held it)."""

    held: HeldRecord | None = None
    ino: int = 0
    size: int = 0
    appends: tuple[DoneAppend, ...] = ()
    released: tuple[ReleasedAppend, ...] = ()
    """The file's last appends that released their lease, oldest first, at most
    ``MAX_RELEASED`` (the key is left out while there is none)."""


FREE = LeaseRecord()


def encode_record(record: LeaseRecord) -> bytes:
    """The record as exactly ``RECORD_BYTES`` bytes (JSON, a newline, space padding).

    The bytes ``json.dumps`` gives for the record's object (``{"v", "held", "ino", "size",
    "appends"}``, and ``"released"`` when there are some), put together from parts: the
    holder's part is encoded once per holder (a write of the holder keeps the same
    ``HeldRecord``), an append's from its four fields. Released appends that would not fit are
    left out, the oldest first."""
    appends = ", ".join(
        f"[{_string(a.aid)}, {a.offset}, {a.lines}, {a.fence}]" for a in record.appends
    )
    released = _released_json(record.released) if record.released else ""
    text = (
        f'{{"v": {RECORD_VERSION}, "held": {_held_json(record.held)}, "ino": {record.ino}, '
        f'"size": {record.size}, "appends": [{appends}]{released}}}\n'
    )
    data = text.encode()
    if len(data) > RECORD_BYTES:
        if record.released:
            return encode_record(replace(record, released=record.released[1:]))
        raise ValueError(f"lease record of {len(data)} bytes exceeds {RECORD_BYTES}")
    return data.ljust(RECORD_BYTES, b" ")


_string: Callable[[str], str] = json.encoder.encode_basestring  # as json.dumps, ensure_ascii=False
_encode: Callable[[Any], str] = json.JSONEncoder(ensure_ascii=False).encode
"""``json.dumps(o, ensure_ascii=False)`` without building an encoder per call."""
_held_encoded: list[Any] = [None, "null"]  # the last HeldRecord encoded, and its JSON
_released_encoded: list[Any] = [(), ""]  # the last released appends encoded, and their JSON


def _number(x: float | None) -> str:
    """A number (or None) as ``json.dumps`` writes it: ``repr`` of a finite one."""
    if type(x) is int or (type(x) is float and math.isfinite(x)):
        return repr(x)
    return _encode(x)


def _released_json(released: tuple[ReleasedAppend, ...]) -> str:
    """The record's ``"released"`` key and value, after a comma (remembered for the last tuple
    encoded: the holder's writes keep the same one)."""
    if _released_encoded[0] is released:
        return str(_released_encoded[1])
    entries = ", ".join(
        f"[{_string(r.lease)}, {_string(r.done.aid)}, {r.done.offset}, {r.done.lines}, "
        f"{r.done.fence}]"
        for r in released
    )
    encoded = f', "released": [{entries}]'
    _released_encoded[:] = [released, encoded]
    return encoded


def _held_json(h: HeldRecord | None) -> str:
    """The JSON of the record's ``held``, as ``json.dumps`` writes it (remembered for the last
    holder encoded)."""
    if h is None:
        return "null"
    if _held_encoded[0] is h:
        return str(_held_encoded[1])
    purposes = ", ".join(_string(p) for p in h.purposes)
    until = h.hold_until_ms
    encoded = (
        f'{{"lease": {_string(h.lease)}, "fence": {_number(h.fence)}, "lane": {_string(h.lane)}, '
        f'"purposes": [{purposes}], "priority": {_string(h.priority)}, '
        f'"secret": {_string(h.secret_digest)}, "hold_until": {_number(until)}}}'
    )
    _held_encoded[:] = [h, encoded]
    return encoded


def parse_record(data: bytes) -> LeaseRecord:
    """Parse a record's bytes (empty: ``FREE``); ``ValueError`` says what is wrong."""
    if not data.strip():
        return FREE
    try:
        payload = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(payload, dict) or payload.get("v") != RECORD_VERSION:
        raise ValueError(f"not a version {RECORD_VERSION} lease record")
    ino, size = _int(payload, "ino"), _int(payload, "size")
    appends = payload.get("appends")
    if not isinstance(appends, list):
        raise ValueError("'appends' is not a list")
    done = tuple(_append(a) for a in appends[-MAX_APPENDS:])
    raw = payload.get("held")
    held = None if raw is None else _held(raw)
    released = payload.get("released")
    if released is None:
        released = []
    elif isinstance(released, list) and released and isinstance(released[0], str):
        released = [released]  # the first form of the key: the last released append only
    if not isinstance(released, list):
        raise ValueError(f"'released' is not a list: {released!r}")
    last = tuple(_released(r) for r in released[-MAX_RELEASED:])
    return LeaseRecord(held=held, ino=ino, size=size, appends=done, released=last)


def _released(raw: Any) -> ReleasedAppend:
    if not isinstance(raw, list) or len(raw) != 5 or not isinstance(raw[0], str):
        raise ValueError(f"not a released entry: {raw!r}")
    return ReleasedAppend(raw[0], _append(raw[1:]))


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key!r} is not a non-negative integer: {value!r}")
    return value


def _append(raw: Any) -> DoneAppend:
    ok = isinstance(raw, list) and len(raw) == 4 and isinstance(raw[0], str)
    if not ok or not all(isinstance(x, int) and not isinstance(x, bool) for x in raw[1:]):
        raise ValueError(f"not an append entry: {raw!r}")
    return DoneAppend(raw[0], raw[1], raw[2], raw[3])


def _held(raw: Any) -> HeldRecord:
    if not isinstance(raw, dict):
        raise ValueError("'held' is not an object")
    lease, lane, secret = raw.get("lease"), raw.get("lane"), raw.get("secret")
    purposes, priority, until = raw.get("purposes"), raw.get("priority"), raw.get("hold_until")
    if not (isinstance(lease, str) and isinstance(lane, str) and isinstance(secret, str)):
        raise ValueError("'held' lacks lease, lane or secret")
    if not isinstance(purposes, list) or not purposes or not set(purposes) <= _PURPOSES:
        raise ValueError(f"bad purposes {purposes!r}")
    if priority not in _PRIORITIES:
        raise ValueError(f"bad priority {priority!r}")
    if until is not None and not isinstance(until, int | float):
        raise ValueError(f"bad hold_until {until!r}")
    return HeldRecord(
        lease=lease,
        fence=_int(raw, "fence"),
        lane=lane,
        purposes=tuple(purposes),
        priority=priority,
        secret_digest=secret,
        hold_until_ms=None if until is None else float(until),
    )


@dataclass
class ReclaimBook:
    """The lease record of one open file as this actor knows it, and its reclaim counters.

    ``secrets`` holds the secret of the current holder's lease (issued at its
    first grant by this actor, or shown by its reclaim), so a reentrant grant carries it too.
    """

    record: LeaseRecord = FREE
    secrets: dict[str, str] = field(default_factory=dict)

    def activate(
        self, record: LeaseRecord, now_ms: float, until_ms: float
    ) -> tuple[HeldRecord | None, bool]:
        """The record found at activation: the holder to await (None: the file is free, or
        the grace is over) and whether a holder lost the file because the grace is over."""
        self.record = record
        if record.held is None:
            return None, False
        if now_ms < until_ms:
            return record.held, False
        self.record = replace(record, held=None, appends=())
        return None, True

    def refusal(self, ticket: ReclaimTicket, ino: int, size: int) -> str | None:
        """Why ``ticket`` cannot take its lease back (None: it may, if the table agrees)."""
        held = self.record.held
        if held is None or held.lease != ticket.lease:
            return f"lease {ticket.lease} is no longer held here (grace over, or released)"
        if held.fence != ticket.fence:
            return f"fence {ticket.fence} is not the fence of lease {ticket.lease} ({held.fence})"
        if not hmac.compare_digest(held.secret_digest, digest(ticket.secret)):
            return f"wrong reclaim secret for lease {ticket.lease}"
        if self.record.size == 0 and size == 0:
            # Nothing the holder wrote can be lost: an empty transcript removed and recreated
            # empty (the OpenClaw drop-in removes the one a lock-only acquire created) is the
            # same transcript, whatever its inode.
            return None
        if self.record.ino != ino or self.record.size != size:
            return (
                f"the file changed since the holder's last write (inode {self.record.ino} size "
                f"{self.record.size}, now inode {ino} size {size})"
            )
        return None

    def issue(self, lease: str, secret: str) -> None:
        """``lease`` was granted with ``secret`` (or reclaimed showing it)."""
        self.secrets[lease] = secret

    def secret_of(self, lease: str) -> str | None:
        return self.secrets.get(lease)

    def held(self, held: HeldRecord | None, ino: int, size: int) -> LeaseRecord | None:
        """The holder is now ``held``: the record to write, or None if nothing changed."""
        current = self.record
        if held is not None:
            self.secrets = (
                {held.lease: self.secrets[held.lease]} if held.lease in self.secrets else {}
            )
        else:
            self.secrets = {}
        if _same_holder(current.held, held):
            return None
        same_lease = (
            held is not None and current.held is not None and held.lease == current.held.lease
        )
        appends = current.appends if same_lease else ()
        self.record = LeaseRecord(held, ino, size, appends, current.released)
        return self.record

    def holder_now(
        self, h: Holder | None, lane: str, ino: int, size: int, now: float, wall_ms: float
    ) -> LeaseRecord | None:
        """The table's holder is ``h`` (its lane named ``lane``; ``now`` on the table's clock,
        ``wall_ms`` the wall clock): the record to write, or None if it still names it.

        Only leases announced to a lane (they have a reclaim secret) are recorded.
        """
        recorded = self.record.held
        if h is None and recorded is None:
            return None  # the common case of a free file: nothing to compare
        if (
            h is not None
            and recorded is not None
            and (h.lease, tuple(h.purposes)) == (recorded.lease, recorded.purposes)
            and lane == recorded.lane
        ):
            return None  # the common case of a holder writing: nothing changed
        held = None
        if h is not None and (secret := self.secret_of(h.lease)) is not None:
            until = None
            if h.hold_deadline is not None:
                until = wall_ms + (h.hold_deadline - now)
            held = HeldRecord(
                lease=h.lease,
                fence=h.fence,
                lane=lane,
                purposes=tuple(h.purposes),
                priority=h.priority,
                secret_digest=digest(secret),
                hold_until_ms=until,
            )
        return self.held(held, ino, size)

    def wrote(self, request: Any, reply: Any, ino: int, size: int) -> LeaseRecord | None:
        """A write under ``request.lease`` was answered ``reply``: if it is the holder's, the
        record with the new size (and the append's id and result), else None."""
        held = self.record.held
        lease = getattr(request, "lease", None)
        if held is None or lease != held.lease:
            return None
        done = None
        if isinstance(request, Append) and isinstance(reply, Appended) and request.aid:
            done = DoneAppend(request.aid, reply.offset, reply.lines, reply.fence)
        return self.appended(held.lease, done, ino, size)

    def appended(self, lease: str, done: DoneAppend | None, ino: int, size: int) -> LeaseRecord:
        """The holder wrote (``done``: an append with an id); the record to write."""
        current = self.record
        appends = current.appends
        if done is not None and current.held is not None and current.held.lease == lease:
            appends = (*appends, done)[-MAX_APPENDS:]
        # not replace(): 4x slower
        self.record = LeaseRecord(current.held, ino, size, appends, current.released)
        return self.record

    def unwrote(self, lease: str, aid: str) -> bool:
        """The append ``aid`` of ``lease`` failed after its write (its sync failed): a resend
        must write it again, not be answered from the record. Whether the record changed."""
        current = self.record
        if current.held is None or current.held.lease != lease:
            return False
        appends = tuple(a for a in current.appends if a.aid != aid)
        if len(appends) == len(current.appends):
            return False
        self.record = LeaseRecord(
            current.held, current.ino, current.size, appends, current.released
        )
        return True

    def released_by(self, lease: str, done: DoneAppend) -> None:
        """``lease`` (one level of it) was released by its append ``done``: kept in the record
        (written with the record that follows the release) for a resend, after a restart or
        not, among the file's last ``MAX_RELEASED``."""
        current = self.record
        released = (*current.released, ReleasedAppend(lease, done))[-MAX_RELEASED:]
        self.record = LeaseRecord(
            current.held, current.ino, current.size, current.appends, released
        )

    def answered_released(
        self, lease: str, aid: str | None, fence: int | None
    ) -> DoneAppend | None:
        """The earlier answer of the append ``aid`` of ``lease`` that released it, if it did
        (and is among the file's last ``MAX_RELEASED`` that did)."""
        if aid is None:
            return None
        for r in self.record.released:
            if r.lease == lease and r.done.aid == aid:
                return r.done if r.done.fence == fence else None
        return None

    def answered(self, lease: str, aid: str | None) -> DoneAppend | None:
        """The earlier answer of the append ``aid`` of ``lease``, if it was written."""
        held = self.record.held
        if aid is None or held is None or held.lease != lease:
            return None
        return next((a for a in self.record.appends if a.aid == aid), None)


def _same_holder(a: HeldRecord | None, b: HeldRecord | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.lease, a.purposes, a.lane) == (b.lease, b.purposes, b.lane)
