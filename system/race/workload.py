"""The race's workload: a seeded, deterministic plan that both systems replay identically.

``make_plan(seed, sessions, duration_s, speed)`` is a pure function returning frozen
dataclasses. Every duration in ``WorkloadParams`` is in *real-world* seconds (what a gateway
sees); the plan holds *wall* seconds of the compressed run, i.e. real seconds divided by
``speed``. Lock budgets are scaled the same way (``LockPolicy.scaled``) so the ratios between
model time, lock timeouts, max hold and retry delay stay those of the field.

The model (numbers from OpenClaw's issue threads, cited by number):

* Model time per call (one prompt window): lognormal, median 2.5 s (#126803: "model p50
  2.5 s"), sigma 1.2 (p90 ~ 12 s, p99 ~ 40 s), capped at the 600 s run timeout (#86816).
  Tool-heavy turns chain several calls, giving whole turns of 85-330 s in the tail, as
  reported (``durationMs`` 85716, 104790, 233163, 300588; heartbeat holds up to 332 s).
* Lanes (each a separate OS process covering every session):
  ``heartbeat`` every ~120 s per session (background, one call, 2 records, skips when busy);
  ``channel`` user messages in bursts (Poisson bursts every ~75 s, 1 + geometric(mean 1)
  messages ~4 s apart, so the next message often lands while a turn streams: #83615,
  #124160); ``direct`` likewise, sparser; ``cron`` every ~300 s, tool-heavy (2-4 calls);
  ``compaction`` every ~180 s (jitter +-50 %); ``recovery`` watches for units running past
  120 s and re-fires a run on the same file (#85913's seed trace).
* Compaction summarisation: lognormal, median 20 s, sigma 1.3 (p80 ~ 60 s: past the 60 s
  acquire budget; ~2 % past the 300 s max hold), capped by the 900 s compaction timeout
  (May-2026 ``EMBEDDED_COMPACTION_TIMEOUT_MS``); one that reaches the cap times out and
  writes nothing (#84193, #91358: 15-minute windows, #91492: 7+ minutes).
* Records: each turn writes 2 to 6 JSON objects tagged ``turn``/``seq``/``lane``/``session``
  with a payload of lognormal size (median 300 bytes).

The rates are those of a busy gateway and the speed factor compresses them further so that
30 s of wall time (10 minutes of gateway time at the default speed 20) shows contention; the
comparison is about the coordination mechanism, not about absolute rates.

Compaction format (what the verifier relies on): compaction keeps the last ``keep_last``
records verbatim and replaces everything before them with one summary record
``{"type": "compaction", "folded": [[turn, seq], ...], "torn": [...], "other": n, ...}``
listing, in file order, every record it folded (including those listed by earlier summaries)
and the raw text of any unparseable line it dropped. Nothing acknowledged disappears without
a trace, and the order is preserved so interleaving stays detectable.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sessionlane.system.race._lockfile import LockPolicy, orphan_payload_grace_ms

__all__ = [
    "LANE_KINDS",
    "LANE_PRIORITY",
    "TURN_LANES",
    "CompactionPlan",
    "LaneKind",
    "OnContention",
    "Plan",
    "Priority",
    "RecoveryPlan",
    "TurnPlan",
    "Window",
    "WorkloadParams",
    "compact_transcript",
    "make_plan",
    "session_ids",
]

LaneKind = Literal["heartbeat", "channel", "direct", "cron", "compaction", "recovery"]
Priority = Literal["background", "interactive", "recovery"]
OnContention = Literal["wait", "skip", "fail"]

LANE_KINDS: tuple[LaneKind, ...] = (
    "heartbeat",
    "channel",
    "direct",
    "cron",
    "compaction",
    "recovery",
)
TURN_LANES: tuple[LaneKind, ...] = ("heartbeat", "channel", "direct", "cron")
"""Lanes whose planned units are turns (compaction has its own units, recovery is dynamic)."""
LANE_PRIORITY: dict[LaneKind, Priority] = {
    "heartbeat": "background",
    "channel": "interactive",
    "direct": "interactive",
    "cron": "background",
    "compaction": "background",
    "recovery": "recovery",
}


@dataclass(frozen=True)
class WorkloadParams:
    """Workload knobs in real-world seconds (see the module docstring for the sources)."""

    model_median_s: float = 2.5
    model_sigma: float = 1.2
    model_cap_s: float = 600.0
    heartbeat_period_s: float = 120.0
    channel_burst_gap_s: float = 75.0
    channel_burst_extra: float = 1.0
    channel_message_gap_s: float = 4.0
    direct_burst_gap_s: float = 150.0
    direct_burst_extra: float = 0.5
    direct_message_gap_s: float = 6.0
    cron_period_s: float = 300.0
    compaction_period_s: float = 180.0
    compaction_median_s: float = 20.0
    compaction_sigma: float = 1.3
    compaction_timeout_s: float = 900.0
    compaction_keep_last: int = 8
    stuck_threshold_s: float = 120.0
    recovery_poll_s: float = 10.0
    recovery_grace_s: float = 15.0
    recovery_runs_per_session: int = 6
    record_median_bytes: float = 300.0
    record_sigma: float = 1.0
    record_cap_bytes: int = 8192
    lock_policy: LockPolicy = field(
        default_factory=lambda: LockPolicy(orphan_payload_grace_ms=orphan_payload_grace_ms(60_000))
    )
    """Upstream defaults: acquire 60 s, staleMs 30 min, maxHoldMs 5 min, watchdog 60 s."""


@dataclass(frozen=True)
class Window:
    """One model call (prompt window) and the records written right after it."""

    model_s: float
    """Simulated model time, wall seconds (already divided by speed)."""
    records: int
    """Records written after the call returns (at least 1)."""


@dataclass(frozen=True)
class TurnPlan:
    """One turn: a prompt record, then model calls each followed by 1+ records.

    ``records`` is 2 to 6. Record ``seq`` 0 is the user/prompt message written before the
    first model call; the last is the assistant reply.
    """

    turn: str
    """Unique id across the run; also the ``turn`` field of every record."""
    lane: LaneKind
    session: str
    start_s: float
    """Planned start, wall seconds after the run's t0 (0 for recovery runs: dynamic)."""
    windows: tuple[Window, ...]
    sizes: tuple[int, ...]
    """Payload text size of each record, bytes."""

    @property
    def records(self) -> int:
        return 1 + sum(window.records for window in self.windows)

    @property
    def model_s(self) -> float:
        return sum(window.model_s for window in self.windows)

    @property
    def priority(self) -> Priority:
        return LANE_PRIORITY[self.lane]

    @property
    def on_contention(self) -> OnContention:
        """Heartbeats skip a busy session instead of queueing (PR #40526); others wait."""
        return "skip" if self.lane == "heartbeat" else "wait"

    def window_seqs(self) -> Iterator[tuple[Window, range]]:
        """Each window with the record seqs written after it."""
        seq = 1
        for window in self.windows:
            yield window, range(seq, seq + window.records)
            seq += window.records

    def record(self, seq: int) -> dict[str, object]:
        """The JSON object for record ``seq`` (deterministic)."""
        last = self.records - 1
        if seq == 0:
            role = "user"
        elif seq == last:
            role = "assistant"
        else:
            role = "toolCall" if seq % 2 else "toolResult"
        head = f"{self.turn}#{seq} "
        filler = "lorem ipsum dolor sit amet consectetur " * (1 + self.sizes[seq] // 39)
        return {
            "turn": self.turn,
            "seq": seq,
            "lane": self.lane,
            "session": self.session,
            "type": "message",
            "payload": {"role": role, "text": (head + filler)[: max(len(head), self.sizes[seq])]},
        }


@dataclass(frozen=True)
class CompactionPlan:
    """One compaction: read the file, summarise (model time), rewrite it."""

    unit: str
    session: str
    start_s: float
    summarise_s: float
    """Wall seconds of the summarisation model call, under the lock / lease."""
    completes: bool
    """False when the summarisation hit the compaction timeout: nothing is rewritten."""
    keep_last: int


@dataclass(frozen=True)
class RecoveryPlan:
    """The stuck-session watchdog: thresholds (wall seconds) and pre-drawn re-fired runs."""

    threshold_s: float
    poll_s: float
    grace_s: float
    runs: tuple[TurnPlan, ...]
    """Runs to re-fire, consumed in order per session."""

    def runs_for(self, session: str) -> tuple[TurnPlan, ...]:
        return tuple(run for run in self.runs if run.session == session)


@dataclass(frozen=True)
class Plan:
    """Everything both systems replay. Pure function of its first four fields (+ params)."""

    seed: int
    sessions: tuple[str, ...]
    duration_s: float
    speed: float
    params: WorkloadParams
    turns: tuple[TurnPlan, ...]
    compactions: tuple[CompactionPlan, ...]
    recovery: RecoveryPlan
    lock_policy: LockPolicy
    """Upstream's lock policy scaled by ``speed`` (the baseline uses it)."""
    grace_s: float
    """Lanes stop by themselves at ``duration_s + grace_s``."""

    def session_file(self, directory: Path, session: str) -> Path:
        return directory / f"{session}.jsonl"

    def turns_for(self, lane: LaneKind) -> tuple[TurnPlan, ...]:
        return tuple(turn for turn in self.turns if turn.lane == lane)


def session_ids(count: int) -> tuple[str, ...]:
    return tuple(f"session-{index:02d}" for index in range(count))


def make_plan(
    seed: int,
    sessions: int,
    duration_s: float,
    speed: float,
    params: WorkloadParams | None = None,
) -> Plan:
    """The plan for ``sessions`` files over ``duration_s`` wall seconds at ``speed``.

    Deterministic: each (session, lane) stream has its own RNG seeded from a string, so the
    same arguments give an equal plan on every run and every platform.
    """
    if sessions < 1 or duration_s <= 0 or speed <= 0:
        raise ValueError("sessions >= 1, duration_s > 0 and speed > 0 are required")
    p = params or WorkloadParams()
    span = duration_s * speed  # real-world seconds covered by the run
    ids = session_ids(sessions)
    turns: list[TurnPlan] = []
    compactions: list[CompactionPlan] = []
    runs: list[TurnPlan] = []
    for session in ids:
        for lane in TURN_LANES:
            rng = _rng(seed, session, lane)
            for index, start in enumerate(_arrivals(rng, lane, p, span)):
                turns.append(_turn(rng, p, lane, session, index, start / speed, duration_s, speed))
        rng = _rng(seed, session, "compaction")
        for index, start in enumerate(_periodic(rng, p.compaction_period_s, 0.5, span)):
            compactions.append(
                _compaction(rng, p, session, index, start / speed, duration_s, speed)
            )
        rng = _rng(seed, session, "recovery")
        for index in range(p.recovery_runs_per_session):
            runs.append(_turn(rng, p, "recovery", session, index, 0.0, math.inf, speed))
    turns.sort(key=lambda turn: (turn.start_s, turn.turn))
    compactions.sort(key=lambda unit: (unit.start_s, unit.unit))
    return Plan(
        seed=seed,
        sessions=ids,
        duration_s=duration_s,
        speed=speed,
        params=p,
        turns=tuple(turns),
        compactions=tuple(compactions),
        recovery=RecoveryPlan(
            threshold_s=p.stuck_threshold_s / speed,
            poll_s=p.recovery_poll_s / speed,
            grace_s=p.recovery_grace_s / speed,
            runs=tuple(runs),
        ),
        lock_policy=p.lock_policy.scaled(speed),
        grace_s=min(10.0, max(2.0, 0.25 * duration_s)),
    )


# ---------------------------------------------------------------------------------------------
# Draws


def _rng(seed: int, session: str, lane: str) -> random.Random:
    return random.Random(f"sessionlane-race:{seed}:{session}:{lane}")


def _geometric(rng: random.Random, mean: float, cap: int) -> int:
    """Failures before the first success, with the given mean, capped."""
    count = 0
    while count < cap and rng.random() < mean / (1.0 + mean):
        count += 1
    return count


def _periodic(rng: random.Random, period: float, jitter: float, span: float) -> Iterator[float]:
    t = rng.uniform(0.0, period)
    while t < span:
        yield t
        t += period * rng.uniform(1.0 - jitter, 1.0 + jitter)


def _bursts(
    rng: random.Random, gap: float, extra: float, message_gap: float, span: float
) -> Iterator[float]:
    t = rng.expovariate(1.0 / gap)
    while t < span:
        at = t
        for _ in range(1 + _geometric(rng, extra, 4)):
            if at >= span:
                break
            yield at
            at += rng.expovariate(1.0 / message_gap)
        t += rng.expovariate(1.0 / gap)


def _arrivals(rng: random.Random, lane: LaneKind, p: WorkloadParams, span: float) -> list[float]:
    if lane == "heartbeat":
        times = list(_periodic(rng, p.heartbeat_period_s, 0.1, span))
    elif lane == "channel":
        times = list(
            _bursts(
                rng, p.channel_burst_gap_s, p.channel_burst_extra, p.channel_message_gap_s, span
            )
        )
    elif lane == "direct":
        times = list(
            _bursts(rng, p.direct_burst_gap_s, p.direct_burst_extra, p.direct_message_gap_s, span)
        )
    else:
        times = list(_periodic(rng, p.cron_period_s, 0.2, span))
    return sorted(times)


def _turn(
    rng: random.Random,
    p: WorkloadParams,
    lane: LaneKind,
    session: str,
    index: int,
    start_s: float,
    duration_s: float,
    speed: float,
) -> TurnPlan:
    if lane == "heartbeat":
        total, calls = 2, 1
    elif lane in ("channel", "direct"):
        total = rng.randint(2, 6)
        calls = 1 + _geometric(rng, 0.8, 2)
    elif lane == "cron":
        total = rng.randint(3, 6)
        calls = 2 + _geometric(rng, 0.7, 2)
    else:  # a re-fired recovery run
        total = rng.randint(2, 4)
        calls = 1 + _geometric(rng, 0.3, 1)
    calls = min(calls, total - 1)
    # Split the total - 1 records after the prompt into `calls` non-empty groups.
    cuts = sorted(rng.sample(range(1, total - 1), calls - 1)) if calls > 1 else []
    bounds = [0, *cuts, total - 1]
    budget = duration_s - start_s  # the plan never runs model time past the run's end
    windows = []
    for k in range(calls):
        model = min(rng.lognormvariate(math.log(p.model_median_s), p.model_sigma), p.model_cap_s)
        model_s = max(0.0, min(model / speed, budget))
        budget -= model_s
        windows.append(Window(model_s=model_s, records=bounds[k + 1] - bounds[k]))
    sizes = tuple(
        int(
            min(
                rng.lognormvariate(math.log(p.record_median_bytes), p.record_sigma),
                p.record_cap_bytes,
            )
        )
        for _ in range(total)
    )
    return TurnPlan(
        turn=f"{lane}-{session}-{index:04d}",
        lane=lane,
        session=session,
        start_s=start_s,
        windows=tuple(windows),
        sizes=sizes,
    )


def _compaction(
    rng: random.Random,
    p: WorkloadParams,
    session: str,
    index: int,
    start_s: float,
    duration_s: float,
    speed: float,
) -> CompactionPlan:
    raw = rng.lognormvariate(math.log(p.compaction_median_s), p.compaction_sigma)
    completes = raw < p.compaction_timeout_s
    summarise_s = min(raw, p.compaction_timeout_s) / speed
    return CompactionPlan(
        unit=f"compaction-{session}-{index:04d}",
        session=session,
        start_s=start_s,
        summarise_s=max(0.0, min(summarise_s, duration_s - start_s)),
        completes=completes,
        keep_last=p.compaction_keep_last,
    )


# ---------------------------------------------------------------------------------------------
# Compaction (shared by both systems)


def compact_transcript(
    data: bytes, *, unit: str, session: str, keep_last: int
) -> list[dict[str, object]]:
    """The records of the compacted transcript (see the module docstring for the format).

    Keeps the last ``keep_last`` JSON-object lines verbatim and folds everything before them
    into one summary record that lists every folded ``[turn, seq]`` in file order (expanding
    earlier summaries), the raw text of unparseable lines, and a count of other objects.
    """
    objects: list[dict[str, object]] = []
    torn: list[str] = []
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for line in lines:
        try:
            value = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            value = None
        if isinstance(value, dict):
            objects.append(value)
        else:
            torn.append(line.decode("utf-8", "replace"))
    cut = max(0, len(objects) - keep_last)
    head, tail = objects[:cut], objects[cut:]
    if not head and not torn:
        return tail
    folded: list[list[object]] = []
    other = 0
    for item in head:
        refs, dropped, count = item.get("folded"), item.get("torn"), item.get("other")
        if item.get("type") == "compaction" and isinstance(refs, list):
            folded.extend(refs)
            if isinstance(dropped, list):
                torn.extend(str(raw) for raw in dropped)
            other += count if isinstance(count, int) else 0
        elif "turn" in item and "seq" in item:
            folded.append([item["turn"], item["seq"]])
        else:
            other += 1
    summary: dict[str, object] = {
        "type": "compaction",
        "unit": unit,
        "lane": "compaction",
        "session": session,
        "folded": folded,
        "torn": torn,
        "other": other,
        "summary": f"{len(folded)} records from {len({str(ref[0]) for ref in folded})} turns",
    }
    return [summary, *tail]
