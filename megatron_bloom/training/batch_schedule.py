"""The global batch size of each step: constant, or ramped up by samples consumed (Megatron-LM's
`--rampup-batch-size <start> <increment> <ramp samples>`, which BLOOM-176B trained with: 16 -> 2048 in
steps of 16 over 20 M samples)."""

from __future__ import annotations

from typing import Optional, Sequence


def global_batch_size_at(consumed_samples: int, global_batch_size: int,
                         rampup: Optional[Sequence[int]] = None) -> int:
    """The batch size of the step that starts after `consumed_samples`.

    `rampup = (start, increment, ramp_samples)`: the batch starts at `start` and grows by `increment` each
    time another `ramp_samples / ((global_batch_size - start) / increment)` samples have been consumed,
    reaching `global_batch_size` once `ramp_samples` have been consumed.
    """
    if not rampup:
        return global_batch_size
    start, increment, ramp_samples = rampup
    if consumed_samples >= ramp_samples:
        return global_batch_size
    samples_per_increment = ramp_samples / ((global_batch_size - start) // increment)
    return min(global_batch_size, start + int(consumed_samples / samples_per_increment) * increment)
