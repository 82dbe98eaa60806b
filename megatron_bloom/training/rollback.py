"""What a run does about a loss spike (training/spikes.py finds them): record it, and under
`train.loss_spike.policy=rollback` reload the newest checkpoint from before it and step over the samples
the spike was trained on, as BLOOM-176B's and OPT-175B's teams did by hand.

The skipped range goes into `events.jsonl` at once and into every later checkpoint, so a resume (even from
the checkpoint the rollback reloaded, which predates it) skips the same samples.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import torch.distributed as dist

from megatron_bloom.checkpoint.layout import newest_complete_checkpoint, read_metadata
from megatron_bloom.config import TrainConfig
from megatron_bloom.data.skips import SkippedSamples
from megatron_bloom.errors import UserError
from megatron_bloom.parallel import ParallelState
from megatron_bloom.parallel.distributed import decided_on_rank_zero
from megatron_bloom.training.checkpointing import Progress, resume, resumes_exactly
from megatron_bloom.training.events import record_event
from megatron_bloom.training.resilience import RunGuards


def checkpoint_before(config: TrainConfig, state: ParallelState, iteration: int) -> Optional[Path]:
    """Rank 0's choice, shared: the newest complete checkpoint of checkpoint.dir saved before `iteration`
    that this run can load exactly."""
    def choose() -> Optional[Path]:
        if not config.checkpoint.dir:
            return None
        directory = newest_complete_checkpoint(Path(config.checkpoint.dir), warn=False, before=iteration)
        if directory is not None and resumes_exactly(read_metadata(directory), config, state):
            return directory
        return None

    return decided_on_rank_zero(choose)


def handle_spike(engine, config: TrainConfig, state: ParallelState, guards: RunGuards, progress: Progress,
              iteration: int, loss: float, reason: str, samples: List[int]) -> Optional[Progress]:
    """Called on every rank when iteration `iteration` (which read `samples` = [start, end) of the stream)
    was a spike. Returns the progress to go on from after a rollback, or None to go on as if nothing
    happened (policy `log`, or no checkpoint to go back to)."""
    policy = config.train.loss_spike.policy
    is_logger = dist.get_rank() == 0
    if is_logger:
        record_event(guards.run_dir, "loss_spike", iteration=iteration, loss=loss, reason=reason,
                     samples=samples, policy=policy)
        print(f"mbloom-train: loss spike at iteration {iteration}: {reason}", file=sys.stderr, flush=True)
    if policy != "rollback":
        return None
    guards.rollbacks += 1
    if guards.rollbacks > config.train.loss_spike.max_rollbacks:
        raise UserError(f"the loss spiked again at iteration {iteration} ({reason}) after "
                        f"{config.train.loss_spike.max_rollbacks} rollbacks (train.loss_spike.max_rollbacks) in "
                        f"this run; see {guards.run_dir / 'events.jsonl'}. Look at the data and the learning rate "
                        "before going on.")
    directory = checkpoint_before(config, state, iteration)
    if directory is None:
        if is_logger:
            print(f"mbloom-train: no complete checkpoint of this layout before iteration {iteration} in "
                  f"checkpoint.dir ({config.checkpoint.dir}): going on without a rollback", file=sys.stderr,
                  flush=True)
        return None
    metadata = read_metadata(directory)
    restored = resume(engine, directory, metadata, state)
    skipped = (SkippedSamples(progress.skipped_samples).union(SkippedSamples(restored.skipped_samples))
               .union(SkippedSamples([samples])))
    restored.skipped_samples = skipped.to_list()
    guards.spikes.reset()
    if is_logger:
        record_event(guards.run_dir, "rollback", iteration=iteration, to_iteration=restored.iteration,
                     checkpoint=str(directory), skipped_samples=samples, rollback=guards.rollbacks)
        print(f"mbloom-train: rolled back to {directory} (iteration {restored.iteration}); samples "
              f"[{samples[0]}, {samples[1]}) are skipped from now on", file=sys.stderr, flush=True)
    return restored
