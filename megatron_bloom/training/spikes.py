"""Loss spikes: an iteration's loss far above its recent running statistics, or a run of non-finite steps.

BLOOM-176B and OPT-175B met them by hand: restart from a checkpoint before the spike and step over the data
it was trained on. With `train.loss_spike.policy=rollback` the run does that itself (training/loop.py);
`log` records each spike in `run.dir/events.jsonl` and goes on.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Optional

from megatron_bloom.config.schema import LossSpikeConfig

MIN_HISTORY = 10  # losses in the window before spikes are looked for
MIN_RELATIVE_STD = 0.01  # a window of near-constant losses must not make every wiggle a spike


class SpikeDetector:
    """Fed every iteration's global-batch loss (the same on all ranks, so all ranks decide alike)."""

    def __init__(self, settings: LossSpikeConfig) -> None:
        self.settings = settings
        self.window: deque = deque(maxlen=settings.window)
        self.consecutive_skips = 0

    def reset(self) -> None:
        """After a rollback: the statistics start again from the reloaded checkpoint."""
        self.window.clear()
        self.consecutive_skips = 0

    def check(self, loss: float, skipped: bool) -> Optional[str]:
        """None, or why this iteration is a spike. A spike's loss does not enter the statistics."""
        if self.settings.policy == "off":
            return None
        if skipped or not math.isfinite(loss):
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.settings.skipped_steps:
                return f"{self.consecutive_skips} non-finite steps in a row"
            return None
        self.consecutive_skips = 0
        if len(self.window) >= MIN_HISTORY:
            mean = statistics.fmean(self.window)
            std = max(statistics.pstdev(self.window), MIN_RELATIVE_STD * abs(mean))
            if loss > mean + self.settings.sigmas * std:
                return (f"loss {loss:.4f} is {(loss - mean) / std:.1f} standard deviations above the mean "
                        f"{mean:.4f} of the last {len(self.window)} iterations")
        self.window.append(loss)
        return None
