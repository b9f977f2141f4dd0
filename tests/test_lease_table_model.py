"""A Hypothesis stateful model of ``LeaseTable``: many lanes, two paths, a fake clock.

Every call's effects are replayed, in order, against a simple model of each path (holder,
waiters in arrival order, fences ever granted, reserved ceiling) and of every request (how many
answers it got). The rules assert what each call must answer; the effect replay and the
invariants assert the contract of ``actors/lease_table.py``:

- at most one holder per path, and no holder means an empty queue;
- fences strictly increase per path and never reach past the reserved ceiling, which is
  announced by ``ReserveFences`` before the grant that needs it, at most once per block;
- every request gets exactly one final answer (``Queue`` is a note, not an answer);
- recovery goes first; FIFO within a class; aging only helps earlier waiters; after
  ``2 * aging_ms`` no later arrival is served first; the grantee is the model's pick;
- no write is accepted but with the holder's current lease and fence;
- every ``Revoke`` names the holder's lease; a ``recovery`` revocation hands to the recovery.

``HYPOTHESIS_PROFILE=ci`` runs more examples, derandomized so that CI is reproducible.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from sessionlane.actors.lease_table import (
    Abandoned,
    AbortRequest,
    Diagnostic,
    Effect,
    Grant,
    LeasePolicy,
    LeaseTable,
    Queue,
    Reject,
    Released,
    ReserveFences,
    Revoke,
    Skip,
)
from sessionlane.messages.wire import OnContention, Priority, Purpose

LANES = ("a", "b", "c", "d")
PATHS = ("/sessions/alpha.jsonl", "/sessions/beta.jsonl")
BASE_RANK: dict[Priority, int] = {"background": 0, "interactive": 1, "recovery": 2}
TOP_RANK = 2  # the highest class aging reaches
RECOVERY_RANK = 3  # recovery requests go before every other waiter

# A former bug (see the recovery edge cases in tests/test_lease_table.py): a pending recovery
# waiter got the ordinary wait timeout, and when it left the queue unanswered the holder was
# still revoked "for a recovery" that was gone. False: the model expects the fixed behaviour
# (no wait timeout for a recovery, abort deadline cleared); True models the old table.
RECOVERY_ORPHAN_BUG = False

_CI = os.environ.get("HYPOTHESIS_PROFILE") == "ci"


@dataclass
class MHolder:
    lane: Hashable
    lease: str
    fence: int
    purposes: list[Purpose]
    granted_at: int
    hold_deadline: int | None
    abort_deadline: int | None = None
    orphaned_abort: bool = False
    """The recovery that asked this holder to abort left the queue unanswered (known bug)."""


@dataclass
class MWaiter:
    req: int
    lane: str
    purpose: Purpose
    priority: Priority
    arrival: int
    enqueued_at: int
    deadline: int | None
    max_hold_ms: int | None

    def rank(self, now: int, aging_ms: int) -> int:
        if self.purpose == "recovery":
            return RECOVERY_RANK
        base = BASE_RANK[self.priority]
        return min(TOP_RANK, max(base, base + (now - self.enqueued_at) // aging_ms))


@dataclass
class MPath:
    name: str
    table: LeaseTable
    prefix: str
    floor: int
    ceiling: int
    holder: MHolder | None = None
    waiters: list[MWaiter] = field(default_factory=list)
    fences: list[int] = field(default_factory=list)
    leases: dict[str, int] = field(default_factory=dict)
    closed: bool = False


def min_limit(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def snapshot(table: LeaseTable) -> tuple[object, ...]:
    holder = table.holder
    held: tuple[object, ...] | None = None
    if holder is not None:
        held = (holder.lease, holder.fence, holder.lane, tuple(holder.purposes))
        held += (holder.hold_deadline, holder.abort_deadline)
    queue = tuple((w.req, w.seq, w.deadline) for w in table.waiters)
    return (table.fence, table.fence_ceiling, table.closed, held, queue)


maybe_ms = st.one_of(st.none(), st.integers(0, 600))
purposes = st.sampled_from(["prompt", "write", "compaction"])
priorities = st.sampled_from(["background", "interactive", "recovery"])
path_index = st.integers(0, len(PATHS) - 1)
lanes = st.sampled_from(LANES)


class LeaseTableModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.steps = 0
        self.next_req = 0
        self.next_arrival = 0
        self.answers: Counter[int] = Counter()
        self.queued_notes: Counter[int] = Counter()
        self.paths: list[MPath] = []
        self.policy = LeasePolicy()

    # Set-up ------------------------------------------------------------------------------

    @initialize(
        max_hold_ms=st.one_of(st.none(), st.integers(1, 2_000)),
        wait_timeout_ms=st.one_of(st.none(), st.integers(0, 2_000)),
        aging_ms=st.integers(1, 300),
        max_queue=st.integers(0, 8),
        fence_block=st.integers(1, 4),
        floors=st.lists(st.integers(0, 10**6), min_size=len(PATHS), max_size=len(PATHS)),
    )
    def build(
        self,
        max_hold_ms: int | None,
        wait_timeout_ms: int | None,
        aging_ms: int,
        max_queue: int,
        fence_block: int,
        floors: list[int],
    ) -> None:
        self.policy = LeasePolicy(
            max_hold_ms=max_hold_ms,
            wait_timeout_ms=wait_timeout_ms,
            aging_ms=aging_ms,
            max_queue=max_queue,
            fence_block=fence_block,
        )
        for i, (name, floor) in enumerate(zip(PATHS, floors, strict=True)):
            prefix = f"p{i}-"
            table = LeaseTable(name, self.policy, floor, lease_prefix=prefix)
            self.paths.append(MPath(name, table, prefix, floor, ceiling=floor))

    # Rules -------------------------------------------------------------------------------

    @rule(i=path_index, lane=lanes, purpose=purposes)
    def acquire_whose_reservation_fails(self, i: int, lane: str, purpose: Purpose) -> None:
        """A free path's grant needs a fence reservation and it fails (a full disk): the grant
        is undone, the request gets the disk error, and the table is exactly as before."""
        p = self.paths[i]
        if p.closed or p.holder is not None or p.table.fence < p.table.fence_ceiling:
            return
        before = snapshot(p.table)
        grants = p.table.counters["grants"]
        req = self.new_req()
        reserve, grant = p.table.acquire(req, lane, purpose, self.now)
        assert isinstance(reserve, ReserveFences) and isinstance(grant, Grant)
        effects = p.table.reservation_failed(grant, "disk_full", "no space", self.now)
        assert effects == [Reject(req, lane, "disk_full", "no space")]
        assert snapshot(p.table) == before and p.table.counters["grants"] == grants
        self.answers[req] += 1

    @rule(
        i=path_index,
        lane=lanes,
        purpose=purposes,
        priority=priorities,
        on_contention=st.sampled_from(["wait", "wait", "fail", "skip"]),
        wait_timeout_ms=maybe_ms,
        max_hold_ms=st.one_of(st.none(), st.integers(1, 600)),
    )
    def acquire(
        self,
        i: int,
        lane: str,
        purpose: Purpose,
        priority: Priority,
        on_contention: OnContention,
        wait_timeout_ms: int | None,
        max_hold_ms: int | None,
    ) -> None:
        p = self.paths[i]
        req = self.new_req()
        holder = p.holder
        before = snapshot(p.table)
        timeout = wait_timeout_ms if wait_timeout_ms is not None else self.policy.wait_timeout_ms
        waiter = MWaiter(
            req=req,
            lane=lane,
            purpose=purpose,
            priority=priority,
            arrival=self.next_arrival,
            enqueued_at=self.now,
            deadline=None if timeout is None else self.now + timeout,
            max_hold_ms=max_hold_ms,
        )
        self.next_arrival += 1
        # What the call must answer, decided on the state before it.
        if p.closed:
            expected = "shutting_down"
        elif holder is not None and holder.lane == lane:
            expected = "reentrant"
        elif holder is None:
            expected = "granted"
        elif on_contention != "wait":
            expected = {"fail": "contended", "skip": "skipped"}[on_contention]
        elif len(p.waiters) >= self.policy.max_queue:
            expected = "queue_full"
        else:
            expected = "queued"

        effects = p.table.acquire(
            req,
            lane,
            purpose,
            self.now,
            priority=priority,
            on_contention=on_contention,
            wait_timeout_ms=wait_timeout_ms,
            max_hold_ms=max_hold_ms,
        )
        self.replay(p, effects, caller=req, pending=waiter)

        if expected == "reentrant":
            assert holder is not None
            assert effects == [Grant(req, lane, holder.lease, holder.fence, purpose, True)]
        elif expected == "granted":
            assert isinstance(effects[-1], Grant) and effects[-1].req == req, effects
            assert all(isinstance(e, ReserveFences) for e in effects[:-1]), effects
        elif expected == "queued":
            assert len(effects) == 1 and isinstance(effects[0], Queue), effects
        elif expected == "skipped":
            assert effects == [Skip(req, lane)], effects
            assert snapshot(p.table) == before
        else:
            assert len(effects) == 1 and isinstance(effects[0], Reject), effects
            assert effects[0].code == expected, effects
            assert snapshot(p.table) == before

    @rule(
        i=path_index,
        lane=lanes,
        purpose=purposes,
        priority=priorities,
        wait_timeout_ms=maybe_ms,
    )
    def queue_up(
        self, i: int, lane: str, purpose: Purpose, priority: Priority, wait_timeout_ms: int | None
    ) -> None:
        """The common case, drawn more often so that queues grow: wait, no max hold."""
        self.acquire(i, lane, purpose, priority, "wait", wait_timeout_ms, None)

    @rule(
        i=path_index,
        crowd=st.lists(
            st.tuples(lanes, purposes, priorities, st.integers(0, 150)), min_size=2, max_size=6
        ),
    )
    def crowd_arrives(self, i: int, crowd: list[tuple[str, Purpose, Priority, int]]) -> None:
        """Several lanes ask in quick succession, so that queues of mixed classes build up."""
        for lane, purpose, priority, dt in crowd:
            self.advance(dt, punctual=True)
            self.acquire(i, lane, purpose, priority, "wait", None, None)

    @precondition(lambda self: any(p.holder is not None for p in self.paths))
    @rule(data=st.data())
    def holder_releases(self, data: st.DataObject) -> None:
        """The common case, drawn more often so that the queue moves: the holder lets go."""
        held = [i for i, p in enumerate(self.paths) if p.holder is not None]
        self.release(data.draw(st.sampled_from(held)), "holder", data)

    @rule(
        i=path_index,
        which=st.sampled_from(["holder", "holder", "other lane", "old lease", "made up"]),
        data=st.data(),
    )
    def release(self, i: int, which: str, data: st.DataObject) -> None:
        p = self.paths[i]
        holder = p.holder
        if which == "holder" and holder is not None:
            lane, lease = holder.lane, holder.lease
        elif which == "other lane" and holder is not None:
            lane = data.draw(st.sampled_from([x for x in LANES if x != holder.lane]))
            lease = holder.lease
        elif which == "old lease" and p.leases:
            lane, lease = data.draw(lanes), data.draw(st.sampled_from(sorted(p.leases)))
        else:
            lane = data.draw(lanes)
            lease = p.prefix + str(data.draw(st.integers(-1, 10**6 + 10)))
        req = self.new_req()
        before = snapshot(p.table)
        effects = p.table.release(req, lane, lease, self.now)
        if holder is not None and holder.lane == lane and holder.lease == lease:
            freed = len(holder.purposes) == 1
            assert effects[0] == Released(req, lane, lease, freed=freed), effects
            if not freed:
                assert len(effects) == 1, effects
        else:
            assert len(effects) == 1 and isinstance(effects[0], Reject), effects
            assert effects[0].code == "not_holder", effects
            assert snapshot(p.table) == before
        self.replay(p, effects, caller=req)

    @rule(i=path_index, lane=lanes)
    def abandon(self, i: int, lane: str) -> None:
        p = self.paths[i]
        holder = p.holder
        mine = [w.req for w in p.waiters if w.lane == lane]
        req = self.new_req()
        effects = p.table.abandon(req, lane, self.now, reason="agent gone")

        held = holder is not None and holder.lane == lane
        diagnostics = [e for e in effects if isinstance(e, Diagnostic)]
        if holder is not None and held:
            assert len(diagnostics) == 1, effects
            for part in (
                f"path={p.name}",
                f"lane={lane}",
                f"lease={holder.lease}",
                f"held_ms={self.now - holder.granted_at}",
                "reason=agent gone",
            ):
                assert part in diagnostics[0].message, (part, diagnostics)
        cancelled = {e.req: e.code for e in effects if isinstance(e, Reject)}
        assert cancelled == dict.fromkeys(mine, "abandoned"), effects
        leases = (holder.lease,) if holder is not None and held else ()
        assert Abandoned(req, lane, leases) in effects, effects
        self.replay(p, effects, caller=req)

    @rule(i=path_index, lane=lanes, grace_ms=st.integers(0, 400))
    def recover(self, i: int, lane: str, grace_ms: int) -> None:
        p = self.paths[i]
        holder = p.holder
        req = self.new_req()
        before = snapshot(p.table)
        timeout = self.policy.wait_timeout_ms if RECOVERY_ORPHAN_BUG else None
        waiter = MWaiter(
            req=req,
            lane=lane,
            purpose="recovery",
            priority="recovery",
            arrival=self.next_arrival,
            enqueued_at=self.now,
            deadline=None if timeout is None else self.now + timeout,
            max_hold_ms=None,
        )
        self.next_arrival += 1
        pending = any(w.purpose == "recovery" for w in p.waiters)
        running = holder is not None and "recovery" in holder.purposes
        effects = p.table.recover(req, lane, grace_ms, self.now, reason="stuck")
        self.replay(p, effects, caller=req, pending=waiter)

        if p.closed or pending or running:
            code = "shutting_down" if p.closed else "contended"
            assert len(effects) == 1 and isinstance(effects[0], Reject), effects
            assert effects[0].code == code, effects
            assert snapshot(p.table) == before
        elif holder is None:
            assert isinstance(effects[-1], Grant) and effects[-1].req == req, effects
            assert effects[-1].purpose == "recovery"
        else:
            assert effects[:2] == [
                Queue(req, lane, 1),
                AbortRequest(holder.lane, holder.lease, grace_ms),
            ]
            assert isinstance(effects[2], Diagnostic) and "reason=stuck" in effects[2].message
            timed_out = RECOVERY_ORPHAN_BUG and self.policy.wait_timeout_ms == 0  # known bug
            if grace_ms == 0 and not timed_out:
                assert any(isinstance(e, Grant) and e.req == req for e in effects), effects

    @rule(
        i=path_index,
        lane=lanes,
        lease_kind=st.sampled_from(["current", "old", "made up"]),
        fence_kind=st.sampled_from(["current", "old", "made up"]),
        compaction=st.booleans(),
        data=st.data(),
    )
    def check_write(
        self,
        i: int,
        lane: str,
        lease_kind: str,
        fence_kind: str,
        compaction: bool,
        data: st.DataObject,
    ) -> None:
        p = self.paths[i]
        holder = p.holder
        old = data.draw(st.sampled_from(p.fences)) if p.fences else p.floor
        made_up = data.draw(st.integers(-5, 10**6 + 100))
        fence = {"current": holder.fence if holder else old, "old": old}.get(fence_kind, made_up)
        lease = {
            "current": holder.lease if holder else f"{p.prefix}{old}",
            "old": f"{p.prefix}{old}",
        }.get(lease_kind, f"{p.prefix}{made_up}")
        writer: Hashable = holder.lane if holder and data.draw(st.booleans()) else lane
        before = snapshot(p.table)

        refusal = p.table.check_write(
            writer, lease, fence, purpose="compaction" if compaction else None
        )

        assert snapshot(p.table) == before
        if holder is None or (holder.lease, holder.fence) != (lease, fence):
            assert refusal is not None and refusal[0] == "stale_fence", refusal
        elif holder.lane != writer or (compaction and "compaction" not in holder.purposes):
            assert refusal is not None and refusal[0] == "not_holder", refusal
        else:
            assert refusal is None, (writer, lease, fence, holder)

    @rule(dt=st.integers(0, 400), punctual=st.booleans())
    def advance(self, dt: int, punctual: bool) -> None:
        """Move the fake clock; a punctual caller ticks at every deadline on the way, a late
        one (a delayed wakeup) only at the end."""
        target = self.now + dt
        for _ in range(1_000):
            if not punctual:
                break
            due = [d for p in self.paths if (d := p.table.next_deadline()) is not None]
            if not due or min(due) > target:
                break
            self.now = max(self.now, int(min(due)))
            self.tick_all()
        else:
            raise AssertionError("ticking at next_deadline() made no progress")
        self.now = target
        self.tick_all()

    @precondition(lambda self: self.steps >= 40 and not any(p.closed for p in self.paths))
    @rule(i=path_index)
    def shutdown(self, i: int) -> None:
        """Once, late: one path stops; the other goes on beside it."""
        p = self.paths[i]
        holder = p.holder
        waiting = {w.req for w in p.waiters}
        effects = p.table.shutdown(self.now)
        assert {e.req: e.code for e in effects if isinstance(e, Reject)} == dict.fromkeys(
            waiting, "shutting_down"
        )
        revokes = [e for e in effects if isinstance(e, Revoke)]
        if holder is None:
            assert revokes == []
        else:
            assert revokes == [Revoke(holder.lane, holder.lease, "shutdown")]
        self.replay(p, effects, caller=None)
        p.closed = True

    # Effect replay -----------------------------------------------------------------------

    def new_req(self) -> int:
        self.steps += 1
        self.next_req += 1
        return self.next_req

    def tick_all(self) -> None:
        for p in self.paths:
            due = self.due_timers(p)
            effects = p.table.tick(self.now)
            if not due:
                assert effects == [], (self.now, effects)
            self.replay(p, effects, caller=None)
            assert not self.due_timers(p), (self.now, p.holder, p.waiters)

    def due_timers(self, p: MPath) -> list[int]:
        times = [w.deadline for w in p.waiters if w.deadline is not None]
        if p.holder is not None:
            times += [t for t in (p.holder.hold_deadline, p.holder.abort_deadline) if t is not None]
        return [t for t in times if t <= self.now]

    def answer(self, req: object) -> None:
        assert isinstance(req, int) and 0 < req <= self.next_req, req
        assert self.answers[req] == 0, f"request {req} answered twice"
        self.answers[req] += 1

    def replay(
        self, p: MPath, effects: list[Effect], *, caller: int | None, pending: MWaiter | None = None
    ) -> None:
        """Check each effect against the model, in order, and apply it to the model."""
        for i, e in enumerate(effects):
            rest = effects[i + 1 :]
            match e:
                case ReserveFences(ceiling=ceiling):
                    assert ceiling >= p.ceiling + self.policy.fence_block, (ceiling, p.ceiling)
                    needs = next(g for g in rest if isinstance(g, Grant))
                    assert not needs.reentrant and p.ceiling < needs.fence <= ceiling
                    p.ceiling = ceiling
                case Grant(reentrant=True):
                    self.answer(e.req)
                    h = p.holder
                    assert e.req == caller and h is not None and h.lane == e.lane, (e, h)
                    assert (e.lease, e.fence) == (h.lease, h.fence), (e, h)
                    h.purposes.append(e.purpose)
                case Grant():
                    self.grant(p, e, caller, pending)
                case Queue():
                    assert isinstance(e.req, int) and e.req == caller, (e, caller)
                    assert pending is not None and e.lane == pending.lane, (e, pending)
                    assert self.answers[e.req] == 0 and self.queued_notes[e.req] == 0
                    self.queued_notes[e.req] += 1
                    assert p.holder is not None, "a free path is granted at once"
                    p.waiters.append(pending)
                    assert e.position == self.order(p).index(pending) + 1, (e, p.waiters)
                case Skip() | Released() | Abandoned():
                    assert e.req == caller, (e, caller)
                    self.answer(e.req)
                    if isinstance(e, Released):
                        assert p.holder is not None and p.holder.lease == e.lease, (e, p.holder)
                        p.holder.purposes.pop()
                        assert e.freed == (not p.holder.purposes), (e, p.holder)
                        if e.freed:
                            p.holder = None
                    elif isinstance(e, Abandoned) and e.leases:
                        assert p.holder is not None and e.leases == (p.holder.lease,)
                        p.holder = None
                case Reject():
                    self.answer(e.req)
                    self.reject(p, e, caller)
                case Revoke():
                    self.revoke(p, e, rest)
                case AbortRequest():
                    h = p.holder
                    assert h is not None and (e.lane, e.lease) == (h.lane, h.lease), (e, h)
                    h.abort_deadline = self.now + e.grace_ms
                    h.orphaned_abort = False
                case Diagnostic():
                    pass  # checked with the effect it explains
        if p.holder is None:
            assert p.waiters == [], "no holder implies an empty queue"

    def grant(self, p: MPath, e: Grant, caller: int | None, pending: MWaiter | None) -> None:
        self.answer(e.req)
        assert p.holder is None, ("two holders", p.holder, e)
        assert e.fence > max(p.fences, default=p.floor), (e, p.fences)
        assert e.fence > p.floor and e.fence <= p.ceiling, (e, p.floor, p.ceiling)
        assert e.lease == f"{p.prefix}{e.fence}" and e.lease not in p.leases
        waiter = next((w for w in p.waiters if w.req == e.req), None)
        if waiter is None:
            assert e.req == caller and pending is not None, (e, caller)
            assert p.waiters == [], "a fresh grant on a path with waiters"
            waiter = pending
        else:
            self.check_order(p, waiter)
            p.waiters.remove(waiter)
        assert (e.lane, e.purpose) == (waiter.lane, waiter.purpose), (e, waiter)
        limit = min_limit(waiter.max_hold_ms, self.policy.max_hold_ms)
        p.holder = MHolder(
            lane=e.lane,
            lease=e.lease,
            fence=e.fence,
            purposes=[e.purpose],
            granted_at=self.now,
            hold_deadline=None if limit is None else self.now + limit,
        )
        p.fences.append(e.fence)
        p.leases[e.lease] = e.fence

    def check_order(self, p: MPath, g: MWaiter) -> None:
        """``g`` is about to be granted from the queue: nobody it should have waited for is."""
        aging = self.policy.aging_ms
        others = [w for w in p.waiters if w is not g]
        if g.purpose != "recovery":
            assert not [w for w in others if w.purpose == "recovery"], "recovery goes first"
            earlier_same_class = [
                w for w in others if w.priority == g.priority and w.arrival < g.arrival
            ]
            assert not earlier_same_class, ("FIFO within a class", g, earlier_same_class)
            starved = [
                w for w in others if w.arrival < g.arrival and self.now - w.enqueued_at >= 2 * aging
            ]
            assert not starved, ("starved past 2 * aging_ms", g, starved)
        assert self.order(p)[0] is g, ("not the model's pick", g, self.order(p))

    def order(self, p: MPath) -> list[MWaiter]:
        aging = self.policy.aging_ms
        return sorted(p.waiters, key=lambda w: (-w.rank(self.now, aging), w.arrival))

    def reject(self, p: MPath, e: Reject, caller: int | None) -> None:
        waiter = next((w for w in p.waiters if w.req == e.req), None)
        if waiter is None:
            assert e.req == caller, (e, caller)
            return
        if e.code == "lease_timeout":
            assert waiter.deadline is not None and waiter.deadline <= self.now, (e, waiter)
        else:
            assert e.code in ("abandoned", "shutting_down"), e
        p.waiters.remove(waiter)
        h = p.holder
        if waiter.purpose == "recovery" and h is not None and h.abort_deadline is not None:
            if RECOVERY_ORPHAN_BUG:
                h.orphaned_abort = True
            else:
                h.abort_deadline = None

    def revoke(self, p: MPath, e: Revoke, rest: list[Effect]) -> None:
        h = p.holder
        assert h is not None and (e.lane, e.lease) == (h.lane, h.lease), ("revoked", e, h)
        diagnostic = rest[0] if rest else None
        assert isinstance(diagnostic, Diagnostic), ("a revocation is never silent", e)
        for part in (f"path={p.name}", f"lane={h.lane}", f"lease={h.lease}", f"reason={e.reason}"):
            assert part in diagnostic.message, (part, diagnostic)
        match e.reason:
            case "max_hold":
                assert h.hold_deadline is not None and h.hold_deadline <= self.now, (e, h)
            case "recovery":
                assert h.abort_deadline is not None and h.abort_deadline <= self.now, (e, h)
                handed = any(isinstance(g, Grant) and g.purpose == "recovery" for g in rest)
                assert handed or h.orphaned_abort, ("revoked for a recovery it did not get", e)
            case "shutdown":
                pass  # the shutdown rule checks it
            case _:
                raise AssertionError(f"unexpected revocation {e}")
        p.holder = None

    # Invariants --------------------------------------------------------------------------

    @invariant()
    def table_agrees_with_the_model(self) -> None:
        for p in self.paths:
            t = p.table
            if p.holder is None:
                assert t.holder is None and t.waiters == [] and t.idle()
            else:
                h = t.holder
                assert h is not None
                assert (h.lane, h.lease, h.fence) == (p.holder.lane, p.holder.lease, p.holder.fence)
                assert h.purposes == p.holder.purposes
            assert Counter(w.req for w in t.waiters) == Counter(w.req for w in p.waiters)
            assert t.fence == max(p.fences, default=p.floor)
            assert p.fences == sorted(set(p.fences)), "fences strictly increase"
            assert all(f <= p.ceiling for f in p.fences)

    @invariant()
    def next_deadline_is_the_earliest_timer(self) -> None:
        for p in self.paths:
            times = [w.deadline for w in p.waiters if w.deadline is not None]
            if p.holder is not None:
                h = p.holder
                times += [t for t in (h.hold_deadline, h.abort_deadline) if t is not None]
            assert p.table.next_deadline() == min(times, default=None)

    @invariant()
    def every_request_is_answered_once_or_still_waiting(self) -> None:
        waiting = [w.req for p in self.paths for w in p.waiters]
        assert len(waiting) == len(set(waiting))
        assert all(self.answers[r] == 0 and self.queued_notes[r] == 1 for r in waiting)
        unanswered = {r for r in range(1, self.next_req + 1) if self.answers[r] == 0}
        assert unanswered == set(waiting), unanswered ^ set(waiting)
        assert max(self.answers.values(), default=1) == 1

    def teardown(self) -> None:
        # Closing every path answers whatever is still waiting: nothing is left hanging.
        for p in self.paths:
            if not p.closed:
                self.replay(p, p.table.shutdown(self.now), caller=None)
                p.closed = True
        if self.paths:
            assert all(self.answers[r] == 1 for r in range(1, self.next_req + 1))


LeaseTableModel.TestCase.settings = settings(
    max_examples=400 if _CI else 150,
    stateful_step_count=60,
    deadline=None,
    derandomize=_CI,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLeaseTableModel = LeaseTableModel.TestCase
