"""Append and release where a real service cannot force the moment: in the pure core
(``FileCore``, ``ReclaimBook``), a service restarted between an append's write and its
release; in the client's pure operations, the answer of an append that released lost with
the service, and its lease not reclaimed.

The end-to-end behaviour (real service, both surfaces, both routes) is in
``tests/test_fused_release.py``; the resend after a kill -9 in ``tests/test_fused_restarts.py``;
every interleaving of the core in ``tests/test_file_core_model.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_client_core import SETTINGS, run
from test_session_file_core import NOW, PATH, call, read

from sessionlane.actors.append_release import ReleasingAppends
from sessionlane.actors.awaited import AwaitingTable
from sessionlane.actors.lease_table import LeasePolicy
from sessionlane.actors.reclaim import DoneAppend, HeldRecord, LeaseRecord, ReclaimBook, digest
from sessionlane.actors.session_file_commit import SyncFailure
from sessionlane.actors.session_file_core import FileCore
from sessionlane.actors.session_file_disk import WriteOutcome
from sessionlane.actors.session_file_effects import Answer, Deliver, Resent, WriteRecord
from sessionlane.actors.session_file_write_effects import WriteOut
from sessionlane.actors.session_file_writes import Commit, WritePath
from sessionlane.messages.errors import LeaseRevoked, UnknownOutcome
from sessionlane.messages.wire import (
    Acquire,
    Append,
    Appended,
    Error,
    Granted,
    ReclaimTicket,
    Release,
)
from sessionlane.system.client import _ops as ops
from sessionlane.system.client._core import ClientCore, ConnectionLost

LEASE, FENCE, AID = "ab-7", 7, "aid-00000001"
SECRET = "s3cret-s3cret-s3cret"


def restarted(depth: int) -> Any:
    """A core activated from a record whose holder (lane ``a``, ``depth`` levels) wrote the
    append ``AID`` before the restart, and took its lease back."""
    c = new_core()
    c.size = 10
    held = HeldRecord(LEASE, FENCE, "a", ("prompt",) * depth, "interactive", digest(SECRET), None)
    record = LeaseRecord(held, 1, 10, (DoneAppend(AID, 0, 1, FENCE),))
    assert c.activate(record, NOW, NOW + 10_000, 0.0) is None
    ticket = ReclaimTicket(lease=LEASE, fence=FENCE, secret=SECRET)
    reclaim = Acquire(lane="a", path=PATH, purpose="prompt", reclaim=ticket)
    effects = read(c, c.call(call("a", reclaim, 1), NOW))
    assert any(isinstance(fx, Answer) and isinstance(fx.message, Granted) for fx in effects)
    return c


def resend(c: Any, rid: int, lane: str = "a") -> list[Any]:
    append = Append(lease=LEASE, fence=FENCE, records=[{"n": 1}], aid=AID, release=True)
    return read(c, c.call(call(lane, append, rid), NOW))


def test_an_append_written_before_a_restart_but_not_released_releases_when_resent() -> None:
    c = restarted(depth=1)
    waiter = read(c, c.call(call("b", Acquire(lane="b", path=PATH, purpose="prompt"), 2), NOW))
    assert not any(isinstance(fx, Answer) and isinstance(fx.message, Granted) for fx in waiter)
    effects = resend(c, 3)
    grants = [i for i, fx in enumerate(effects) if isinstance(fx, Answer) and fx.lane == "b"]
    [answer] = [i for i, fx in enumerate(effects) if isinstance(fx, Resent)]
    assert grants and grants[0] < answer, "the waiter is granted before the resend is answered"
    first = effects[answer].message
    assert isinstance(first, Appended) and first.released and (first.offset, first.lines) == (0, 1)
    assert c.table.holder is not None and c.table.holder.lane == "b"
    # Sent once more (its answer lost again): answered from the record, released once only.
    again = [fx for fx in resend(c, 4) if isinstance(fx, Resent)]
    assert again and again[0].message.released
    assert c.table.holder is not None and c.table.holder.lane == "b"


def test_an_append_that_released_one_level_is_not_released_again_when_resent() -> None:
    c = restarted(depth=2)
    resend(c, 2)
    assert c.table.holder is not None and len(c.table.holder.purposes) == 1
    assert c.book.record.released and c.book.record.released[-1].done.aid == AID
    resend(c, 3)  # the record says it released: the outer level stays
    assert c.table.holder is not None and len(c.table.holder.purposes) == 1


def test_another_lane_cannot_resend_an_append_that_released_to_release_again() -> None:
    c = restarted(depth=2)
    effects = resend(c, 2, lane="intruder")
    assert not any(isinstance(fx, Resent) for fx in effects)
    assert c.table.holder is not None and len(c.table.holder.purposes) == 2


class Shell:
    """The shell's loop over a ``FileCore`` (as ``tests/test_file_core_model.py``'s), every
    write succeeding and every sync as ``sync_fails`` says; what it delivers, in order."""

    def __init__(self, c: FileCore) -> None:
        self.c = c
        self.out: list[tuple[Any, Any]] = []
        self.record = c.book.record
        self.sync_fails = False

    def send(self, lane: str, request: Any, rid: int, *, end: bool = True) -> list[Any]:
        """Deliver ``request``; ``end``: the message ends the pass (its acks are synced)."""
        c, before = self.c, len(self.out)
        lane_call = call(lane, request, rid)
        c.met(lane_call)
        c.push(c.call(lane_call, NOW))
        self.run()
        if end:
            if c.after_message():
                self.run()
                c.pass_ended(NOW)
            self.run()
            if (record := c.record_now()) is not None:
                self.perform(record)
        return [m for lane, m in self.out[before:]]

    def answers(self, lane: str) -> list[Any]:
        return [m for to, m in self.out if to == lane]

    def run(self) -> None:
        c = self.c
        while True:
            while (fx := c.next(NOW)) is not None:
                self.perform(fx)
            if not c.unsettled:
                return
            c.settle(NOW, 0.0)

    def perform(self, fx: Any) -> None:
        c = self.c
        match fx:
            case Deliver(message=reply):
                self.out.append((reply.lane, reply.message))
            case WriteOut(op=op, rest=rest):
                size = c.size + 1 + len(rest)
                c.written(op, WriteOutcome(offset=c.size), NOW, 1, size, rest)
            case Commit():
                failed = SyncFailure("disk_full", "fdatasync failed") if self.sync_fails else None
                c.committed(failed)
            case WriteRecord(record=record):
                self.record = record


def new_core(fence_floor: int = FENCE) -> FileCore:
    table = AwaitingTable(PATH, LeasePolicy(), fence_floor=fence_floor)
    writes = WritePath(
        PATH,
        legacy=False,
        tail_unchecked=False,
        durability="fsync",
        max_record_bytes=100,
        unsynced=lambda: False,
    )
    c = FileCore(PATH, table, writes, ReclaimBook(), new_secret=lambda: SECRET)
    c.ino = 1
    return c


def fused(lease: Granted, aid: str) -> Append:
    return Append(lease=lease.lease, fence=lease.fence, records=[{"n": 1}], aid=aid, release=True)


def test_a_resend_after_the_next_holder_released_too_is_answered_as_written() -> None:
    s = Shell(new_core())
    [a] = s.send("a", Acquire(lane="a", path=PATH, purpose="prompt"), 1)
    s.send("b", Acquire(lane="b", path=PATH, purpose="prompt"), 2)
    [first] = [m for m in s.send("a", fused(a, "aid-a-000001"), 3) if isinstance(m, Appended)]
    [b] = [m for m in s.answers("b") if isinstance(m, Granted)]
    s.send("b", fused(b, "aid-b-000001"), 4)  # the next holder's own append and release
    assert s.c.table.holder is None
    # The slow client resends (its answer was lost): answered as written, nothing written.
    size = s.c.size
    [again] = s.send("a", fused(a, "aid-a-000001"), 5)
    assert isinstance(again, Appended) and again.released
    assert (again.offset, again.lines, again.fence) == (first.offset, first.lines, first.fence)
    assert s.c.size == size and s.c.table.holder is None


def test_each_release_of_a_nested_lease_is_remembered_across_a_restart() -> None:
    s = Shell(new_core())
    for rid in (1, 2, 3):  # three levels
        [a] = s.send("a", Acquire(lane="a", path=PATH, purpose="prompt"), rid)
    assert isinstance(a, Granted)
    s.send("a", fused(a, "aid-a-000001"), 4)
    s.send("a", fused(a, "aid-a-000002"), 5)
    assert s.c.table.holder is not None and len(s.c.table.holder.purposes) == 1
    record = s.record  # the service is killed: what the sidecar holds
    assert record.held is not None and len(record.held.purposes) == 1
    r = Shell(new_core(fence_floor=record.held.fence))  # the durable fence reservation
    r.c.ino, r.c.size = record.ino, record.size
    assert r.c.activate(record, NOW, NOW + 10_000, 0.0) is None
    ticket = ReclaimTicket(lease=a.lease, fence=a.fence, secret=SECRET)
    [back] = r.send("a", Acquire(lane="a", path=PATH, purpose="prompt", reclaim=ticket), 1)
    assert isinstance(back, Granted)
    for rid, aid in ((2, "aid-a-000001"), (3, "aid-a-000002")):
        [again] = r.send("a", fused(a, aid), rid)  # both answers were lost
        assert isinstance(again, Appended) and again.released
        holder = r.c.table.holder
        assert holder is not None and holder.lease == a.lease and len(holder.purposes) == 1, (
            f"the resend of {aid} released a level again"
        )


def test_a_copy_under_another_call_key_waits_for_the_sync_its_release_waits_for() -> None:
    s = Shell(new_core())
    [a] = s.send("a", Acquire(lane="a", path=PATH, purpose="prompt"), 1)
    s.send("b", Acquire(lane="b", path=PATH, purpose="prompt"), 2)
    s.sync_fails = True
    assert s.send("a", fused(a, "aid-a-000001"), 3, end=False) == []  # held for its sync
    copy = s.send("a", fused(a, "aid-a-000001"), 4, end=False)  # after a reconnect
    assert copy == [], "a copy answered before the sync its release waits for"
    s.send("a", Release(lease="no-such-lease"), 5)  # the pass ends; its sync fails
    answers = [m for m in s.answers("a") if m.id in (3, 4)]
    assert sorted(m.id for m in answers) == [3, 4]
    assert all(isinstance(m, Error) and m.code == "disk_full" for m in answers), answers
    holder = s.c.table.holder
    assert holder is not None and holder.lease == a.lease, "the lease is held: nothing released"
    assert not any(isinstance(m, Granted) for m in s.answers("b"))


def test_an_append_and_release_whose_sync_failed_is_written_again_when_resent() -> None:
    s = Shell(new_core())
    [a] = s.send("a", Acquire(lane="a", path=PATH, purpose="prompt"), 1)
    s.send("b", Acquire(lane="b", path=PATH, purpose="prompt"), 2)
    s.sync_fails = True
    [failed] = s.send("a", fused(a, "aid-a-000001"), 3)
    assert isinstance(failed, Error) and failed.code == "disk_full"
    assert not any(d.aid == "aid-a-000001" for d in s.record.appends), "kept as written"
    s.sync_fails = False
    size = s.c.size
    answers = s.send("a", fused(a, "aid-a-000001"), 4)  # the client retries it
    assert s.c.size > size, "not written again: answered from the record, never synced"
    assert [type(m) for m in answers] == [Granted, Appended] and answers[1].released


def test_a_copy_under_another_call_key_is_answered_released_after_the_grant() -> None:
    s = Shell(new_core())
    [a] = s.send("a", Acquire(lane="a", path=PATH, purpose="prompt"), 1)
    s.send("b", Acquire(lane="b", path=PATH, purpose="prompt"), 2)
    s.send("a", fused(a, "aid-a-000001"), 3, end=False)
    s.send("a", fused(a, "aid-a-000001"), 4)  # a copy after a reconnect; the sync succeeds
    order = [(to, type(m).__name__) for to, m in s.out if m.id in (2, 3, 4)]
    assert order == [("b", "Queued"), ("b", "Granted"), ("a", "Appended"), ("a", "Appended")]
    acks = [m for to, m in s.out if to == "a" and m.id in (3, 4)]
    assert [m.id for m in acks] == [3, 4] and all(
        isinstance(m, Appended) and m.released for m in acks
    )
    assert s.c.table.holder is not None and s.c.table.holder.lane == "b"
    assert s.c.table.counters["releases"] == 1, "released once for the two answers"


def test_a_release_resent_on_an_append_whose_first_send_waits_for_its_sync_waits_for_it() -> None:
    """The first send had no release and its ack waits for its sync; a resend of the same
    ``aid`` (another call key) asks to release too: it is answered, and releases, only after
    that sync, and only if it succeeds (before, it released at once and said "written")."""
    for fails in (True, False):
        s = Shell(new_core())
        [a] = s.send("a", Acquire(lane="a", path=PATH, purpose="prompt"), 1)
        s.send("b", Acquire(lane="b", path=PATH, purpose="prompt"), 2)
        s.sync_fails = fails
        plain = Append(lease=a.lease, fence=a.fence, records=[{"n": 1}], aid="aid-a-000001")
        assert s.send("a", plain, 3, end=False) == []  # held for its sync
        resent = s.send("a", fused(a, "aid-a-000001"), 4, end=False)
        assert resent == [], f"answered {resent} before the sync of the append"
        assert s.c.table.holder is not None and s.c.table.holder.lease == a.lease
        s.send("a", Release(lease="no-such-lease"), 5)  # the pass ends: its sync
        answers = {m.id: m for m in s.answers("a") if m.id in (3, 4)}
        assert sorted(answers) == [3, 4]
        holder = s.c.table.holder
        if fails:
            assert all(isinstance(m, Error) for m in answers.values()), answers
            assert holder is not None and holder.lease == a.lease, "released: sync failed"
            assert not any(isinstance(m, Granted) for m in s.answers("b"))
        else:
            assert isinstance(answers[3], Appended) and not answers[3].released
            assert isinstance(answers[4], Appended) and answers[4].released
            assert holder is not None and holder.lane == "b"
            assert s.c.table.counters["releases"] == 1


# The client's side of a resend ----------------------------------------------------------------


def suspended_lease() -> tuple[ClientCore[str, None], ops.LeaseView]:
    """A lease of a client whose connection was lost with the service (``reconnect_for``)."""
    client: ClientCore[str, None] = ClientCore(SETTINGS)
    granted = Granted(
        id=1, lease="L1", fence=7, path="/s/a.jsonl", purpose="prompt", secret="s" * 16
    )
    state = client.track(granted, lane="a")
    state.suspended = True
    return client, ops.LeaseView(state, "a")


def test_the_client_resends_an_append_that_released_when_its_lease_is_not_reclaimed() -> None:
    client, lease = suspended_lease()
    refused = Error(id="r", code="reclaim_refused", detail="no longer held", path="/s/a.jsonl")
    answered = Appended(id=2, offset=0, lines=1, fence=7, released=True)
    op = ops.lease_append(client, lease, [{"n": 1}], None, True)
    requests, result = run(op, refused, answered)
    reclaim, resent = requests
    assert isinstance(reclaim, Acquire) and reclaim.reclaim is not None
    assert isinstance(resent, Append) and resent.release and resent.aid is not None
    assert (result.offset, result.lines, result.fence) == (0, 1, 7)
    assert lease.level_released and "L1" not in client.leases


def test_a_plain_append_or_a_refused_resend_still_reports_the_lease_lost() -> None:
    refused = Error(id="r", code="reclaim_refused", detail="no longer held", path="/s/a.jsonl")
    stale = Error(id=2, code="stale_fence", detail="not current", path="/s/a.jsonl")
    client, lease = suspended_lease()
    with pytest.raises(LeaseRevoked):
        run(ops.lease_append(client, lease, [{"n": 1}], None, True), refused, stale)
    client, lease = suspended_lease()
    with pytest.raises(LeaseRevoked):  # no release: not sent again
        run(ops.lease_append(client, lease, [{"n": 1}], None, False), refused)


def test_a_sent_append_that_releases_refused_after_a_loss_is_of_unknown_outcome() -> None:
    """Its answer was lost with the service, the reclaim is refused and the resend is answered
    ``stale_fence``: it may well be in the file (the lease record keeps only the file's last
    appends that released; the next holder, granted by this one, may have released since), so
    never "not written"."""
    client, lease = suspended_lease()
    lease.state.suspended = False
    refused = Error(id="r", code="reclaim_refused", detail="no longer held", path="/s/a.jsonl")
    stale = Error(id=2, code="stale_fence", detail="not current", path="/s/a.jsonl")
    op = ops.lease_append(client, lease, [{"n": 1}], None, True)
    step = ops.advance(op, None)
    assert isinstance(step, ops.Call) and isinstance(step.request, Append)
    lease.state.suspended = True  # the connection is lost with the service after the send
    step = ops.advance(op, ConnectionLost("the service went away"))
    assert isinstance(step, ops.Call) and isinstance(step.request, Acquire)  # the reclaim
    step = ops.advance(op, refused)
    assert isinstance(step, ops.Call) and isinstance(step.request, Append)  # sent once more
    with pytest.raises(UnknownOutcome) as caught:
        ops.advance(op, stale)
    assert caught.value.reason == "restart"


def test_a_release_forgotten_after_a_failed_sync_leaves_nothing_behind() -> None:
    releasing = ReleasingAppends()
    for n in range(3):
        reply = Appended(id=n, offset=0, lines=1, fence=7, released=True)
        releasing.hold(("call", n), releasing.release("a", "L1", f"aid-{n:05d}", reply))
        releasing.forget(("call", n))  # its sync failed: the lease stays held
    assert not releasing and not releasing.held and not releasing.keys
