"""``sessionlane.actors.histogram``: fixed buckets, flat counters, and reading them back."""

from __future__ import annotations

import pytest

from sessionlane.actors.histogram import (
    HISTOGRAMS,
    FileMetrics,
    Histogram,
    HistogramData,
    read_histograms,
)


def test_an_observation_on_a_bound_counts_in_that_bucket_and_every_bucket_above() -> None:
    h = Histogram("x", (1_000, 5_000, 10_000))
    h.observe(1.0)  # exactly 1 ms: le 1000 us
    h.observe(7.5)
    h.observe(60_000)  # above every bound: only in count
    counters = h.counters()
    assert counters["hist:x:le:1000"] == 1
    assert counters["hist:x:le:5000"] == 1
    assert counters["hist:x:le:10000"] == 2
    assert counters["hist:x:count"] == 3
    assert counters["hist:x:sum_us"] == 1_000 + 7_500 + 60_000_000


def test_a_negative_duration_from_a_clock_step_counts_as_zero() -> None:
    h = Histogram("x", (10,))
    h.observe(-5.0)
    assert h.counters() == {"hist:x:le:10": 1, "hist:x:count": 1, "hist:x:sum_us": 0}


@pytest.mark.parametrize("bounds", [(), (5, 5), (10, 5)])
def test_bounds_must_be_distinct_and_increasing(bounds: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="increasing"):
        Histogram("x", bounds)


def test_counters_read_back_into_the_same_histogram_among_other_counters() -> None:
    metrics = FileMetrics()
    metrics.observe("fsync", 0.3)
    metrics.observe("fsync", 2.0)
    metrics.observe("grant_wait", 40.0)
    counters = {"grants": 7, **metrics.counters(), "size": 123}
    found = read_histograms(counters)
    assert set(found) == set(HISTOGRAMS)
    fsync = found["fsync"]
    assert fsync.count == 2 and fsync.sum_us == 2_300
    assert dict(fsync.buckets)[500] == 1 and dict(fsync.buckets)[2_500] == 2
    assert [b for b, _ in fsync.buckets] == list(HISTOGRAMS["fsync"])
    assert found["handoff"].count == 0
    assert found["grant_wait"].count == 1


def test_histograms_with_the_same_buckets_add_up_bucket_by_bucket() -> None:
    a = HistogramData(((1, 1), (2, 3)), count=4, sum_us=10)
    b = HistogramData(((1, 0), (2, 2)), count=2, sum_us=5)
    assert a + b == HistogramData(((1, 1), (2, 5)), count=6, sum_us=15)
    with pytest.raises(ValueError, match="different buckets"):
        _ = a + HistogramData(((1, 0), (3, 2)), count=2, sum_us=5)
