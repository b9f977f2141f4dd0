"""The race workload: deterministic, realistic in shape, and compaction keeps its accounts."""

from __future__ import annotations

import json
import statistics

import pytest

from sessionlane.system.race._lockfile import LockPolicy
from sessionlane.system.race.verify import scan_transcript
from sessionlane.system.race.workload import (
    LANE_KINDS,
    TURN_LANES,
    TurnPlan,
    WorkloadParams,
    compact_transcript,
    make_plan,
)


def _lines(records: list[dict[str, object]]) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


def test_the_same_seed_gives_the_same_plan_and_another_seed_another() -> None:
    first = make_plan(11, 8, 30.0, 20.0)
    assert first == make_plan(11, 8, 30.0, 20.0)
    assert first != make_plan(12, 8, 30.0, 20.0)
    assert first.turns[:5] == make_plan(11, 8, 30.0, 20.0).turns[:5]


def test_the_default_plan_covers_eight_sessions_and_every_lane() -> None:
    plan = make_plan(7, 8, 30.0, 20.0)
    assert len(plan.sessions) == 8
    assert {turn.lane for turn in plan.turns} == set(TURN_LANES)
    assert plan.compactions
    assert {turn.session for turn in plan.turns} == set(plan.sessions)
    assert set(LANE_KINDS) == {*TURN_LANES, "compaction", "recovery"}
    assert {run.session for run in plan.recovery.runs} == set(plan.sessions)


def test_every_turn_writes_two_to_six_tagged_records_with_unique_ids() -> None:
    plan = make_plan(3, 8, 30.0, 20.0)
    turns: list[TurnPlan] = [*plan.turns, *plan.recovery.runs]
    assert len({turn.turn for turn in turns}) == len(turns)
    for turn in turns:
        assert 2 <= turn.records <= 6
        assert all(window.records >= 1 for window in turn.windows)
        seqs = [0, *[seq for _, group in turn.window_seqs() for seq in group]]
        assert seqs == list(range(turn.records))
        for seq in seqs:
            record = turn.record(seq)
            assert (record["turn"], record["seq"], record["lane"], record["session"]) == (
                turn.turn,
                seq,
                turn.lane,
                turn.session,
            )
            assert isinstance(record["payload"], dict)


def test_model_time_is_seconds_scale_with_a_long_tail_shrunk_by_speed() -> None:
    speed = 20.0
    plan = make_plan(5, 8, 600.0, speed)  # long span: enough samples for stable quantiles
    calls = sorted(w.model_s * speed for turn in plan.turns for w in turn.windows)
    median = statistics.median(calls)
    assert 2.0 < median < 3.1  # lognormal median 2.5 s (#126803)
    assert calls[int(0.99 * len(calls))] > 10 * median  # the long tail
    assert max(calls) <= WorkloadParams().model_cap_s


def test_no_turn_plans_model_time_past_the_end_of_the_run() -> None:
    plan = make_plan(9, 8, 10.0, 20.0)
    assert all(turn.start_s + turn.model_s <= plan.duration_s + 1e-9 for turn in plan.turns)
    assert all(c.start_s + c.summarise_s <= plan.duration_s + 1e-9 for c in plan.compactions)


def test_heartbeats_skip_a_busy_session_and_interactive_lanes_wait() -> None:
    plan = make_plan(1, 4, 30.0, 20.0)
    for turn in plan.turns:
        assert turn.on_contention == ("skip" if turn.lane == "heartbeat" else "wait")
    assert {turn.priority for turn in plan.turns_for("channel")} == {"interactive"}


def test_the_lock_policy_is_upstreams_divided_by_speed() -> None:
    plan = make_plan(1, 2, 30.0, 20.0)
    assert plan.lock_policy.timeout_ms == pytest.approx(60_000 / 20)
    assert plan.lock_policy.max_hold_ms == pytest.approx(300_000 / 20)
    assert plan.lock_policy.stale_ms == pytest.approx(1_800_000 / 20)
    assert plan.lock_policy.retry_delay_ms == pytest.approx(50 / 20)
    assert LockPolicy().scaled(1000).retry_delay_ms == 1.0


def test_compaction_keeps_a_suffix_and_lists_every_folded_record_in_order() -> None:
    turn = make_plan(2, 1, 30.0, 20.0).turns[0]
    records = [turn.record(seq) for seq in range(turn.records)]
    other = [{"turn": f"t{i}", "seq": 0, "type": "message"} for i in range(6)]
    data = _lines(records + other) + b"not json\n"
    compacted = compact_transcript(data, unit="c1", session="s", keep_last=3)
    summary, *tail = compacted
    assert summary["type"] == "compaction"
    assert tail == other[-3:]
    assert summary["torn"] == ["not json"]
    before = scan_transcript(data)
    after = scan_transcript(_lines(compacted))
    assert after.refs == before.refs  # nothing acknowledged vanishes, order preserved
    assert after.torn_lines == before.torn_lines == 1
    # A second compaction expands the first summary instead of nesting it.
    again = compact_transcript(_lines(compacted), unit="c2", session="s", keep_last=1)
    assert scan_transcript(_lines(again)).refs == before.refs


def test_compaction_of_a_short_file_rewrites_it_unchanged() -> None:
    records = [{"turn": "t", "seq": 0}, {"turn": "t", "seq": 1}]
    assert compact_transcript(_lines(records), unit="c", session="s", keep_last=8) == records
