"""Durations in fixed memory: the last day of values in a ring, and a log-scale histogram of them all.

The controller runs for a year: a list with one float per tick was 5.3 MB a simulated day and ended in
the OOM killer. Percentiles over the whole run come from the histogram (within 6 % of the value);
the ring keeps exact recent values for windows (a benchmark's quiet and stormy minutes).
"""

from __future__ import annotations

import math
from array import array

__all__ = ["Durations"]

# The histogram spans 1 µs to 1000 s in log buckets, this many a decade (a bucket is 12 % wide, its
# geometric middle within 6 % of any value in it); values outside land in the end buckets.
_FIRST_S = 1e-6
_DECADES = 9
_PER_DECADE = 20
_BUCKETS = _DECADES * _PER_DECADE
# A day of 1 s ticks: 0.7 MB of doubles, whatever the run's length.
RING_VALUES = 86_400


class Durations:
    """Seconds, added one at a time; memory fixed at construction."""

    def __init__(self, ring_values: int = RING_VALUES) -> None:
        self._ring = array("d", bytes(8 * ring_values))
        self._counts = array("q", bytes(8 * _BUCKETS))
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0

    def add(self, value_s: float) -> None:
        self._ring[self.count % len(self._ring)] = value_s
        self.count += 1
        self.total_s += value_s
        self.max_s = max(self.max_s, value_s)
        self._counts[_bucket(value_s)] += 1

    def __len__(self) -> int:
        return self.count

    def percentile_ms(self, q: float) -> float:
        """The q-quantile over every value added, in ms (NaN before any)."""
        if not self.count:
            return math.nan
        rank = min(self.count - 1, int(q * self.count))
        seen = 0
        for index, n in enumerate(self._counts):
            seen += n
            if seen > rank:
                return 1000 * _FIRST_S * 10 ** ((index + 0.5) / _PER_DECADE)
        return 1000 * self.max_s

    def window(self, first: int, last: int) -> list[float]:
        """The exact values added as the first-th to the last-th (exclusive), as far as the ring still
        holds them."""
        first = max(first, self.count - len(self._ring), 0)
        last = min(last, self.count)
        return [self._ring[i % len(self._ring)] for i in range(first, last)]

    def recent(self, n: int) -> list[float]:
        return self.window(self.count - n, self.count)


def _bucket(value_s: float) -> int:
    if not value_s > _FIRST_S:  # also NaN
        return 0
    return min(_BUCKETS - 1, int(math.log10(value_s / _FIRST_S) * _PER_DECADE))
