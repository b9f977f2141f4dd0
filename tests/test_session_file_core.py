"""The SessionFile's deciding core alone: ``FileCore`` without an actor, a disk or a clock.

A call goes to the lease table or to the write path; the table's effects are read one at a
time into what the shell performs. Time is a plain number.
"""

from __future__ import annotations

from typing import Any

from sessionlane.actors import lease_table as lt
from sessionlane.actors.awaited import AwaitingTable
from sessionlane.actors.lease_table import LeasePolicy
from sessionlane.actors.reclaim import ReclaimBook
from sessionlane.actors.session_file_core import (
    Answer,
    DrainWrites,
    Event,
    FileCore,
    Handoff,
    Reserve,
    Warn,
)
from sessionlane.actors.session_file_effects import TableEffects
from sessionlane.actors.session_file_writes import (
    AskWriteLease,
    CheckLease,
    ReleaseWriteLease,
    Reply,
    WritePath,
    call_key,
)
from sessionlane.messages.internal import LaneCall, LaneRef
from sessionlane.messages.wire import (
    Acquire,
    Append,
    Error,
    Granted,
    Queued,
    Release,
    Revoked,
    Skipped,
)

PATH = "/sessions/t.jsonl"
NOW = 1_000.0


def core() -> FileCore:
    table = AwaitingTable(PATH, LeasePolicy(), fence_floor=0)
    writes = WritePath(
        PATH,
        legacy=False,
        tail_unchecked=False,
        durability="fsync",
        max_record_bytes=100,
        unsynced=lambda: False,
    )
    return FileCore(PATH, table, writes, ReclaimBook(), new_secret=lambda: "s3cret")


def acquire(purpose: Any, **extra: Any) -> Acquire:
    return Acquire(lane="l", path=PATH, purpose=purpose, **extra)


def call(lane: str, request: Any, rid: int) -> LaneCall:
    ref = LaneRef(uid=lane, name=lane, address=f"lane:{lane}")
    return LaneCall(
        lane=ref, path=PATH, canonical=True, request=request.model_copy(update={"id": rid})
    )


def read(c: FileCore, effects: list[Any]) -> list[Any]:
    """Every effect as the shell sees it: table effects read one at a time, the write path's
    table requests performed by the core (``table_request``)."""
    out: list[Any] = []
    for fx in effects:
        if isinstance(fx, TableEffects):
            for t in fx.effects:
                out += c.meaning(t)
        elif isinstance(fx, CheckLease | AskWriteLease | ReleaseWriteLease):
            out += read(c, c.table_request(fx, NOW))
        else:
            out.append(fx)
    return out


def test_an_acquire_on_a_free_file_reserves_fences_before_it_is_granted() -> None:
    c = core()
    effects = read(c, c.call(call("a", acquire("prompt"), 1), NOW))
    assert [type(fx) for fx in effects] == [Reserve, Answer]
    reserve, answer = effects
    assert isinstance(answer.message, Granted) and answer.message.fence <= reserve.ceiling
    assert answer.req == ("a", 1) and answer.lane == "a"
    assert answer.message.secret == "s3cret" and c.book.secret_of(answer.message.lease) == "s3cret"


def test_a_second_lane_is_queued_or_skipped_as_it_asked() -> None:
    c = core()
    read(c, c.call(call("a", acquire("prompt"), 1), NOW))
    [queued] = read(c, c.call(call("b", acquire("prompt"), 2), NOW))
    assert isinstance(queued, Answer) and isinstance(queued.message, Queued)
    skip = acquire("prompt", on_contention="skip")
    [skipped] = read(c, c.call(call("c", skip, 3), NOW))
    assert isinstance(skipped, Answer) and isinstance(skipped.message, Skipped)


def test_a_release_hands_the_lease_to_the_waiter_and_notes_how_long_it_waited() -> None:
    c = core()
    [_, granted] = read(c, c.call(call("a", acquire("prompt"), 1), NOW))
    read(c, c.call(call("b", acquire("prompt"), 2), NOW))
    release = Release(lease=granted.message.lease)
    effects = read(c, c.call(call("a", release, 3), NOW + 40))
    kinds = [type(fx) for fx in effects]
    assert kinds[0] is Answer and Handoff in kinds
    handoff = next(fx for fx in effects if isinstance(fx, Handoff))
    assert handoff.waited_ms == 40
    assert isinstance(effects[-1], Answer) and effects[-1].lane == "b"


def test_a_lease_less_append_is_answered_once_by_its_write_not_by_its_short_lease() -> None:
    c = core()
    read(c, c.call(call("a", acquire("prompt"), 1), NOW))
    append = call("w", Append(lane="w", path=PATH, records=[{"n": 1}]), 2)
    effects = read(c, c.call(append, NOW))
    assert effects[-1] == DrainWrites()
    assert not any(isinstance(fx, Answer) for fx in effects)  # its queueing is no answer
    assert c.writes.is_pending(call_key(append))


def test_granting_a_waiting_short_write_lease_queues_the_write_and_asks_for_a_drain() -> None:
    c = core()
    append = call("w", Append(lane="w", path=PATH, records=[{"n": 1}]), 1)
    effects = read(c, c.call(append, NOW))
    assert [type(fx) for fx in effects] == [Reserve, DrainWrites, DrainWrites]
    assert not c.writes.is_pending(call_key(append)) and len(c.writes.queue) == 1


def test_a_write_with_a_stale_fence_is_answered_at_once_and_still_drains() -> None:
    c = core()
    [_, granted] = read(c, c.call(call("a", acquire("prompt"), 1), NOW))
    stale = Append(lease=granted.message.lease, fence=granted.message.fence + 1, records=[{}])
    [refusal, drain] = read(c, c.call(call("a", stale, 2), NOW))
    assert isinstance(refusal, Reply) and isinstance(refusal.message, Error)
    assert refusal.message.code == "stale_fence" and drain == DrainWrites()


def test_a_revocation_is_an_event_to_its_lane_and_a_diagnostic_a_warning() -> None:
    c = core()
    revoke = lt.Revoke(lane="a", lease="x-1", reason="max_hold")
    [event] = c.meaning(revoke)
    assert isinstance(event, Event) and event.lane == "a"
    assert isinstance(event.message.message, Revoked)
    assert c.meaning(lt.Diagnostic("odd")) == [Warn("odd")]
