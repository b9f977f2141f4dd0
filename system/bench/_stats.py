"""Small statistics for the bench: percentiles, rates and ratios, all JSON-safe.

Every number a suite reports goes through here, so the JSON never holds NaN or infinity: a
value that cannot be computed (no samples, a zero denominator) is ``None``, which the report
shows as a dash and the tests treat as "not measured".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["latency_ms", "percentile", "rate", "ratio", "rounded"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation; None without samples."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rounded(value: float | None, digits: int = 3) -> float | None:
    """``value`` rounded to ``digits`` decimals but at least 3 significant figures.

    None stays None and a non-finite value becomes None.
    """
    if value is None or not math.isfinite(value):
        return None
    if value == 0:
        return 0.0
    magnitude = math.floor(math.log10(abs(value)))
    return round(value, max(digits, 2 - magnitude))


def latency_ms(seconds: Sequence[float], prefix: str) -> dict[str, float | None]:
    """``{prefix_ms_p50, prefix_ms_p99}`` of durations given in seconds."""
    return {
        f"{prefix}_ms_p50": rounded(_ms(percentile(seconds, 50))),
        f"{prefix}_ms_p99": rounded(_ms(percentile(seconds, 99))),
    }


def rate(count: float, seconds: float) -> float | None:
    """Events per second; None when no time passed."""
    if seconds <= 0:
        return None
    return rounded(count / seconds, 1)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` rounded, or None when either is missing or zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return rounded(numerator / denominator, 2)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0
