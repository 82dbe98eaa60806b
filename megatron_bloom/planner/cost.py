"""A training iteration's time, predicted from the config and the hardware alone (no run).

One iteration of 1F1B over pp stages and m micro-batches per data-parallel replica (Narayanan et al. 2021,
section 2.2) takes (m + pp - 1) slots of the slowest stage's forward and backward of one micro-batch, then
the data-parallel gradient reduction and the optimizer step:

    T = (m + pp - 1) * max_s (compute_s + tp_s + p2p_s)  +  dp_exposed  +  optimizer

- compute_s: the stage's GEMM FLOPs per tensor-parallel rank at the hardware's achieved rate, by shape class:
  the linears' (and the LM head's) at `gemm_efficiency` of peak, attention's batched s x s products at
  `attention_efficiency`. Per block and micro-batch of b sequences of s tokens, a forward costs 24 b s h^2 + 4 b
  s^2 h FLOPs (model/flops.py); a backward twice that; full recomputation one forward more. The last stage adds
  the LM head (2 b s h V forward, never recomputed). Then the element-wise work (LayerNorms, bias, GeLU,
  softmax, dropout, residuals), bound by memory: each pass writes and reads again about the activations a block
  keeps for its backward (Korthikanti et al. 2022; planner/memory.py), so a forward moves 2 A bytes, a backward
  twice that, at the memory bandwidth.
- tp_s: the tensor-parallel collectives of the stage's blocks, embedding and head (the bytes
  planner/communication.py counts), at the intra-node bus bandwidth plus a latency per collective. Megatron-style
  tensor parallelism waits for them: none overlaps compute.
- p2p_s: the activations forward and their gradient backward across the stage's boundaries, at the inter-node
  bandwidth per GPU when the neighbouring stage is on another node (ranks run tp fastest, then dp, then pp:
  stages are tp x dp ranks apart), else intra-node.
- dp: a ring all-reduce of the gradients of the rank's parameters over dp ranks (ZeRO 1 and 2 send the same
  bytes as a reduce-scatter and an all-gather; ZeRO 3 half as much again, gathering the parameters twice), at the inter-node bandwidth per GPU once the replicas span
  nodes; at pp > 1 the embedding's gradient is also summed between the first and the last stage, which both hold
  it (tied). DeepSpeed's pipeline engine reduces after the last backward; at pp = 1 the reduction overlaps the
  last micro-batch's backward (`overlap_comm`), so only what outlasts it shows.
- optimizer: Adam's memory traffic over the rank's share of the parameters (ZeRO 1 and 2 divide it by dp): the
  float32 master weights, gradients and two moments read, the moments and weights written, and the 16-bit
  weights written: 30 bytes per parameter at the memory bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from megatron_bloom.config import TrainConfig
from megatron_bloom.planner.communication import (
    all_reduce,
    tensor_parallel_per_micro_batch,
    training_communication,
)
from megatron_bloom.planner.hardware import Hardware
from megatron_bloom.planner.memory import (
    WEIGHT_BYTES,
    StagePlan,
    layer_activation_bytes,
    micro_batches_per_step,
    plan_stages,
)

ADAM_BYTES_PER_PARAMETER = 30.0  # read master 4, grad 4, m 4, v 4; write master 4, m 4, v 4; write 16-bit 2


@dataclass
class StageTime:
    stage: int
    compute_s: float  # forward and backward (and recomputation) of one micro-batch
    tp_s: float  # its tensor-parallel collectives
    p2p_s: float  # its sends to and receives from the neighbouring stages

    @property
    def slot_s(self) -> float:
        return self.compute_s + self.tp_s + self.p2p_s


@dataclass
class IterationTime:
    stages: List[StageTime]
    micro_batches: int
    pipeline_s: float  # (m + pp - 1) slots of the slowest stage
    data_parallel_s: float  # the gradient reduction that does not overlap
    optimizer_s: float

    @property
    def total_s(self) -> float:
        return self.pipeline_s + self.data_parallel_s + self.optimizer_s


def predict_iteration(config: TrainConfig, device: Hardware,
                      stages: Optional[List[StagePlan]] = None) -> IterationTime:
    """The time of one training iteration of `config` (parallel.dp explicit) on `device`; `stages`: its
    `plan_stages`, when the caller has them already."""
    parallel, train = config.parallel, config.train
    stages = stages if stages is not None else plan_stages(config)
    times = [stage_time(config, stage, device) for stage in stages]
    m = micro_batches_per_step(config)
    pipeline_s = (m + parallel.pp - 1) * max(time.slot_s for time in times)
    dp_s = max(data_parallel_seconds(config, stage, device) for stage in stages)
    if parallel.pp == 1:  # overlapped with the last micro-batch's backward
        dp_s = max(0.0, dp_s - times[0].compute_s * 2 / (4 if train.activation_checkpointing else 3))
    shards = parallel.dp if config.zero.stage >= 1 else 1
    optimizer_s = max(stage.params_per_rank for stage in stages) / shards * ADAM_BYTES_PER_PARAMETER / (
        device.memory_gb_per_s * 1e9)
    return IterationTime(times, m, pipeline_s, dp_s, optimizer_s)


def stage_time(config: TrainConfig, stage: StagePlan, device: Hardware) -> StageTime:
    model, parallel, train = config.model, config.parallel, config.train
    s, b, h, t = config.sample_length, train.micro_batch_size, model.hidden_size, parallel.tp
    last = stage.stage == parallel.pp - 1 and not config.fine_tuning
    passes = 4 if train.activation_checkpointing else 3  # forward, backward (2), recomputed forward
    peak = device.peak_tflops(config.precision) * 1e12
    dense = stage.blocks * 24.0 * b * s * h * h / t * passes
    attention = stage.blocks * 4.0 * b * s * s * h / t * passes
    if last:
        dense += 2.0 * b * s * h * model.padded_vocab_size(t) / t * 3
    elementwise = stage.blocks * 2.0 * layer_activation_bytes(config) * passes
    compute_s = (dense / (peak * device.gemm_efficiency) + attention / (peak * device.attention_efficiency)
                 + elementwise / (device.memory_gb_per_s * 1e9))
    collectives, tp_bytes = tensor_parallel_per_micro_batch(config, stage)
    tp_s = transfer_seconds(tp_bytes, collectives, device, across_nodes=False)
    boundaries = (stage.stage > 0) + (stage.stage < parallel.pp - 1)
    across_nodes = t * parallel.dp >= device.gpus_per_node  # neighbouring stages are tp x dp ranks apart
    pipeline_bytes = training_communication(config, stage)["pipeline"] / micro_batches_per_step(config)
    p2p_s = transfer_seconds(pipeline_bytes, boundaries, device, across_nodes)
    return StageTime(stage.stage, compute_s, tp_s, p2p_s)


def data_parallel_seconds(config: TrainConfig, stage: StagePlan, device: Hardware) -> float:
    """The gradient reduction of one rank of `stage`: over the data-parallel replicas, and at pp > 1 the tied
    embedding's between the end stages."""
    parallel, width = config.parallel, WEIGHT_BYTES[config.precision]
    seconds = 0.0
    if parallel.dp > 1:
        across_nodes = parallel.tp * parallel.dp > device.gpus_per_node
        # ZeRO 3 gathers the parameters for the forward and again for the backward, and reduce-scatters the
        # gradients: 3 (d - 1) / d of them, against an all-reduce's 2 (Rajbhandari et al. 2020, section 7)
        factor = 1.5 if config.zero.stage == 3 else 1.0
        seconds += factor * transfer_seconds(all_reduce(stage.params_per_rank * width, parallel.dp),
                                             2 * (parallel.dp - 1), device, across_nodes)
    end_stage = stage.stage in (0, parallel.pp - 1)
    if parallel.pp > 1 and end_stage and not config.fine_tuning:
        embedding = config.model.padded_vocab_size(parallel.tp) // parallel.tp * config.model.hidden_size
        seconds += transfer_seconds(all_reduce(embedding * width, 2), 2, device, across_nodes=True)
    return seconds


def transfer_seconds(sent_bytes: float, messages: int, device: Hardware, across_nodes: bool) -> float:
    bandwidth = device.inter_node_gb_per_s if across_nodes else device.intra_node_gb_per_s
    latency = device.inter_node_latency_s if across_nodes else device.intra_node_latency_s
    return sent_bytes / (bandwidth * 1e9) + messages * latency
