"""An owner keeps the leases of a lost convention member's lanes for their holders' reclaim.

When the member a client is connected to dies (the leader, or any member), each owner of a
file that client held sees that origin lost. With ``reclaim_grace_ms`` > 0 the owner's
Registry tells the file so (``CarriedLost.keep_ms``) and the file's core
(``FileCore.abandon_lane``) ends the lane's waits but keeps its lease as the table's awaited
holder, as after a restart, until its holder reclaims it (with its secret, through another
lane) or the grace ends. Driven here by message order and a plain
number for the clock; the real ``kill -9`` is in ``test_convention_faults.py``.
"""

from __future__ import annotations

from typing import Any

from test_convention import HERE, THERE, Clock, FakeHost, acknowledge, forwarded
from test_session_file_core import read  # the core's effects as the shell reads them

from sessionlane.actors import lease_table as lt
from sessionlane.actors.awaited import AwaitingTable
from sessionlane.actors.federation import Federation
from sessionlane.actors.lease_table import LeasePolicy
from sessionlane.actors.reclaim import HeldRecord, ReclaimBook, digest
from sessionlane.actors.session_file_core import Answer, FileCore, Warn
from sessionlane.actors.session_file_writes import Reply, WritePath
from sessionlane.messages.carried import CarriedLost
from sessionlane.messages.convention import Forwarded, Members, OriginLost
from sessionlane.messages.internal import LaneCall, LaneRef, OpenChannel
from sessionlane.messages.wire import (
    Abandoned,
    Acquire,
    Append,
    Error,
    Granted,
    Queued,
    ReclaimTicket,
)

PATH = "/srv/there/t.jsonl"
NOW = 1_000.0
GRACE = 10_000
SECRET = "s3cret-0123456789abcdef"


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
    return FileCore(PATH, table, writes, ReclaimBook(), new_secret=lambda: SECRET)


def call(uid: str, request: Any, rid: int) -> LaneCall:
    ref = LaneRef(uid=uid, name="agent", address=f"lane:{uid}")  # one lane name, many routes
    return LaneCall(
        lane=ref, path=PATH, canonical=True, request=request.model_copy(update={"id": rid})
    )


def serve(c: FileCore, lane_call: LaneCall, now: float) -> list[Any]:
    """The shell's ``serve``: the core meets the lane, then decides."""
    c.met(lane_call)
    return read(c, c.call(lane_call, now)) + pushed(c)


def pushed(c: FileCore) -> list[Any]:
    """What the core put on its worklist (``abandon`` and ``came_back`` push), read as above."""
    work = list(c.work)
    c.work.clear()
    return read(c, work)


def lost(c: FileCore, uid: str, now: float, keep_ms: int = GRACE) -> list[Any]:
    """The shell's ``on_carried_lost`` for the lane ``uid``: what the core decides."""
    c.abandon(uid, now, "member lost: silent", tell=True, keep_ms=keep_ms)
    return pushed(c)


def answers(effects: list[Any]) -> list[tuple[str, Any]]:
    """(lane uid, reply) of every answer among ``effects``, the table's and the writes'."""
    found = [(fx.lane, fx.message) for fx in effects if isinstance(fx, Answer)]
    return found + [(fx.call.lane.uid, fx.message) for fx in effects if isinstance(fx, Reply)]


def held_then_lost(*, recorded: bool = True) -> tuple[FileCore, Granted]:
    """Lane ``far`` (of a member now lost) holds the file, ``near`` waits; the origin is lost.

    ``recorded``: the lease record names the lease (the shell writes it after each grant)."""
    c = core()
    [(_, granted)] = answers(
        serve(c, call("far", Acquire(lane="agent", path=PATH, purpose="prompt"), 1), NOW)
    )
    assert isinstance(granted, Granted)
    if recorded:
        held = HeldRecord(
            lease=granted.lease,
            fence=granted.fence,
            lane="agent",
            purposes=("prompt",),
            priority="interactive",
            secret_digest=digest(SECRET),
            hold_until_ms=None,
        )
        c.book.held(held, ino=1, size=0)
    [(_, queued)] = answers(
        serve(c, call("near", Acquire(lane="agent", path=PATH, purpose="prompt"), 2), NOW)
    )
    assert isinstance(queued, Queued)
    effects = lost(c, "far", NOW + 10)
    [(lane, abandoned), *granted_next] = answers(effects)
    assert lane == "far" and isinstance(abandoned, Abandoned)
    assert bool(granted_next) != recorded, "the waiter is granted at once only if not kept"
    assert abandoned.leases == ([] if recorded else [granted.lease]), "kept: not abandoned"
    return c, granted


