"""The race verifier catches every corruption kind on hand-made files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sessionlane.system.race.verify import (
    METRIC_KEYS,
    AckEntry,
    Hold,
    encode_ack,
    handoffs_ms,
    parse_ack,
    percentile,
    read_ack_log,
    scan_transcript,
    summarize,
    verify,
)


def rec(turn: str, seq: int) -> bytes:
    return (
        json.dumps({"turn": turn, "seq": seq, "lane": "channel", "session": "s"}).encode() + b"\n"
    )


def ack(turn: str, seqs: tuple[int, ...], **fields: object) -> AckEntry:
    values: dict[str, object] = {
        "kind": "turn",
        "unit": turn,
        "lane": "channel",
        "session": "s",
        "result": "completed",
        "records": seqs,
        "planned": len(seqs),
    }
    values.update(fields)
    return AckEntry(**values)  # type: ignore[arg-type]


CLEAN = rec("a", 0) + rec("a", 1) + rec("b", 0) + rec("b", 1)
ACKS = [ack("a", (0, 1)), ack("b", (0, 1))]


def test_a_clean_file_shows_no_damage() -> None:
    report = verify({"s": CLEAN}, ACKS)
    assert (report.records_acked, report.records_found) == (4, 4)
    assert report.records_lost == report.interleaved_turns == report.torn_lines == 0
    assert report.records_duplicated == report.records_unacked == 0
    assert (report.turns_attempted, report.turns_completed, report.turns_failed) == (2, 2, 0)


def test_an_acknowledged_record_missing_from_the_file_is_lost() -> None:
    report = verify({"s": rec("a", 0) + rec("b", 0) + rec("b", 1)}, ACKS)
    assert report.records_lost == 1
    assert report.lost == (("s", "a", 1),)


def test_a_turn_whose_records_are_split_by_another_turn_is_interleaved() -> None:
    report = verify({"s": rec("a", 0) + rec("b", 0) + rec("b", 1) + rec("a", 1)}, ACKS)
    assert report.interleaved_turns == 1
    assert report.interleaved == ("a",)
    assert report.records_lost == 0


def test_unparseable_lines_and_a_last_line_without_newline_are_torn() -> None:
    data = CLEAN[:-1]  # the last record loses its newline
    assert verify({"s": data}, ACKS).torn_lines == 1
    data = rec("a", 0) + b'{"turn": "a", "se\n' + b"[1, 2]\n" + b"\n" + rec("a", 1)
    assert scan_transcript(data).torn_lines == 3  # half a record, a JSON array, an empty line


def test_a_record_written_twice_is_a_duplicate() -> None:
    report = verify({"s": CLEAN + rec("b", 1)}, ACKS)
    assert report.records_duplicated == 1
    assert report.interleaved_turns == 0  # the copy is adjacent to its turn


def test_records_folded_by_a_compaction_summary_still_count_as_found() -> None:
    summary = {"type": "compaction", "folded": [["a", 0], ["a", 1]], "torn": ["x"], "other": 2}
    data = json.dumps(summary).encode() + b"\n" + rec("b", 0) + rec("b", 1)
    report = verify({"s": data}, ACKS)
    assert report.records_lost == 0
    assert report.torn_lines == 1  # the line the compaction dropped is still reported


def test_records_in_a_missing_file_are_all_lost() -> None:
    assert verify({}, ACKS).records_lost == 4


def test_failures_are_counted_by_reason() -> None:
    entries = [
        ack("a", (0,), result="failed", reason="takeover_error"),
        ack("b", (), result="failed", reason="lock_timeout"),
        ack("c", (), result="failed", reason="owner_timeout"),
        ack("d", (), result="skipped", reason="busy"),
        ack("e", (0,), result="cutoff"),
        AckEntry(kind="compaction", unit="k", lane="compaction", session="s", result="completed"),
    ]
    report = verify({"s": rec("a", 0) + rec("e", 0)}, entries)
    assert (report.turns_attempted, report.turns_failed) == (5, 3)
    assert (report.turns_skipped, report.turns_cutoff) == (1, 1)
    assert report.takeover_errors == 1
    assert report.lock_timeouts == 2
    assert report.compactions_completed == 1
    assert len(report.wait_samples_ms) == 4  # skipped heartbeats do not wait


def test_an_ack_entry_round_trips_and_other_lines_are_refused(tmp_path: Path) -> None:
    entry = ack("a", (0, 1), wait_ms=3.5, holds=(Hold(1.0, 2.0, 0.5), Hold(3.0, None, 0.0)))
    assert parse_ack(encode_ack(entry)) == entry
    with pytest.raises(ValueError):
        parse_ack(json.dumps({"v": 2, "unit": "a"}))
    with pytest.raises(ValueError):
        parse_ack(encode_ack(entry).replace('"completed"', '"exploded"'))
    log = tmp_path / "lane.jsonl"
    log.write_text(encode_ack(entry) + "\n" + encode_ack(entry)[:20])  # a killed lane's last line
    assert read_ack_log(log) == ([entry], 1)


def test_the_hand_off_is_measured_from_the_release_that_ended_the_wait() -> None:
    holder = ack("a", (), holds=(Hold(10.0, 10.500, 0.0),))
    waiter = ack("b", (), holds=(Hold(10.502, 11.0, 300.0),))  # waited from 10.202
    unrelated = ack("c", (), holds=(Hold(1.0, 2.0, 0.0),))  # released long before the wait
    self_release = ack("d", (), holds=(Hold(20.0, 20.1, 0.0), Hold(20.2, 20.3, 150.0)))
    assert handoffs_ms([holder, waiter, unrelated, self_release]) == [pytest.approx(2.0)]


def test_percentiles_interpolate_and_metrics_have_exactly_the_race_keys() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    metrics = summarize(verify({"s": CLEAN}, ACKS), wall_s=1.234)
    assert tuple(metrics) == METRIC_KEYS
    assert metrics["wall_s"] == 1.23
