"""What keeps a run going on a real cluster, gathered for the training loop: the attempt number of an
elastic restart, the lock on checkpoint.dir, the watchdog, the per-iteration exchange of stop requests and
step times, the samples to skip, and loss-spike decisions. Each piece lives in its own module; this one
wires them to one run.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_bloom.config import TrainConfig
from megatron_bloom.data.skips import SkippedSamples
from megatron_bloom.parallel.distributed import decided_on_rank_zero
from megatron_bloom.training.events import read_events, record_event
from megatron_bloom.training.run_lock import CheckpointDirLock, lock_checkpoint_dir
from megatron_bloom.training.spikes import SpikeDetector
from megatron_bloom.training.watchdog import Watchdog, previous_attempt


def restart_attempt() -> int:
    """0 for a job's first start; k for torchrun's k-th restart of its ranks (launcher.max_restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def config_for_attempt(config: TrainConfig) -> TrainConfig:
    """A restarted attempt resumes from the newest complete checkpoint of checkpoint.dir, whatever
    checkpoint.load the job started with."""
    if restart_attempt() > 0 and config.checkpoint.dir and config.checkpoint.load != "auto":
        config = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, load="auto"))
    return config


class StopSignal:
    """SIGTERM (SLURM preemption, `scancel`, torchrun shutting down) asks the run to stop after the current
    iteration. Ranks may receive it at different moments, so the decision is exchanged every iteration
    (`IterationExchange`): all ranks stop after the same one."""

    def __init__(self) -> None:
        self.received = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


@dataclass
class IterationStats:
    stop: bool  # some rank received SIGTERM
    slowest_rank: int
    slowest_step_s: float
    median_step_s: float
    all_written: bool  # every rank has written its files of the async save in flight


def exchange_iteration(stop: StopSignal, step_s: float, written: bool = True,
                       device: torch.device = torch.device("cpu")) -> IterationStats:
    """One all-gather per iteration of (SIGTERM received, step time, async save written) from every rank:
    whether to stop, the straggler (the slowest rank's step next to the median) for metrics.jsonl, and
    whether the checkpoint in flight can be published. (`device`: where the backend takes tensors, a GPU
    for NCCL.)"""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return IterationStats(stop.received, 0, step_s, step_s, written)
    mine = torch.tensor([float(stop.received), step_s, float(written)], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    gathered = [row.cpu() for row in gathered]
    steps = [float(row[1]) for row in gathered]
    slowest = max(range(len(steps)), key=steps.__getitem__)
    return IterationStats(any(float(row[0]) > 0 for row in gathered), slowest, steps[slowest],
                          statistics.median(steps), all(float(row[2]) > 0 for row in gathered))


def rollback_skips(run_dir: Path) -> SkippedSamples:
    """The samples earlier rollbacks of this run stepped over (events.jsonl), which a checkpoint saved
    before a rollback does not know of."""
    return SkippedSamples([event["skipped_samples"] for event in read_events(run_dir)
                           if event.get("event") == "rollback" and isinstance(event.get("skipped_samples"), list)])


def skipped_samples(config: TrainConfig, saved: Optional[List[List[int]]]) -> SkippedSamples:
    """Every range this run skips: `train.skip_samples`, the checkpoint's, and earlier rollbacks' (rank 0
    reads run.dir, which other nodes may not see, and tells every rank)."""
    return SkippedSamples(decided_on_rank_zero(lambda: (
        SkippedSamples(config.train.skip_samples or []).union(SkippedSamples(saved or []))
        .union(rollback_skips(Path(config.run.dir))).to_list())))


class RunGuards:
    """The lock, the watchdog and the spike detector of one run on one rank."""

    def __init__(self, config: TrainConfig, rank: int) -> None:
        self.config, self.rank, self.attempt = config, rank, restart_attempt()
        self.run_dir = Path(config.run.dir)
        self.lock: Optional[CheckpointDirLock] = None
        self.watchdog: Optional[Watchdog] = None
        self.spikes = SpikeDetector(config.train.loss_spike)
        self.rollbacks = 0

    def take_checkpoint_dir(self) -> None:
        if self.config.checkpoint.dir:
            self.lock = lock_checkpoint_dir(Path(self.config.checkpoint.dir), self.run_dir)

    def start(self, resumed_from: int) -> None:
        """After the start point is loaded: record a restart (rank 0), then start this rank's watchdog."""
        if self.attempt > 0 and self.rank == 0:
            before = previous_attempt(self.run_dir, self.attempt) or {"failed": [], "last_iteration": resumed_from}
            first = before["failed"][0] if before["failed"] else {}
            record_event(self.run_dir, "restart", restart=self.attempt, rank=first.get("rank"),
                         reason=first.get("reason", "unknown"), failed_ranks=before["failed"],
                         resumed_from=resumed_from,
                         iterations_lost=max(0, before["last_iteration"] - resumed_from))
            print(f"mbloom-train: restart {self.attempt}: rank {first.get('rank')} "
                  f"{first.get('reason', 'failed')}; resuming from iteration {resumed_from} "
                  f"({max(0, before['last_iteration'] - resumed_from)} iterations to run again)",
                  file=sys.stderr, flush=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # rank 0 has read the previous attempt's heartbeats before they are rewritten
        if self.config.train.watchdog.enabled:
            self.watchdog = Watchdog(self.config.train.watchdog, self.run_dir, self.rank, self.attempt)
            self.watchdog.start(resumed_from)

    def step_started(self) -> None:
        if self.watchdog is not None:
            self.watchdog.step_started_now()

    def step_ended(self, iteration: int, step_s: float) -> None:
        if self.watchdog is not None:
            self.watchdog.step_ended(iteration, step_s)

    def finish(self, state: str) -> None:
        if self.watchdog is not None:
            self.watchdog.stop(state)
        if self.lock is not None:
            self.lock.release()