def reclaim(c: FileCore, uid: str, granted: Granted, now: float) -> list[Any]:
    """What the shell does with a reclaim (``SessionFile.reclaim``): the record, then the table."""
    ticket = ReclaimTicket(lease=granted.lease, fence=granted.fence, secret=SECRET)
    key = (uid, 9)
    why = c.book.refusal(ticket, ino=1, size=0)
    if why is not None:
        return [c.table.refuse_reclaim(key, uid, why)]
    c.book.issue(ticket.lease, ticket.secret)
    return c.table.reclaim(key, uid, ticket.lease, ticket.fence, now)


def test_a_lost_origins_lease_stays_held_for_the_grace_and_then_goes_to_the_next_waiter() -> None:
    c, granted = held_then_lost()
    holder = c.table.holder
    assert (
        holder is not None
        and holder.state == "awaiting"
        and str(holder.lane) == ("agent (awaiting reclaim)")
    )
    # Still held: nobody is granted, and nobody writes under it without a reclaim (its own
    # lost lane speaking again ends it: the last test).
    for uid in ("near", "stranger"):
        write = Append(lease=granted.lease, fence=granted.fence, records=[{}])
        [(_, refused), *_] = answers(serve(c, call(uid, write, 4), NOW + 20))
        assert isinstance(refused, Error) and refused.code == "stale_fence"
    assert c.table.next_deadline() == NOW + 10 + GRACE
    assert c.table.tick(NOW + 10 + GRACE - 1) == []

    effects = [out for fx in c.table.tick(NOW + 10 + GRACE) for out in c.meaning(fx)]
    [(lane, next_grant)] = answers(effects)
    assert lane == "near" and isinstance(next_grant, Granted)
    assert next_grant.fence > granted.fence
    assert any(isinstance(fx, Warn) and "not reclaimed" in fx.message for fx in effects)
    assert c.table.counters["reclaims_expired"] == 1
    late = reclaim(c, "again", granted, NOW + 10 + GRACE + 1)
    assert isinstance(late[0], lt.Reject) and late[0].code == "reclaim_refused"


def test_its_holder_reclaims_the_same_lease_and_fence_through_another_route() -> None:
    c, granted = held_then_lost()
    [grant, _] = reclaim(c, "via-restarted-member", granted, NOW + 500)
    assert grant == lt.Grant(
        ("via-restarted-member", 9), "via-restarted-member", granted.lease, granted.fence, "prompt"
    )
    assert c.table.check_write("via-restarted-member", granted.lease, granted.fence) is None
    assert c.table.check_write("far", granted.lease, granted.fence) is not None
    wrong = ReclaimTicket(
        lease=granted.lease, fence=granted.fence, secret="a-guess-0123456789abcdef"
    )
    assert c.book.refusal(wrong, ino=1, size=0) is not None, "the secret is checked"
    # The grace no longer applies: the waiter still waits for a release.
    assert c.table.tick(NOW + 10 + GRACE) == []
    assert [w.lane for w in c.table.waiters] == ["near"]


def test_a_lease_its_record_does_not_name_cannot_be_reclaimed_and_is_abandoned_at_once() -> None:
    c, _ = held_then_lost(recorded=False)
    holder = c.table.holder
    assert holder is not None and holder.lane == "near", "the waiter was granted at once"


def test_a_stopping_file_drops_an_awaited_holder_without_telling_anyone() -> None:
    c, _ = held_then_lost()
    effects = c.table.shutdown(NOW + 20)
    assert not any(isinstance(fx, lt.Revoke) for fx in effects), "nobody to tell"
    assert c.table.holder is None and c.book.record.held is not None, "the record stays"


