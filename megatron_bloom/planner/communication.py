"""Bytes one rank sends per training iteration, by kind, from the config alone.

Collectives are counted as ring algorithms do (Thakur et al. 2005; NCCL's bus-bandwidth convention): over
t ranks, an all-reduce of N bytes sends 2 (t - 1) / t N per rank, an all-gather or a reduce-scatter
(t - 1) / t N. N = s b h w is one micro-batch's hidden states (w bytes per element).

Tensor parallelism, per transformer block and micro-batch (Shoeybi et al. 2019; Korthikanti et al. 2022):
    without sequence parallelism  forward 2 all-reduces; backward 2 all-reduces          8 (t - 1) / t N
    with sequence parallelism     forward 2 all-gathers + 2 reduce-scatters; backward 2 all-gathers
                                  (the inputs stored sharded are gathered again) + 2 reduce-scatters
                                  + 2 all-gathers                                       10 (t - 1) / t N
    recomputation adds the forward's collectives again. The embedding adds a forward all-reduce (a
    reduce-scatter with SP) and the LM head a backward all-reduce (an all-gather and a reduce-scatter
    with SP). With SP, the LayerNorm and row-parallel-bias gradients (6 h per block, summed in fp32) are
    all-reduced in every backward.
Pipeline, per micro-batch and stage boundary: the activations forward and their gradient backward. Each tp
rank sends N / t: without SP DeepSpeed sends one slice of the replicated tensor and the next stage
all-gathers it ((t - 1) / t N more per rank); with SP each rank's own shard is all there is to send.
"""

from __future__ import annotations

from typing import Tuple

from megatron_bloom.config import TrainConfig
from megatron_bloom.planner.memory import WEIGHT_BYTES, StagePlan, micro_batches_per_step


def all_reduce(n: float, t: int) -> float:
    return 2.0 * (t - 1) / t * n


def gather(n: float, t: int) -> float:
    """An all-gather or a reduce-scatter."""
    return (t - 1) / t * n


def tensor_parallel_per_micro_batch(config: TrainConfig, stage: StagePlan, blocks: bool = True) -> Tuple[int, float]:
    """(collectives, bytes one rank sends) of `stage`'s tensor parallelism for one micro-batch (`blocks`: those
    of its transformer blocks too, else the rest's only)."""
    model, parallel, train = config.model, config.parallel, config.train
    t, sp = parallel.tp, parallel.sequence_parallel
    if t == 1:
        return 0, 0.0
    n = config.sample_length * train.micro_batch_size * model.hidden_size * WEIGHT_BYTES[config.precision]
    # per block: SP's all-gathers and reduce-scatters, or all-reduces; the recomputed forward's again
    per_block = (10 + 4 * train.activation_checkpointing) if sp else (4 + 2 * train.activation_checkpointing)
    # the embedding's lookups, summed, and the LM head's input
    ends = (stage.stage == 0) + (stage.stage == parallel.pp - 1 and not config.fine_tuning)
    collectives = stage.blocks * per_block * blocks + ends * (2 if sp else 1)
    sent = collectives * (gather(n, t) if sp else all_reduce(n, t))
    if sp:  # the LayerNorm and row-parallel-bias gradients, summed in fp32
        collectives += 1
        sent += all_reduce(stage.blocks * 6 * model.hidden_size * 4, t)
    return collectives, sent


def pipeline_per_micro_batch(config: TrainConfig, stage: StagePlan) -> Tuple[int, float]:
    """(sends, bytes one rank sends) of `stage`'s pipeline point-to-point for one micro-batch: one send across
    each boundary it has (forward and/or backward)."""
    model, parallel, train = config.model, config.parallel, config.train
    t, sp = parallel.tp, parallel.sequence_parallel
    n = config.sample_length * train.micro_batch_size * model.hidden_size * WEIGHT_BYTES[config.precision]
    boundaries = (stage.stage > 0) + (stage.stage < parallel.pp - 1)
    return boundaries, boundaries * (n / t + (0.0 if sp or t == 1 else gather(n, t)))


def training_communication(config: TrainConfig, stage: StagePlan) -> dict:
    """Bytes per iteration one rank of `stage` sends: tensor-parallel collectives (activations, and with SP
    the replicated parameters' gradients) and pipeline point-to-point."""
    micro_batches = micro_batches_per_step(config)
    return {"tensor_parallel": tensor_parallel_per_micro_batch(config, stage)[1] * micro_batches,
            "pipeline": pipeline_per_micro_batch(config, stage)[1] * micro_batches}
