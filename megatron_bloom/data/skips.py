"""Training samples a run leaves out: `train.skip_samples`, and the batches a loss-spike rollback skipped.

Positions count every sample of the training stream, skipped or not: `consumed_samples` (in metrics.jsonl
and checkpoints) is the position after the last sample a run read, so ranges are written in the numbers a
user sees. A batch takes the next samples outside every range, which is how BLOOM and OPT stepped over the
data of a loss spike (and Megatron-LM's `--skip-train-iteration-range`, in samples instead of iterations).
"""

from __future__ import annotations

import bisect
from typing import Iterable, List, Sequence, Tuple

from megatron_bloom.config.schema import check_skip_range


class SkippedSamples:
    """Sorted, merged half-open ranges [start, end) of sample positions; immutable."""

    def __init__(self, ranges: Iterable[Sequence[int]] = ()) -> None:
        spans = []
        for span in ranges:
            check_skip_range(list(span))
            spans.append((int(span[0]), int(span[1])))
        merged: List[Tuple[int, int]] = []
        for start, end in sorted(spans):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        self.ranges = merged
        self._starts = [start for start, _ in merged]

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SkippedSamples) and self.ranges == other.ranges

    def __repr__(self) -> str:
        return f"SkippedSamples({self.to_list()})"

    def union(self, other: "SkippedSamples") -> "SkippedSamples":
        return SkippedSamples(self.ranges + other.ranges)

    def to_list(self) -> List[List[int]]:
        return [[start, end] for start, end in self.ranges]

    def _past_skip(self, position: int) -> int:
        """`position`, or the end of the range that holds it."""
        index = bisect.bisect_right(self._starts, position) - 1
        if index >= 0 and position < self.ranges[index][1]:
            return self.ranges[index][1]
        return position

    def take(self, position: int, count: int) -> Tuple[List[int], int]:
        """The next `count` positions from `position` outside every range, and the position after the last."""
        taken = []
        while len(taken) < count:
            position = self._past_skip(position)
            index = bisect.bisect_right(self._starts, position)
            limit = self.ranges[index][0] if index < len(self.ranges) else position + count
            end = min(limit, position + count - len(taken))
            taken.extend(range(position, end))
            position = end
        return taken, position

    def advance(self, position: int, count: int) -> int:
        """Where the stream stands after `count` more samples have been read from `position`."""
        return self.take(position, count)[1] if self.ranges else position + count

    def within(self, start: int, end: int) -> int:
        """How many positions of [start, end) the ranges hold."""
        return sum(max(0, min(end, b) - max(start, a)) for a, b in self.ranges)
