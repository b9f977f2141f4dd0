"""Fixed-bucket latency histograms a SessionFile keeps and reports in its status counters.

Pure: no clock, no I/O. An actor observes durations it measured itself (milliseconds on its
own clock) and exports the histogram as flat integer counters, so it travels in
``FileStatus.counters`` (``dict[str, int]``) with no wire change:

* ``hist:<name>:le:<bound_us>``: observations at or below ``bound_us`` microseconds
  (cumulative, as in Prometheus; the ``+Inf`` bucket is ``hist:<name>:count``);
* ``hist:<name>:count`` and ``hist:<name>:sum_us``.

:func:`read_histograms` parses them back (the metrics endpoint does, in
``sessionlane.system.ops.metrics``). Buckets are fixed per histogram name, so the counters of
several files, or of several incarnations of one, add up bucket by bucket.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "HISTOGRAMS",
    "LATENCY_BOUNDS_US",
    "PREFIX",
    "WAIT_BOUNDS_US",
    "FileMetrics",
    "Histogram",
    "HistogramData",
    "read_histograms",
]

PREFIX: Final = "hist:"

LATENCY_BOUNDS_US: Final = (
    50,
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    10_000_000,
)
"""For work the file does itself (an fdatasync, a hand-off): 50 µs to 10 s."""

WAIT_BOUNDS_US: Final = (
    1_000,
    5_000,
    10_000,
    50_000,
    100_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
    600_000_000,
)
"""For time a request spends queued behind a holder (a turn): 1 ms to 10 min."""


@dataclass(frozen=True)
class HistogramData:
    """One histogram read back from counters: cumulative ``(bound_us, count)`` pairs."""

    buckets: tuple[tuple[int, int], ...]
    count: int
    sum_us: int

    def __add__(self, other: HistogramData) -> HistogramData:
        if [b for b, _ in self.buckets] != [b for b, _ in other.buckets]:
            raise ValueError("histograms with different buckets do not add up")
        buckets = tuple(
            (b, n + m) for (b, n), (_, m) in zip(self.buckets, other.buckets, strict=True)
        )
        return HistogramData(buckets, self.count + other.count, self.sum_us + other.sum_us)


class Histogram:
    """Counts observations into fixed buckets (upper bounds in microseconds, increasing)."""

    def __init__(self, name: str, bounds_us: Iterable[int]):
        self.name = name
        self.bounds_us = tuple(bounds_us)
        if not self.bounds_us or list(self.bounds_us) != sorted(set(self.bounds_us)):
            raise ValueError("bounds must be distinct and increasing")
        if ":" in name:
            raise ValueError("a histogram name may not contain ':'")
        self._counts = [0] * (len(self.bounds_us) + 1)  # the last one: above every bound
        self.count = 0
        self.sum_us = 0

    def observe(self, value_ms: float) -> None:
        """Count one duration (a negative one, from a clock step, counts as zero)."""
        value_us = max(0, round(value_ms * 1000))
        self._counts[bisect.bisect_left(self.bounds_us, value_us)] += 1
        self.count += 1
        self.sum_us += value_us

    def counters(self) -> dict[str, int]:
        """This histogram as flat counters (see the module docstring)."""
        out: dict[str, int] = {}
        running = 0
        for bound, n in zip(self.bounds_us, self._counts, strict=False):
            running += n
            out[f"{PREFIX}{self.name}:le:{bound}"] = running
        out[f"{PREFIX}{self.name}:count"] = self.count
        out[f"{PREFIX}{self.name}:sum_us"] = self.sum_us
        return out


HISTOGRAMS: Final = {
    "grant_wait": WAIT_BOUNDS_US,
    "handoff": LATENCY_BOUNDS_US,
    "fsync": LATENCY_BOUNDS_US,
}
"""The histograms every SessionFile keeps, by name."""


class FileMetrics:
    """The histograms of one SessionFile.

    * ``grant_wait``: a queued request, from its arrival to its grant;
    * ``handoff``: from the moment the file frees the path (a release, an abandon, a
      revocation) to its grant to the next waiter, durable fence reservation included;
    * ``fsync``: each fdatasync of the transcript.
    """

    def __init__(self) -> None:
        self.histograms = {name: Histogram(name, bounds) for name, bounds in HISTOGRAMS.items()}

    def observe(self, name: str, value_ms: float) -> None:
        self.histograms[name].observe(value_ms)

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for histogram in self.histograms.values():
            out.update(histogram.counters())
        return out


def read_histograms(counters: Mapping[str, int]) -> dict[str, HistogramData]:
    """The histograms found in ``counters`` by name; other keys are ignored."""
    bounds: dict[str, list[tuple[int, int]]] = {}
    totals: dict[str, dict[str, int]] = {}
    for key, value in counters.items():
        if not key.startswith(PREFIX):
            continue
        name, _, rest = key[len(PREFIX) :].partition(":")
        if rest.startswith("le:") and rest[3:].isdigit():
            bounds.setdefault(name, []).append((int(rest[3:]), value))
        elif rest in ("count", "sum_us"):
            totals.setdefault(name, {})[rest] = value
    found = {}
    for name, pairs in bounds.items():
        total = totals.get(name, {})
        found[name] = HistogramData(
            buckets=tuple(sorted(pairs)),
            count=total.get("count", max((n for _, n in pairs), default=0)),
            sum_us=total.get("sum_us", 0),
        )
    return found