def test_an_owner_keeps_a_lost_origins_leases_only_when_the_grace_is_set() -> None:
    for grace in (GRACE, 0):
        host, clock = FakeHost(), Clock()
        owner = Federation(host, THERE, 2_000, clock=clock, reclaim_grace_ms=grace)
        owner.handle(forwarded(PATH, "lane@a1"), "relay")
        host.active = {PATH}
        owner.handle(OriginLost(origin="reg@a", reason="silent"), "relay")
        ((path, peers, _),) = host.dropped
        assert (path, peers, host.kept_ms) == (PATH, ["lane@a1"], [grace])
    assert CarriedLost(path=PATH, peers=(), reason="r").keep_ms == 0, "none unless asked"


def test_a_reclaim_that_comes_before_the_owner_saw_the_origin_lost_moves_the_lease() -> None:
    """The client's reclaim through the restarted member can beat the owner's own watchdog
    (both wait about ``member_timeout_ms``): shown with the secret under the recorded lane
    name, the lease moves to the new lane; the old one is told, and can no longer write."""
    c = core()
    [(_, granted)] = answers(
        serve(c, call("far", Acquire(lane="agent", path=PATH, purpose="prompt"), 1), NOW)
    )
    assert isinstance(granted, Granted)
    # Not the recorded lane name, or no takeover asked: refused as before.
    refused = c.table.reclaim(("x", 1), "x", granted.lease, granted.fence, NOW + 1)
    assert isinstance(refused[0], lt.Reject) and refused[0].code == "reclaim_refused"

    moved = c.table.reclaim(("new", 2), "new", granted.lease, granted.fence, NOW + 2, takeover=True)
    assert moved[:2] == [
        lt.Revoke("far", granted.lease, "member_lost"),
        lt.Grant(("new", 2), "new", granted.lease, granted.fence, "prompt"),
    ]
    assert c.table.check_write("new", granted.lease, granted.fence) is None
    assert c.table.check_write("far", granted.lease, granted.fence) is not None
    # The owner then sees the old origin lost: nothing of the lease is touched.
    lost(c, "far", NOW + 3)
    holder = c.table.holder
    assert holder is not None and (holder.lane, holder.state) == ("new", "held")


def test_a_reclaim_in_flight_when_its_owner_is_lost_is_held_for_it_not_refused() -> None:
    """A restarted member's first relay to an owner that has not registered with it yet
    fails: the first contact of a client's reclaim sent on it waits for the owner, as one
    sent while the owner is lost does, instead of being refused ``unavailable`` (which
    revokes the lease)."""
    host, clock = FakeHost(), Clock()
    fed = Federation(host, HERE, 2_000, clock=clock, reclaim_grace_ms=GRACE)
    fed.on_members(Members(version=1, members=[HERE, THERE]), None)
    assert fed.route_open(OpenChannel(path=PATH, nonce=7, reclaim=True), "lane1")
    clock.now += 2_001
    fed.tick()  # lost before it confirmed anything
    assert host.refused() == [], "held, not refused"
    clock.now += 3_000
    fed.tick()  # probed again (a new relay) ...
    acknowledge(fed, host)  # ... which answers: the first contact goes to it again
    sent = [m.open.nonce for _, m in host.sent if isinstance(m, Forwarded)]
    assert sent == [7, 7]


def test_the_kept_lanes_own_return_drops_the_lease_and_grants_the_next_waiter() -> None:
    """Its member was only paused or cut off: its lane speaks again (here, its member's
    reclaim on its behalf). Its client may have given the lease up meanwhile, so the lane
    gets it back never; the next waiter is granted at once, as without a grace."""
    c, granted = held_then_lost()
    assert c.table.came_back("near", NOW + 20) == [], "another lane: nothing changes"
    ticket = ReclaimTicket(lease=granted.lease, fence=granted.fence, secret=SECRET)
    again = Acquire(lane="agent", path=PATH, purpose="prompt", reclaim=ticket)
    found = dict(answers(serve(c, call("far", again, 5), NOW + 20)))
    assert isinstance(found["near"], Granted) and found["near"].fence > granted.fence
    assert isinstance(found["far"], Error) and found["far"].code == "reclaim_refused"
