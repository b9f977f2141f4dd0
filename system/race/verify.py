"""The race's independent verifier: what the files say, against what the lanes believed.

Pure functions over file contents and acknowledgement logs; it imports nothing from the
systems under test or from the workload, only the on-disk contracts below.

Acknowledgement log (one JSONL file per lane process, one line per finished unit, written by
``sessionlane.system.race.lane``), version 1::

    {"v": 1, "kind": "turn" | "compaction", "unit": id, "lane": ..., "session": ...,
     "result": "completed" | "failed" | "skipped" | "cutoff", "reason": str | null,
     "records": [seq, ...],            # seqs the system acknowledged (durable per its rules)
     "planned": n, "wait_ms": float,   # total time the unit waited for lock / lease / owner
     "holds": [[acquired_at, released_at | null, waited_ms], ...],   # time.monotonic()
     "started": t, "ended": t, "interrupted": bool, "detail": str}

``skipped`` is a heartbeat that found the session busy (by design, not a failure); ``cutoff``
is a unit still running when the bounded run ended.

Transcript contract: one JSON object per line; a record carries ``turn`` and ``seq``; a
compaction summary (``"type": "compaction"``) stands for the ``[turn, seq]`` refs listed in
its ``folded`` field (in file order) and for the unparseable lines listed in ``torn``.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "ACK_VERSION",
    "LOCK_TIMEOUT_REASONS",
    "METRIC_KEYS",
    "AckEntry",
    "FileScan",
    "Hold",
    "Result",
    "UnitKind",
    "VerifyReport",
    "encode_ack",
    "handoffs_ms",
    "parse_ack",
    "percentile",
    "read_ack_log",
    "scan_transcript",
    "summarize",
    "verify",
]

ACK_VERSION = 1
Result = Literal["completed", "failed", "skipped", "cutoff"]
UnitKind = Literal["turn", "compaction"]
Ref = tuple[str, int]

LOCK_TIMEOUT_REASONS = frozenset({"lock_timeout", "lock_stale", "owner_timeout"})
"""Failure reasons counted as lock timeouts: gave up waiting for a busy session (file lock
budget, report-only stale lock, or the in-process owner wait; sessionlane: lease timeout)."""

METRIC_KEYS: tuple[str, ...] = (
    "turns_attempted",
    "turns_completed",
    "turns_failed",
    "takeover_errors",
    "lock_timeouts",
    "records_acked",
    "records_lost",
    "interleaved_turns",
    "torn_lines",
    "wait_ms_p50",
    "wait_ms_p99",
    "handoff_ms_p50",
    "handoff_ms_p99",
    "wall_s",
)


@dataclass(frozen=True)
class Hold:
    """One lock/lease tenure: monotonic acquire and release stamps, and the wait before it."""

    acquired_at: float
    released_at: float | None
    waited_ms: float


@dataclass(frozen=True)
class AckEntry:
    """One unit as its lane saw it (see the module docstring for the fields)."""

    kind: UnitKind
    unit: str
    lane: str
    session: str
    result: Result
    reason: str | None = None
    records: tuple[int, ...] = ()
    planned: int = 0
    wait_ms: float = 0.0
    holds: tuple[Hold, ...] = ()
    started: float = 0.0
    ended: float = 0.0
    interrupted: bool = False
    detail: str = ""


def encode_ack(entry: AckEntry) -> str:
    """One log line (no newline)."""
    data = asdict(entry)
    data["holds"] = [[h.acquired_at, h.released_at, h.waited_ms] for h in entry.holds]
    data["records"] = list(entry.records)
    return json.dumps({"v": ACK_VERSION, **data}, separators=(",", ":"))


def parse_ack(line: str) -> AckEntry:
    """Inverse of ``encode_ack``; ``ValueError`` on anything else."""
    data = json.loads(line)
    if not isinstance(data, dict) or data.pop("v", None) != ACK_VERSION:
        raise ValueError("not a version-1 acknowledgement entry")
    try:
        holds = tuple(
            Hold(float(a), None if r is None else float(r), float(w))
            for a, r, w in data.pop("holds", [])
        )
        records = tuple(int(seq) for seq in data.pop("records", []))
        entry = AckEntry(holds=holds, records=records, **data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"bad acknowledgement entry: {error}") from error
    if entry.kind not in ("turn", "compaction") or entry.result not in (
        "completed",
        "failed",
        "skipped",
        "cutoff",
    ):
        raise ValueError(f"bad kind/result: {entry.kind}/{entry.result}")
    return entry


def read_ack_log(path: Path) -> tuple[list[AckEntry], int]:
    """The entries of one log and the number of unreadable lines (a killed lane's last line)."""
    entries: list[AckEntry] = []
    bad = 0
    if not path.exists():
        return entries, bad
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entries.append(parse_ack(line))
        except ValueError:
            bad += 1
    return entries, bad


# ---------------------------------------------------------------------------------------------
# Transcripts


@dataclass(frozen=True)
class FileScan:
    """One transcript, expanded: record refs in logical order, torn lines, other objects."""

    refs: tuple[Ref, ...]
    torn_lines: int
    other_objects: int
    compactions: int


def scan_transcript(data: bytes) -> FileScan:
    """Parse a transcript; compaction summaries expand in place into the refs they folded.

    A torn line is a line that is not a JSON object, or a last line without a newline
    (counted even if it parses), or a line a compaction dropped as unparseable.
    """
    refs: list[Ref] = []
    torn = other = compactions = 0
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the data ends with a newline (or is empty)
    if tail:
        torn += 1
    for line in lines:
        try:
            value = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            value = None
        if not isinstance(value, dict):
            torn += 1
            continue
        folded = value.get("folded")
        if value.get("type") == "compaction" and isinstance(folded, list):
            compactions += 1
            for ref in folded:
                if isinstance(ref, list) and len(ref) == 2 and isinstance(ref[1], int):
                    refs.append((str(ref[0]), ref[1]))
            dropped = value.get("torn")
            torn += len(dropped) if isinstance(dropped, list) else 0
            counted = value.get("other")
            other += counted if isinstance(counted, int) else 0
        elif "turn" in value and isinstance(value.get("seq"), int):
            refs.append((str(value["turn"]), value["seq"]))
        else:
            other += 1
    return FileScan(tuple(refs), torn, other, compactions)


# ---------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class VerifyReport:
    """Everything the verifier counted. ``summarize`` reduces it to the race's metrics."""

    turns_attempted: int
    turns_completed: int
    turns_failed: int
    turns_skipped: int
    turns_cutoff: int
    turns_interrupted: int
    compactions_attempted: int
    compactions_completed: int
    compactions_failed: int
    takeover_errors: int
    lock_timeouts: int
    failures_by_reason: dict[str, int]
    records_acked: int
    records_found: int
    records_lost: int
    records_duplicated: int
    records_unacked: int
    interleaved_turns: int
    torn_lines: int
    log_errors: int
    wait_samples_ms: tuple[float, ...]
    handoff_samples_ms: tuple[float, ...]
    lost: tuple[tuple[str, str, int], ...] = field(default=())
    """(session, turn, seq) of lost records, at most 50, for diagnostics."""
    interleaved: tuple[str, ...] = field(default=())
    """Ids of interleaved turns, at most 50."""


def verify(
    files: Mapping[str, bytes], entries: Iterable[AckEntry], log_errors: int = 0
) -> VerifyReport:
    """Check the transcripts (by session id) against the acknowledgement entries."""
    entries = list(entries)
    scans = {session: scan_transcript(data) for session, data in files.items()}
    found: dict[str, Counter[Ref]] = {
        session: Counter(scan.refs) for session, scan in scans.items()
    }

    acked: set[tuple[str, str, int]] = set()
    for entry in entries:
        acked.update((entry.session, entry.unit, seq) for seq in entry.records)
    lost = sorted(ref for ref in acked if found.get(ref[0], Counter())[(ref[1], ref[2])] == 0)
    in_files = {(session, turn, seq) for session, counts in found.items() for turn, seq in counts}

    interleaved: list[str] = []
    for scan in scans.values():
        positions: dict[str, list[int]] = defaultdict(list)
        for index, (turn, _) in enumerate(scan.refs):
            positions[turn].append(index)
        interleaved.extend(
            turn for turn, where in positions.items() if where[-1] - where[0] + 1 != len(where)
        )

    turns = [entry for entry in entries if entry.kind == "turn"]
    compactions = [entry for entry in entries if entry.kind == "compaction"]
    failed = [entry for entry in entries if entry.result == "failed"]
    reasons = Counter(entry.reason or "unknown" for entry in failed)
    turn_results = Counter(entry.result for entry in turns)
    compaction_results = Counter(entry.result for entry in compactions)
    return VerifyReport(
        turns_attempted=len(turns),
        turns_completed=turn_results["completed"],
        turns_failed=turn_results["failed"],
        turns_skipped=turn_results["skipped"],
        turns_cutoff=turn_results["cutoff"],
        turns_interrupted=sum(1 for entry in turns if entry.interrupted),
        compactions_attempted=len(compactions),
        compactions_completed=compaction_results["completed"],
        compactions_failed=compaction_results["failed"],
        takeover_errors=reasons["takeover_error"],
        lock_timeouts=sum(reasons[reason] for reason in LOCK_TIMEOUT_REASONS),
        failures_by_reason=dict(sorted(reasons.items())),
        records_acked=len(acked),
        records_found=len(acked) - len(lost),
        records_lost=len(lost),
        records_duplicated=sum(count - 1 for counts in found.values() for count in counts.values()),
        records_unacked=len(in_files - acked),
        interleaved_turns=len(interleaved),
        torn_lines=sum(scan.torn_lines for scan in scans.values()),
        log_errors=log_errors,
        wait_samples_ms=tuple(entry.wait_ms for entry in turns if entry.result != "skipped"),
        handoff_samples_ms=tuple(handoffs_ms(entries)),
        lost=tuple(lost[:50]),
        interleaved=tuple(sorted(interleaved)[:50]),
    )


def handoffs_ms(entries: Iterable[AckEntry]) -> list[float]:
    """Hand-off latency: for every tenure that had to wait, the time from the last release by
    another unit on the same session during that wait to this acquisition.

    A wait that no logged release ended (e.g. a stale lock removed, a watchdog release of an
    unlogged unit) yields no sample.
    """
    releases: dict[str, list[tuple[float, str]]] = defaultdict(list)
    tenures: list[tuple[str, str, Hold]] = []
    for entry in entries:
        for hold in entry.holds:
            tenures.append((entry.session, entry.unit, hold))
            if hold.released_at is not None:
                releases[entry.session].append((hold.released_at, entry.unit))
    for items in releases.values():
        items.sort()
    samples: list[float] = []
    for session, unit, hold in tenures:
        if hold.waited_ms <= 0:
            continue
        items = releases[session]
        start = hold.acquired_at - hold.waited_ms / 1000.0
        index = bisect.bisect_right(items, (hold.acquired_at, "\uffff")) - 1
        while index >= 0 and items[index][0] >= start:
            released_at, releaser = items[index]
            if releaser != unit:
                samples.append((hold.acquired_at - released_at) * 1000.0)
                break
            index -= 1
    return samples


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(report: VerifyReport, wall_s: float) -> dict[str, float]:
    """The race's metrics, exactly ``METRIC_KEYS`` (counts as ints, times rounded)."""
    metrics: dict[str, float] = {
        "turns_attempted": report.turns_attempted,
        "turns_completed": report.turns_completed,
        "turns_failed": report.turns_failed,
        "takeover_errors": report.takeover_errors,
        "lock_timeouts": report.lock_timeouts,
        "records_acked": report.records_acked,
        "records_lost": report.records_lost,
        "interleaved_turns": report.interleaved_turns,
        "torn_lines": report.torn_lines,
        "wait_ms_p50": round(percentile(report.wait_samples_ms, 50), 2),
        "wait_ms_p99": round(percentile(report.wait_samples_ms, 99), 2),
        "handoff_ms_p50": round(percentile(report.handoff_samples_ms, 50), 2),
        "handoff_ms_p99": round(percentile(report.handoff_samples_ms, 99), 2),
        "wall_s": round(wall_s, 2),
    }
    assert tuple(metrics) == METRIC_KEYS
    return metrics
