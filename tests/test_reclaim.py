"""The pure parts of reclaim after a restart: the lease record, the reclaim book, and the lease
table's awaited holder. No actors, no clock: time is passed in."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sessionlane.actors.awaited import AwaitingTable
from sessionlane.actors.lease_table import (
    Diagnostic,
    Grant,
    LeasePolicy,
    Queue,
    Reject,
    Skip,
)
from sessionlane.actors.reclaim import (
    FREE,
    MAX_APPENDS,
    MAX_RELEASED,
    RECORD_BYTES,
    DoneAppend,
    HeldRecord,
    LeaseRecord,
    ReclaimBook,
    ReleasedAppend,
    digest,
    encode_record,
    parse_record,
)
from sessionlane.messages.wire import ReclaimTicket

SECRET = "s" * 32
HELD = HeldRecord(
    lease="ab-7",
    fence=7,
    lane="agent:main",
    purposes=("prompt", "write"),
    priority="interactive",
    secret_digest=digest(SECRET),
    hold_until_ms=1_800_000_000_000.5,
)

# The record ---------------------------------------------------------------------------------

names = st.text(min_size=1, max_size=40)
_ID_CHARS = 'abcXYZ019-_"\\é'
"""Characters of the released appends' ids: letters, digits, JSON's escaped ones, a two-byte one
(their length in the record is bounded; the other ids may take 6 bytes a character)."""
held_records = st.builds(
    HeldRecord,
    lease=names,
    fence=st.integers(1, 2**40),
    lane=names,
    purposes=st.lists(
        st.sampled_from(["prompt", "write", "compaction", "recovery"]), min_size=1, max_size=4
    ).map(tuple),
    priority=st.sampled_from(["recovery", "interactive", "background"]),
    secret_digest=st.just(digest(SECRET)),
    hold_until_ms=st.none() | st.floats(0, 2e12),
)
records = st.builds(
    LeaseRecord,
    held=st.none() | held_records,
    ino=st.integers(0, 2**40),
    size=st.integers(0, 2**40),
    appends=st.lists(
        st.builds(
            DoneAppend,
            st.text(min_size=8, max_size=16),
            st.integers(0, 2**40),
            st.integers(1, 99),
            st.integers(1, 2**40),
        ),
        max_size=MAX_APPENDS,
    ).map(tuple),
    released=st.lists(  # ids of few bytes: all of them fit beside the worst of the rest
        st.builds(
            ReleasedAppend,
            st.text(_ID_CHARS, min_size=1, max_size=16),
            st.builds(
                DoneAppend,
                st.text(_ID_CHARS, min_size=8, max_size=16),
                st.integers(0, 2**40),
                st.integers(1, 99),
                st.integers(1, 2**40),
            ),
        ),
        max_size=MAX_RELEASED,
    ).map(tuple),
)


@given(records)
def test_a_record_round_trips_through_its_fixed_size_encoding(record: LeaseRecord) -> None:
    data = encode_record(record)
    assert len(data) == RECORD_BYTES
    assert parse_record(data) == record


def dumped(record: LeaseRecord) -> bytes:
    """The record as ``json.dumps`` writes its object, padded: what the sidecar holds."""
    held = None
    if (h := record.held) is not None:
        held = {
            "lease": h.lease,
            "fence": h.fence,
            "lane": h.lane,
            "purposes": list(h.purposes),
            "priority": h.priority,
            "secret": h.secret_digest,
            "hold_until": h.hold_until_ms,
        }
    payload = {
        "v": 1,
        "held": held,
        "ino": record.ino,
        "size": record.size,
        "appends": [[a.aid, a.offset, a.lines, a.fence] for a in record.appends],
    }
    if record.released:
        payload["released"] = [
            [r.lease, r.done.aid, r.done.offset, r.done.lines, r.done.fence]
            for r in record.released
        ]
    return (json.dumps(payload, ensure_ascii=False) + "\n").encode().ljust(RECORD_BYTES, b" ")


@given(st.lists(records, min_size=1, max_size=6), st.data())
def test_the_encoding_is_the_json_of_the_record_whichever_records_were_encoded_before(
    sequence: list[LeaseRecord], data: st.DataObject
) -> None:
    # The holder's part is remembered between encodings: the same holder with another size,
    # another holder, and an equal holder built anew must all encode as json.dumps does.
    for record in sequence:
        again = replace(record, size=data.draw(st.integers(0, 2**40)))
        rebuilt = replace(record, held=None if record.held is None else replace(record.held))
        for one in (record, again, rebuilt, record):
            assert encode_record(one) == dumped(one)


def test_an_empty_sidecar_is_a_free_file() -> None:
    assert parse_record(b"") == FREE


@pytest.mark.parametrize(
    "data",
    [
        b"{",
        b"[]",
        b'{"v": 2}',
        b'{"v": 1, "held": null, "ino": -1, "size": 0, "appends": []}',
        b'{"v": 1, "held": {"lease": "x"}, "ino": 0, "size": 0, "appends": []}',
    ],
)
def test_a_damaged_record_is_refused_with_a_reason(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_record(data)


def test_a_record_of_the_first_form_keeps_its_one_released_append() -> None:
    # Written before the record kept several: "released" was the last one alone.
    data = b'{"v": 1, "held": null, "ino": 1, "size": 9, "appends": [], '
    data += b'"released": ["ab-7", "aid-00000001", 0, 1, 7]}'
    record = parse_record(data)
    assert record.released == (ReleasedAppend("ab-7", DoneAppend("aid-00000001", 0, 1, 7)),)
    assert parse_record(b'{"v": 1, "held": null, "ino": 1, "size": 9, "appends": []}') == (
        LeaseRecord(None, 1, 9)
    )
    with pytest.raises(ValueError, match="released"):
        parse_record(b'{"v": 1, "held": null, "ino": 1, "size": 9, "appends": [], "released": 3}')


def test_the_book_keeps_the_files_last_released_appends_with_their_leases() -> None:
    book = ReclaimBook()
    for n in range(MAX_RELEASED + 1):
        book.released_by(f"L-{n}", DoneAppend(f"aid-{n:04}", n, 1, n))
    assert len(book.record.released) == MAX_RELEASED
    assert book.answered_released("L-0", "aid-0000", 0) is None  # the oldest went
    assert book.answered_released("L-1", "aid-0001", 1) == DoneAppend("aid-0001", 1, 1, 1)
    assert book.answered_released("L-2", "aid-0001", 1) is None  # another lease's
    assert book.answered_released("L-1", "aid-0001", 2) is None  # another fence


def test_released_appends_that_do_not_fit_are_left_out_the_oldest_first() -> None:
    # a long lane name and ids of three-byte characters leave no room for all of them
    appends = tuple(DoneAppend(f"{'a' * 60}{n:04}", 2**40, 99, 2**40) for n in range(16))
    released = tuple(
        ReleasedAppend(f"{'r' * 16}-{2**40}", DoneAppend(f"{'€' * 60}{n:04}", 2**40, 99, 2**40))
        for n in range(MAX_RELEASED)
    )
    assert parse_record(encode_record(LeaseRecord(HELD, 1, 1, appends, released[:4]))).released
    record = LeaseRecord(replace(HELD, lane="ł" * 256), 2**40, 2**40, appends, released)
    kept = parse_record(encode_record(record))
    assert kept.appends == appends
    assert 0 < len(kept.released) < MAX_RELEASED
    assert kept.released == released[-len(kept.released) :]


# The book ----------------------------------------------------------------------------------


def ticket(**kw: object) -> ReclaimTicket:
    fields: dict[str, object] = {"lease": HELD.lease, "fence": HELD.fence, "secret": SECRET}
    return ReclaimTicket.model_validate({**fields, **kw})


def test_a_holder_found_inside_the_grace_is_awaited_and_after_it_expired() -> None:
    record = LeaseRecord(held=HELD, ino=5, size=100)
    assert ReclaimBook().activate(record, now_ms=10, until_ms=11) == (HELD, False)
    book = ReclaimBook()
    assert book.activate(record, now_ms=11, until_ms=11) == (None, True)
    assert book.record.held is None  # written back free by the shell


def test_only_the_right_lease_fence_secret_and_file_may_reclaim() -> None:
    book = ReclaimBook()
    book.activate(LeaseRecord(held=HELD, ino=5, size=100), 0, 1)
    assert book.refusal(ticket(), ino=5, size=100) is None
    assert "no longer held" in str(book.refusal(ticket(lease="ab-8"), ino=5, size=100))
    assert "fence" in str(book.refusal(ticket(fence=8), ino=5, size=100))
    assert "secret" in str(book.refusal(ticket(secret="t" * 32), ino=5, size=100))
    assert "changed" in str(book.refusal(ticket(), ino=6, size=100))
    assert "changed" in str(book.refusal(ticket(), ino=5, size=101))


def test_an_empty_transcript_recreated_empty_is_the_same_and_any_other_change_refuses() -> None:
    # A lock-only holder (the OpenClaw drop-in) removes the empty file the service created for
    # it; the restarted service creates it anew, under another inode: nothing written is lost.
    book = ReclaimBook()
    book.activate(LeaseRecord(held=HELD, ino=5, size=0), 0, 1)
    assert book.refusal(ticket(), ino=6, size=0) is None
    assert "changed" in str(book.refusal(ticket(), ino=6, size=1))
    assert "changed" in str(book.refusal(ticket(), ino=5, size=1))
    assert "secret" in str(book.refusal(ticket(secret="t" * 32), ino=6, size=0))
    book.activate(LeaseRecord(held=HELD, ino=5, size=100), 0, 1)
    assert "changed" in str(book.refusal(ticket(), ino=6, size=0)), "written, then emptied"


def test_the_record_follows_the_holder_and_remembers_its_last_appends() -> None:
    book = ReclaimBook()
    book.issue(HELD.lease, SECRET)
    assert book.held(HELD, ino=5, size=0) == LeaseRecord(held=HELD, ino=5, size=0)
    assert book.held(HELD, ino=5, size=0) is None  # nothing changed: nothing to write
    for n in range(MAX_APPENDS + 2):
        book.appended(HELD.lease, DoneAppend(f"aid-{n:04}", n * 10, 1, 7), ino=5, size=n * 10)
    assert book.answered(HELD.lease, "aid-0000") is None  # forgotten: only the last 16
    assert book.answered(HELD.lease, f"aid-{MAX_APPENDS + 1:04}") == DoneAppend(
        f"aid-{MAX_APPENDS + 1:04}", (MAX_APPENDS + 1) * 10, 1, 7
    )
    assert book.answered("other", f"aid-{MAX_APPENDS + 1:04}") is None
    freed = book.held(None, ino=5, size=170)
    assert freed == LeaseRecord(held=None, ino=5, size=170)
    assert book.secret_of(HELD.lease) is None


# The lease table ---------------------------------------------------------------------------


def awaiting_table(until: float = 1000.0, hold_ms: float | None = 500.0) -> AwaitingTable:
    table = AwaitingTable("/p", LeasePolicy(aging_ms=10_000), fence_floor=1024)
    table.await_reclaim(
        "ab-7", 7, "agent", ["prompt", "write"], "interactive", 0.0, until=until, hold_ms=hold_ms
    )
    return table


def test_nobody_is_granted_a_file_whose_holder_is_awaited() -> None:
    table = awaiting_table()
    assert table.acquire("r1", "B", "prompt", 1.0) == [Queue("r1", "B", 1)]
    assert table.acquire("r2", "C", "prompt", 1.0, on_contention="fail")[0].code == "contended"
    assert table.check_write("B", "ab-7", 7) is not None


def test_a_connection_lane_cannot_write_or_release_under_an_awaited_lease_of_its_prefix() -> None:
    """A connection lane acts for the lanes its id prefixes (``acts_for``), and an awaited
    holder's lane prints as its name: ``c1/`` matches ``c1/agent (awaiting reclaim)`` by
    prefix, but nobody acts under an awaited lease before its reclaim."""
    table = AwaitingTable("/p", LeasePolicy(), fence_floor=1024)
    table.await_reclaim(
        "ab-7", 7, "c1/agent", ["prompt"], "interactive", 0.0, until=1000.0, hold_ms=None
    )
    assert table.check_write("c1/", "ab-7", 7) == (
        "stale_fence",
        "lease ab-7 must be reclaimed first (the service restarted)",
    )
    [refused] = table.release("r", "c1/", "ab-7", 1.0)
    assert isinstance(refused, Reject) and "must be reclaimed first" in refused.detail
    assert table.holder is not None and table.holder.state == "awaiting"


def test_the_awaited_holder_reclaims_its_lease_fence_nesting_and_max_hold() -> None:
    table = awaiting_table()
    table.acquire("r1", "B", "prompt", 1.0)
    effects = table.reclaim("rc", "A", "ab-7", 7, now=100.0)
    assert effects[0] == Grant("rc", "A", "ab-7", 7, "prompt")
    assert table.check_write("A", "ab-7", 7) is None
    assert table.reclaim("rc2", "A", "ab-7", 7, now=101.0)[0] == Grant(
        "rc2", "A", "ab-7", 7, "prompt"
    )
    assert table.counters["reclaims"] == 1
    # Two levels: the first release frees nothing, the second hands over to the waiter.
    assert not table.release("x", "A", "ab-7", 102.0)[0].freed  # type: ignore[union-attr]
    handover = table.release("y", "A", "ab-7", 103.0)
    grant = next(e for e in handover if isinstance(e, Grant))
    assert (grant.lane, grant.fence) == ("B", 1025)
    # The rest of the max hold carried on: 500 ms from the reclaim at 100.
    table2 = awaiting_table()
    table2.reclaim("rc", "A", "ab-7", 7, now=100.0)
    assert table2.holder is not None and table2.holder.hold_deadline == 600.0


def test_a_reclaim_of_another_lease_or_after_another_lane_took_it_is_refused() -> None:
    table = awaiting_table()
    refused = table.reclaim("rc", "A", "ab-6", 6, now=1.0)
    assert isinstance(refused[0], Reject) and refused[0].code == "reclaim_refused"
    table.reclaim("rc", "A", "ab-7", 7, now=1.0)
    stolen = table.reclaim("rc", "Z", "ab-7", 7, now=2.0)
    assert isinstance(stolen[0], Reject) and stolen[0].code == "reclaim_refused"
    assert table.counters["reclaims_refused"] == 2


def test_when_the_grace_ends_the_first_waiter_is_granted_a_higher_fence() -> None:
    table = awaiting_table(until=1000.0)
    table.acquire("r1", "B", "prompt", 1.0)
    assert table.next_deadline() == 1000.0
    assert table.tick(999.0) == []
    effects = table.tick(1000.0)
    assert any(isinstance(e, Diagnostic) for e in effects)
    grant = next(e for e in effects if isinstance(e, Grant))
    assert (grant.lane, grant.fence) == ("B", 1025)
    assert table.counters["reclaims_expired"] == 1
    late = table.reclaim("rc", "A", "ab-7", 7, now=1001.0)
    assert isinstance(late[0], Reject) and late[0].code == "reclaim_refused"


def test_a_waiter_that_waited_before_the_restart_keeps_its_place_in_its_class() -> None:
    table = awaiting_table()
    table.acquire("late", "C", "prompt", 10.0, waited_ms=0)
    table.acquire("early", "B", "prompt", 20.0, waited_ms=5_000)  # queued long before C
    table.acquire("bg", "D", "prompt", 5.0, priority="background", waited_ms=9_000)
    assert [w.lane for w in table.order(20.0)] == ["B", "C", "D"]


# A stateful model of the grace ---------------------------------------------------------------


class GraceModel(RuleBasedStateMachine):
    """Lanes acquire, release, abandon and try to reclaim while time passes over the grace.

    What must hold whatever the order: nobody but the reclaimer is granted while the holder is
    awaited; a reclaim gets the awaited lease and fence or a refusal, never a fresh lease;
    once the grace is over, or the holder released, grants go on with fences above the
    ceiling, strictly increasing; every request is answered once.
    """

    GRACE = 1000

    def __init__(self) -> None:
        super().__init__()
        self.table = awaiting_table(until=self.GRACE, hold_ms=None)
        self.now = 0.0
        self.reclaimer: str | None = None
        self.fences: list[int] = []
        self.answers: Counter[object] = Counter()
        self.reqs = 0

    def effects(self, effects: list[Any]) -> None:
        for e in effects:
            if isinstance(e, Grant | Reject | Skip):
                self.answers[e.req] += 1
            if isinstance(e, Grant) and not e.reentrant:
                if e.lease == "ab-7":
                    assert e.fence == 7 and e.lane == self.reclaimer
                    continue
                assert self.table.holder is not None and self.table.holder.state == "held"
                assert e.fence > 1024 and all(e.fence > f for f in self.fences)
                self.fences.append(e.fence)

    def req(self) -> str:
        self.reqs += 1
        return f"r{self.reqs}"

    @rule(lane=st.sampled_from(["A", "B", "C"]))
    def acquire(self, lane: str) -> None:
        awaited = self.table.holder is not None and self.table.holder.state == "awaiting"
        effects = self.table.acquire(self.req(), lane, "prompt", self.now, wait_timeout_ms=5000)
        if awaited:
            assert not any(isinstance(e, Grant) for e in effects)
        self.effects(effects)

    @rule(lane=st.sampled_from(["A", "B", "C"]), right=st.booleans())
    def reclaim(self, lane: str, right: bool) -> None:
        h = self.table.holder
        will_take = right and h is not None and h.state == "awaiting"
        if will_take:
            self.reclaimer = lane
        effects = self.table.reclaim(self.req(), lane, "ab-7", 7 if right else 6, self.now)
        first = effects[0]
        if isinstance(first, Grant):
            assert (first.lease, first.fence, first.lane) == ("ab-7", 7, self.reclaimer)
        else:
            assert isinstance(first, Reject) and first.code == "reclaim_refused"
        self.effects(effects)

    @rule()
    def holder_releases(self) -> None:
        h = self.table.holder
        if h is not None and h.state == "held":
            self.effects(self.table.release(self.req(), h.lane, h.lease, self.now))

    @rule(lane=st.sampled_from(["A", "B", "C"]))
    def abandon(self, lane: str) -> None:
        self.effects(self.table.abandon(self.req(), lane, self.now, reason="gone"))

    @rule(dt=st.integers(0, 600))
    def advance(self, dt: int) -> None:
        self.now += dt
        self.effects(self.table.tick(self.now))

    @invariant()
    def nobody_else_while_awaited(self) -> None:
        h = self.table.holder
        if h is not None and h.state == "awaiting":
            assert self.now < self.GRACE and not self.fences
        assert all(n == 1 for n in self.answers.values())


TestGraceModel = GraceModel.TestCase
