"""The pure lease state machine of one path, one behaviour per test, on a fake clock.

Time is an integer of milliseconds chosen by each test; nothing sleeps. Every test asserts the
effects a call returns, in order, because the SessionFile actor performs them in that order.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

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
from sessionlane.messages.wire import Priority

PATH = "/sessions/main.jsonl"
A, B, C, D, R = "lane-a", "lane-b", "lane-c", "lane-d", "lane-recovery"
BLOCK = 1024

# No limits unless a test asks for one, so every timer in a test is one it set on purpose.
POLICY = LeasePolicy(
    max_hold_ms=None, wait_timeout_ms=None, aging_ms=10_000, max_queue=16, fence_block=BLOCK
)


def make_table(fence_floor: int = 0, **policy: Any) -> LeaseTable:
    return LeaseTable(PATH, replace(POLICY, **policy), fence_floor, lease_prefix="p-")


def grant_of(effects: list[Effect]) -> Grant:
    grants = [e for e in effects if isinstance(e, Grant)]
    assert len(grants) == 1, effects
    return grants[0]


def hold(table: LeaseTable, lane: str, now: int = 0, req: str = "hold") -> Grant:
    """Take the free path for ``lane``: the first effect is the grant (after a reservation)."""
    return grant_of(table.acquire(req, lane, "prompt", now))


def snapshot(table: LeaseTable) -> tuple[object, ...]:
    holder = table.holder
    held: tuple[object, ...] | None = None
    if holder is not None:
        held = (holder.lease, holder.fence, holder.lane, tuple(holder.purposes))
        held += (holder.hold_deadline, holder.abort_deadline)
    queue = tuple((w.req, w.lane, w.purpose, w.priority, w.deadline) for w in table.waiters)
    return (table.fence, table.fence_ceiling, table.closed, held, queue)


def rejected(effects: list[Effect]) -> dict[object, str]:
    return {e.req: e.code for e in effects if isinstance(e, Reject)}


def granted_in_order(table: LeaseTable, holder: Grant, now: int) -> list[object]:
    """Release holder after holder and return the requests granted, in order."""
    order: list[object] = []
    current = holder
    while True:
        effects = table.release(("rel", current.req), current.lane, current.lease, now)
        assert isinstance(effects[0], Released) and effects[0].freed
        if len(effects) == 1:
            return order
        current = grant_of(effects)
        order.append(current.req)


# Grants and queueing ---------------------------------------------------------------------


def test_a_free_path_is_granted_at_once_with_fence_floor_plus_one() -> None:
    table = make_table(fence_floor=41)

    effects = table.acquire("r1", A, "prompt", 0)

    assert effects == [ReserveFences(41 + BLOCK), Grant("r1", A, "p-42", 42, "prompt")]
    holder = table.held_by(A)
    assert holder is not None and (holder.lease, holder.fence) == ("p-42", 42)


def test_fences_reserved_ahead_let_the_first_grants_go_without_a_reservation() -> None:
    table = make_table(fence_floor=41)
    ceiling = table.reserve_ahead()
    assert ceiling == 41 + BLOCK  # what the first grant would have reserved
    table.reserved(ceiling)
    assert table.reserve_ahead() is None  # reserved already
    effects = table.acquire("r1", A, "prompt", 0)
    assert effects == [Grant("r1", A, "p-42", 42, "prompt")]
    table.reserved(7)  # never lowers the ceiling
    assert table.fence_ceiling == 41 + BLOCK


def test_a_second_lane_waits_and_is_told_its_position() -> None:
    table = make_table()
    hold(table, A)

    assert table.acquire("r2", B, "prompt", 1) == [Queue("r2", B, 1)]
    assert table.acquire("r3", C, "write", 2) == [Queue("r3", C, 2)]
    assert table.held_by(B) is None
    assert [w.req for w in table.order(2)] == ["r2", "r3"]


def test_release_by_the_holder_grants_the_next_waiter_with_a_higher_fence() -> None:
    table = make_table()
    first = hold(table, A)
    table.acquire("r2", B, "write", 1)

    effects = table.release("rel", A, first.lease, 5)

    assert effects == [
        Released("rel", A, first.lease, freed=True),
        Grant("r2", B, "p-2", 2, "write"),
    ]
    assert table.waiters == []


def test_release_by_a_non_holder_is_refused_not_holder_and_changes_nothing() -> None:
    table = make_table()
    first = hold(table, A)
    table.acquire("r2", B, "prompt", 1)
    before = snapshot(table)

    by_other_lane = table.release("x1", B, first.lease, 2)
    made_up_lease = table.release("x2", A, "p-999", 2)

    assert [(e.req, e.code) for e in by_other_lane + made_up_lease if isinstance(e, Reject)] == [
        ("x1", "not_holder"),
        ("x2", "not_holder"),
    ]
    assert len(by_other_lane) == len(made_up_lease) == 1
    assert snapshot(table) == before


def test_a_connection_lane_may_release_and_write_under_its_own_connections_leases_only() -> None:
    table = make_table()
    first = hold(table, "c1.x/chat")

    assert table.check_write("c1.x/", first.lease, first.fence) is None
    for stranger in ("c1.x", "c1.xy/", "c2.y/", "c1.x/chat/"):
        refusal = table.check_write(stranger, first.lease, first.fence)
        assert refusal is not None and refusal[0] == "not_holder", stranger
    assert rejected(table.release("x", "c2.y/", first.lease, 1)) == {"x": "not_holder"}
    assert table.release("r", "c1.x/", first.lease, 1) == [
        Released("r", "c1.x/", first.lease, freed=True)
    ], "answered to the connection lane that asked"
    assert table.holder is None


def test_a_released_lease_cannot_be_released_again() -> None:
    table = make_table()
    first = hold(table, A)
    table.release("rel", A, first.lease, 1)

    assert rejected(table.release("again", A, first.lease, 2)) == {"again": "not_holder"}


def test_reentrant_acquire_by_the_holder_returns_the_same_lease_and_needs_as_many_releases() -> (
    None
):
    table = make_table()
    first = hold(table, A)
    # Reentrancy wins over on_contention: the holder never contends with itself.
    nested = table.acquire("r2", A, "write", 1, on_contention="fail")
    table.acquire("r3", B, "prompt", 2)

    assert nested == [Grant("r2", A, first.lease, first.fence, "write", reentrant=True)]
    assert table.release("rel1", A, first.lease, 3) == [
        Released("rel1", A, first.lease, freed=False)
    ]
    assert table.held_by(A) is not None
    effects = table.release("rel2", A, first.lease, 4)
    assert effects[0] == Released("rel2", A, first.lease, freed=True)
    assert grant_of(effects).req == "r3"


def test_on_contention_fail_is_refused_contended_and_leaves_the_queue_alone() -> None:
    table = make_table()
    hold(table, A)
    table.acquire("r2", B, "prompt", 1)
    before = snapshot(table)

    effects = table.acquire("r3", C, "prompt", 2, on_contention="fail")

    assert len(effects) == 1 and rejected(effects) == {"r3": "contended"}
    assert snapshot(table) == before


def test_on_contention_skip_returns_no_lease_and_leaves_the_queue_alone() -> None:
    table = make_table()
    hold(table, A)
    table.acquire("r2", B, "prompt", 1)
    before = snapshot(table)

    effects = table.acquire("r3", C, "prompt", 2, priority="background", on_contention="skip")

    assert effects == [Skip("r3", C)]
    assert snapshot(table) == before


def test_a_wait_timeout_is_answered_lease_timeout_exactly_once_by_tick() -> None:
    table = make_table()
    first = hold(table, A)
    table.acquire("r2", B, "prompt", 10, wait_timeout_ms=100)

    assert table.tick(109) == []
    effects = table.tick(110)
    assert len(effects) == 1 and rejected(effects) == {"r2": "lease_timeout"}
    assert table.tick(500) == []
    assert table.release("rel", A, first.lease, 600) == [
        Released("rel", A, first.lease, freed=True)
    ]
    assert table.idle()


def test_the_policy_wait_timeout_applies_when_the_request_names_none() -> None:
    table = make_table(wait_timeout_ms=50)
    hold(table, A)
    table.acquire("r2", B, "prompt", 0)

    assert table.tick(49) == []
    assert rejected(table.tick(50)) == {"r2": "lease_timeout"}


def test_the_queue_is_bounded_by_max_queue() -> None:
    table = make_table(max_queue=2)
    hold(table, A)
    table.acquire("r2", B, "prompt", 1)
    table.acquire("r3", C, "prompt", 2)
    before = snapshot(table)

    effects = table.acquire("r4", D, "prompt", 3)

    assert len(effects) == 1 and rejected(effects) == {"r4": "queue_full"}
    assert snapshot(table) == before


def test_a_recovery_is_queued_even_when_the_queue_is_full() -> None:
    table = make_table(max_queue=1)
    hold(table, A)
    table.acquire("r2", B, "prompt", 1)

    effects = table.recover("rec", R, 100, 2)

    assert effects[0] == Queue("rec", R, 1)


# Max hold and fences -----------------------------------------------------------------------


def test_max_hold_revokes_the_holder_and_grants_the_next_waiter() -> None:
    table = make_table(max_hold_ms=1_000)
    first = hold(table, A, now=0)
    table.acquire("r2", B, "prompt", 10)

    assert table.tick(999) == []
    effects = table.tick(1_000)

    assert effects[0] == Revoke(A, first.lease, "max_hold")
    assert isinstance(effects[1], Diagnostic)
    for part in (f"path={PATH}", f"lane={A}", f"lease={first.lease}", "held_ms=1000"):
        assert part in effects[1].message
    assert "reason=max_hold" in effects[1].message
    assert effects[2:] == [Grant("r2", B, "p-2", 2, "prompt")]


def test_a_late_tick_grants_the_waiter_a_punctual_one_would_have_granted() -> None:
    def run(ticks: list[int]) -> list[Effect]:
        table = make_table(max_hold_ms=1_000)
        hold(table, A, now=0)
        table.acquire("r2", B, "prompt", 10, wait_timeout_ms=1_500)  # due at 1,510
        table.acquire("r3", C, "prompt", 20, wait_timeout_ms=500)  # due at 520: before the hold
        return [e for t in ticks for e in table.tick(t) if not isinstance(e, Diagnostic)]

    punctual = run([520, 1_000])
    late = run([3_000])  # one wakeup long after every deadline
    assert [type(e).__name__ for e in punctual] == ["Reject", "Revoke", "Grant"]
    assert [type(e).__name__ for e in late] == ["Reject", "Revoke", "Grant"]
    assert punctual[2].req == late[2].req == "r2"  # type: ignore[union-attr]
    assert punctual[0].req == late[0].req == "r3"  # type: ignore[union-attr]


def test_a_request_can_shorten_max_hold_but_not_extend_it() -> None:
    table = make_table(max_hold_ms=1_000)
    short = hold(table, A, now=0)
    assert table.next_deadline() == 1_000
    table.release("rel", A, short.lease, 1)

    table.acquire("r2", A, "prompt", 10, max_hold_ms=200)
    assert table.next_deadline() == 210
    table.release("rel2", A, "p-2", 11)

    table.acquire("r3", A, "prompt", 20, max_hold_ms=5_000)
    assert table.next_deadline() == 1_020


def test_check_write_accepts_only_the_current_lease_and_fence() -> None:
    table = make_table(fence_floor=6)
    first = hold(table, A)

    assert table.check_write(A, first.lease, first.fence) is None
    assert table.check_write(A, first.lease, first.fence - 1) is not None
    assert table.check_write(A, first.lease, first.fence + 1) is not None
    assert table.check_write(A, "p-6", first.fence) is not None
    refusal = table.check_write(B, first.lease, first.fence)
    assert refusal is not None and refusal[0] == "not_holder"


def test_check_write_refuses_a_revoked_lease_with_stale_fence() -> None:
    table = make_table(max_hold_ms=100)
    first = hold(table, A, now=0)
    table.acquire("r2", B, "prompt", 1)
    second = grant_of(table.tick(100))

    refusal = table.check_write(A, first.lease, first.fence)

    assert refusal is not None and refusal[0] == "stale_fence"
    assert table.check_write(B, second.lease, second.fence) is None
    refusal = table.check_write(B, second.lease, first.fence)
    assert refusal is not None and refusal[0] == "stale_fence"


def test_check_write_with_compaction_needs_a_compaction_level_in_the_lease() -> None:
    table = make_table()
    lease = hold(table, A)

    refusal = table.check_write(A, lease.lease, lease.fence, purpose="compaction")
    assert refusal is not None and refusal[0] == "not_holder"
    table.acquire("nested", A, "compaction", 1)
    assert table.check_write(A, lease.lease, lease.fence, purpose="compaction") is None


def test_reserve_fences_precedes_the_grant_that_crosses_the_ceiling_once_per_block() -> None:
    table = make_table(fence_floor=10, fence_block=3)
    reservations: list[tuple[int, int]] = []  # (ceiling, fence of the grant that follows)
    for i in range(7):
        effects = table.acquire(("r", i), A, "write", i)
        grant = grant_of(effects)
        assert effects[-1] == grant
        reserves = [e for e in effects if isinstance(e, ReserveFences)]
        assert effects[: len(reserves)] == reserves
        reservations += [(r.ceiling, grant.fence) for r in reserves]
        table.release(("rel", i), A, grant.lease, i)

    assert reservations == [(13, 11), (16, 14), (19, 17)]


def test_a_table_built_with_a_fence_floor_never_grants_a_fence_at_or_below_it() -> None:
    table = make_table(fence_floor=500, fence_block=2, max_hold_ms=10)
    fences = [hold(table, A, now=0).fence]
    table.acquire("w", B, "prompt", 1)
    fences.append(grant_of(table.tick(10)).fence)  # granted by the max-hold revocation
    table.recover("rec", R, 5, 11)
    fences.append(grant_of(table.tick(16)).fence)  # granted after the recovery grace

    assert fences == [501, 502, 503]


# Recovery ----------------------------------------------------------------------------------


def test_recovery_asks_the_holder_to_abort_revokes_after_the_grace_then_grants_it() -> None:
    table = make_table()
    first = hold(table, A, now=0)

    asked = table.recover("rec", R, 500, 100, reason="stuck")
    assert asked[:2] == [Queue("rec", R, 1), AbortRequest(A, first.lease, 500)]
    assert isinstance(asked[2], Diagnostic) and "reason=stuck" in asked[2].message
    assert len(asked) == 3

    assert table.tick(599) == []
    effects = table.tick(600)
    assert effects[0] == Revoke(A, first.lease, "recovery")
    assert isinstance(effects[1], Diagnostic) and "reason=recovery" in effects[1].message
    assert effects[2:] == [Grant("rec", R, "p-2", 2, "recovery")]


def test_a_recovery_with_zero_grace_revokes_and_grants_at_once() -> None:
    table = make_table()
    first = hold(table, A, now=0)

    effects = table.recover("rec", R, 0, 100)

    assert Revoke(A, first.lease, "recovery") in effects
    assert effects[-1] == Grant("rec", R, "p-2", 2, "recovery")


def test_a_holder_releasing_within_the_grace_hands_straight_to_the_recovery() -> None:
    table = make_table()
    first = hold(table, A, now=0)
    table.recover("rec", R, 500, 100)

    effects = table.release("rel", A, first.lease, 200)

    assert effects == [
        Released("rel", A, first.lease, freed=True),
        Grant("rec", R, "p-2", 2, "recovery"),
    ]
    assert table.tick(600) == []


def test_a_recovery_on_a_free_path_is_granted_at_once() -> None:
    table = make_table()

    effects = table.recover("rec", R, 500, 0)

    assert effects == [ReserveFences(BLOCK), Grant("rec", R, "p-1", 1, "recovery")]


def test_a_second_recovery_while_one_is_pending_is_refused_contended() -> None:
    table = make_table()
    hold(table, A)
    table.recover("rec1", R, 500, 1)
    before = snapshot(table)

    effects = table.recover("rec2", B, 500, 2)

    assert len(effects) == 1 and rejected(effects) == {"rec2": "contended"}
    assert snapshot(table) == before


def test_a_second_recovery_while_one_is_running_is_refused_contended() -> None:
    table = make_table()
    table.recover("rec1", R, 500, 0)

    effects = table.recover("rec2", B, 500, 1)

    assert len(effects) == 1 and rejected(effects) == {"rec2": "contended"}
    holder = table.held_by(R)
    assert holder is not None and holder.purposes == ["recovery"]


def test_a_recovery_is_granted_before_older_waiters_however_long_they_waited() -> None:
    table = make_table(aging_ms=10)
    first = hold(table, A, now=0)
    table.acquire("old-interactive", B, "prompt", 1)
    table.acquire("old-recovery-class", C, "prompt", 2, priority="recovery")
    table.recover("rec", R, 10_000, 5_000)

    order = granted_in_order(table, first, 6_000)

    assert order == ["rec", "old-interactive", "old-recovery-class"]


# Priorities and aging ----------------------------------------------------------------------


def test_priority_order_is_recovery_then_interactive_then_background_fifo_within_a_class() -> None:
    table = make_table()
    first = hold(table, A, now=0)
    arrivals: list[tuple[str, Priority]] = [
        ("bg1", "background"),
        ("int1", "interactive"),
        ("bg2", "background"),
        ("rec1", "recovery"),
        ("int2", "interactive"),
        ("rec2", "recovery"),
        ("bg3", "background"),
    ]
    positions = []
    for t, (req, priority) in enumerate(arrivals, start=1):
        (queued,) = table.acquire(req, ("lane", req), "prompt", t, priority=priority)
        assert isinstance(queued, Queue)
        positions.append(queued.position)

    assert positions == [1, 1, 3, 1, 3, 2, 7]
    assert granted_in_order(table, first, 100) == [
        "rec1",
        "rec2",
        "int1",
        "int2",
        "bg1",
        "bg2",
        "bg3",
    ]


def test_a_background_waiter_is_promoted_one_class_per_aging_ms() -> None:
    table = make_table(aging_ms=1_000)
    hold(table, A, now=0)
    table.acquire("bg", B, "prompt", 0, priority="background")
    table.acquire("int", C, "prompt", 900, priority="interactive")
    table.acquire("rec-class", D, "prompt", 950, priority="recovery")

    def order(now: int) -> list[object]:
        return [w.req for w in table.order(now)]

    assert order(999) == ["rec-class", "int", "bg"]
    assert order(1_000) == ["rec-class", "bg", "int"]  # bg is interactive now, and came first
    assert order(1_899) == ["rec-class", "bg", "int"]
    assert order(2_000) == ["bg", "int", "rec-class"]  # all in the top class: by arrival
    assert order(50_000) == ["bg", "int", "rec-class"]  # aging stops at the top class


def test_an_aged_background_waiter_is_granted_ahead_of_later_interactive_arrivals() -> None:
    table = make_table(aging_ms=1_000)
    first = hold(table, A, now=0)
    table.acquire("bg", B, "prompt", 0, priority="background")
    table.acquire("int-late", C, "prompt", 1_500, priority="interactive")
    table.acquire("int-later", D, "prompt", 1_600, priority="interactive")

    assert granted_in_order(table, first, 1_700) == ["bg", "int-late", "int-later"]


def test_without_aging_a_background_waiter_yields_to_later_interactive_arrivals() -> None:
    table = make_table(aging_ms=1_000)
    first = hold(table, A, now=0)
    table.acquire("bg", B, "prompt", 0, priority="background")
    table.acquire("int", C, "prompt", 500, priority="interactive")

    assert granted_in_order(table, first, 999) == ["int", "bg"]


# Abandon and shutdown ----------------------------------------------------------------------


def test_abandon_frees_the_path_at_once_and_logs_one_diagnostic() -> None:
    table = make_table()
    first = hold(table, A, now=100)
    table.acquire("r2", B, "prompt", 200)

    effects = table.abandon("ab", A, 500, reason="agent gone")

    diagnostics = [e for e in effects if isinstance(e, Diagnostic)]
    assert len(diagnostics) == 1
    for part in (
        f"path={PATH}",
        f"lane={A}",
        f"lease={first.lease}",
        "held_ms=400",
        "reason=agent gone",
    ):
        assert part in diagnostics[0].message
    assert Abandoned("ab", A, (first.lease,)) in effects
    assert effects[-1] == Grant("r2", B, "p-2", 2, "prompt")
    assert table.check_write(A, first.lease, first.fence) is not None


def test_abandon_cancels_the_lanes_waiters_with_code_abandoned() -> None:
    table = make_table()
    hold(table, A)
    table.acquire("b1", B, "prompt", 1)
    table.acquire("c1", C, "prompt", 2)
    table.acquire("b2", B, "write", 3)

    effects = table.abandon("ab", B, 4, reason="connection closed")

    assert rejected(effects) == {"b1": "abandoned", "b2": "abandoned"}
    assert Abandoned("ab", B, ()) in effects
    assert [w.req for w in table.waiters] == ["c1"]
    assert table.held_by(A) is not None


def test_abandon_by_a_lane_with_nothing_on_the_path_changes_nothing() -> None:
    table = make_table()
    hold(table, A)
    table.acquire("b1", B, "prompt", 1)
    before = snapshot(table)

    assert table.abandon("ab", C, 2, reason="cleanup") == [Abandoned("ab", C, ())]
    assert snapshot(table) == before


def test_shutdown_answers_every_waiter_shutting_down_and_refuses_later_requests() -> None:
    table = make_table()
    hold(table, A)
    table.acquire("r2", B, "prompt", 1)
    table.recover("rec", R, 500, 2)

    effects = table.shutdown(3)

    assert rejected(effects) == {"r2": "shutting_down", "rec": "shutting_down"}
    assert rejected(table.acquire("r3", C, "prompt", 4)) == {"r3": "shutting_down"}
    assert rejected(table.recover("rec2", R, 0, 4)) == {"rec2": "shutting_down"}
    assert table.tick(10_000) == []
    assert table.idle()


def test_shutdown_revokes_the_holder_with_reason_shutdown() -> None:
    table = make_table()
    first = hold(table, A)

    effects = table.shutdown(3)

    assert effects[0] == Revoke(A, first.lease, "shutdown")
    assert isinstance(effects[1], Diagnostic) and len(effects) == 2
    assert table.check_write(A, first.lease, first.fence) is not None


# Ownership moved (the owner sidecar at the path changed) --------------------------------------


def test_losing_the_file_answers_waiters_unavailable_and_revokes_the_holder() -> None:
    table = make_table()
    first = hold(table, A)
    table.acquire("r2", B, "prompt", 1)

    effects = table.shutdown(
        3, code="unavailable", detail="served elsewhere", reason="ownership_lost"
    )

    assert rejected(effects) == {"r2": "unavailable"}
    assert Revoke(A, first.lease, "ownership_lost") in effects
    assert table.check_write(A, first.lease, first.fence) is not None
    assert rejected(table.acquire("r3", C, "prompt", 4)) == {"r3": "shutting_down"}
    assert table.idle()


def test_a_floor_found_at_the_new_owner_sidecar_lifts_later_fences_above_it() -> None:
    table = make_table()
    first = hold(table, A)
    assert table.raise_floor(first.fence, 1) == []  # nobody granted above us: nothing changes
    table.release("rel", A, first.lease, 2)

    assert table.raise_floor(5_000, 3) == []
    effects = table.acquire("r2", B, "prompt", 4)
    assert grant_of(effects).fence == 5_001
    assert ReserveFences(5_000 + BLOCK) in effects


def test_a_holder_below_the_floor_at_the_new_owner_sidecar_is_revoked_and_a_waiter_granted() -> (
    None
):
    table = make_table()
    first = hold(table, A)
    table.acquire("r2", B, "prompt", 1)

    effects = table.raise_floor(5_000, 2)

    assert effects[0] == Revoke(A, first.lease, "ownership_lost")
    assert grant_of(effects).req == "r2" and grant_of(effects).fence == 5_001
    assert table.check_write(A, first.lease, first.fence) is not None


# Timers ------------------------------------------------------------------------------------


def test_next_deadline_reflects_the_earliest_timer() -> None:
    table = make_table(max_hold_ms=1_000)
    assert table.next_deadline() is None

    hold(table, A, now=0)
    assert table.next_deadline() == 1_000  # max hold
    table.acquire("r2", B, "prompt", 100, wait_timeout_ms=300)
    assert table.next_deadline() == 400  # wait timeout
    table.recover("rec", R, 200, 150)
    assert table.next_deadline() == 350  # recovery grace

    grant = grant_of(table.tick(350))
    assert grant.req == "rec"
    assert table.next_deadline() == 400  # the recovery's own max hold is 1350
    table.tick(400)
    assert table.next_deadline() == 1_350


def test_a_tick_with_nothing_due_does_nothing() -> None:
    table = make_table(max_hold_ms=1_000)
    hold(table, A)
    table.acquire("r2", B, "prompt", 0, wait_timeout_ms=500)
    before = snapshot(table)

    assert table.tick(499) == []
    assert snapshot(table) == before


# Recovery edge cases (were bugs; fixed in the lease table) ----


def test_a_recovery_abandoned_during_the_grace_does_not_revoke_the_holder() -> None:
    table = make_table()
    first = hold(table, A, now=0)
    table.acquire("r2", B, "prompt", 10)
    table.recover("rec", R, 500, 100)
    table.abandon("ab", R, 200, reason="recovery client went away")

    effects = table.tick(600)

    assert Revoke(A, first.lease, "recovery") not in effects
    assert table.held_by(A) is not None


def test_a_recovery_is_not_timed_out_while_the_holder_has_its_grace() -> None:
    table = make_table(wait_timeout_ms=1_000)
    first = hold(table, A, now=0)
    table.recover("rec", R, 5_000, 0)

    assert table.tick(1_000) == []
    effects = table.tick(5_000)
    assert effects[0] == Revoke(A, first.lease, "recovery")
    assert grant_of(effects).req == "rec"


def test_a_recovery_requested_through_acquire_is_coalesced_with_a_pending_one() -> None:
    table = make_table()
    hold(table, A)
    table.recover("rec1", R, 500, 1)

    effects = table.acquire("rec2", B, "recovery", 2, priority="recovery")

    assert rejected(effects) == {"rec2": "contended"}


def test_a_recovery_requested_through_acquire_asks_the_holder_to_abort() -> None:
    table = make_table()
    first = hold(table, A)

    effects = table.acquire("rec", R, "recovery", 1, priority="recovery")

    assert any(isinstance(e, AbortRequest) and e.lease == first.lease for e in effects)


def test_a_grant_to_a_waiter_says_how_long_it_waited_and_a_grant_at_once_does_not() -> None:
    table = make_table()
    first = hold(table, A, now=0)
    assert first.waited_ms is None
    table.acquire("r2", B, "prompt", 100)
    second = grant_of(table.release("rel", A, first.lease, 350))
    assert second.lane == B and second.waited_ms == 250


def test_revocations_are_counted_by_reason() -> None:
    table = make_table(max_hold_ms=1_000)
    hold(table, A, now=0)
    table.tick(1_000)
    hold(table, B, now=1_000)
    table.shutdown(1_500)
    assert table.counters["revocations"] == 2
    assert table.counters["revoked_max_hold"] == 1
    assert table.counters["revoked_shutdown"] == 1
    assert table.counters["revoked_recovery"] == 0
