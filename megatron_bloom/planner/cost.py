"""A training iteration's time, predicted from the config and the hardware alone (no run).

One iteration of 1F1B over pp stages and m micro-batches per data-parallel replica (Narayanan et al. 2021,
section 2.2) takes (m + pp - 1) slots of a stage's forward and backward of one micro-batch when the stages are
equal; when they are not, the first micro-batch's forward and last one's backward cross every stage once and
the m - 1 others pass the slowest (the last stage, which adds the LM head, usually). Then the data-parallel
gradient reduction and the optimizer step:

    T = sum_s slot_s + (m - 1) * max_s slot_s  +  dp  +  optimizer,     slot_s = compute_s + tp_s + p2p_s

- compute_s: the stage's GEMM FLOPs per tensor-parallel rank at the hardware's achieved rate, by shape class:
  the linears' at `gemm_efficiency` of peak, the LM head's (with its loss) at `lm_head_efficiency`,
  attention's batched s x s products at `attention_efficiency`. Per block and micro-batch of b sequences of s
  tokens, a forward costs 24 b s h^2 + 4 b s^2 h FLOPs (model/flops.py); a backward twice that; full
  recomputation one forward more (a calibrated machine's `recompute_passes`: what checkpointing costs there,
  in forwards). The last stage adds the LM head (2 b s h V forward, never recomputed). Then the element-wise
  work (LayerNorms, bias, GeLU, softmax, dropout, residuals), bound by memory: each pass writes and reads again about the activations a block
  keeps for its backward (Korthikanti et al. 2022; planner/memory.py), so a forward moves 2 A bytes, a backward
  twice that, at the memory bandwidth. A calibrated machine measured these rates on whole blocks at tp 1,
  operator dispatch included; tp divides the work but each rank dispatches every operator, so its share of
  the `block_overhead_s` a block's dispatch takes is added back, (1 - 1/t) of it per block and pass; where the
  calibration timed the block at the layout's tp degree itself (`tensor_parallel_block_s`: narrower operands,
  each rank's dispatch and the block's collectives, as the trainer runs it), that time replaces all of this
  and the block's collectives. At ZeRO 3, DeepSpeed's hooks on every module add `zero3_block_overhead_s` a
  block and micro-batch and `zero3_micro_batch_overhead_s` for the rest of the model (calibrated; pp is 1 at
  ZeRO 3). The trainer's own work beyond all this (DeepSpeed's engine and hooks, gradient accumulation, the
  embedding's backward) adds `micro_batch_overhead_s` and `block_micro_batch_overhead_s` per block to each
  micro-batch, and `step_overhead_s` and `block_step_overhead_s` per block of the largest stage to the
  optimizer's step: what a calibration's runs of the trainer took beyond this model's prediction, the ranks
  as data-parallel replicas for a layout with them, one rank alone for a layout without (its ranks do what
  one rank alone does; replicas do more: their reduction's bookkeeping).
- tp_s: the tensor-parallel collectives of the stage's blocks, embedding and head (the bytes
  planner/communication.py counts), at the intra-node bus bandwidth plus a latency per collective. Megatron-style
  tensor parallelism waits for them: none overlaps compute.
- p2p_s: the activations forward and their gradient backward across the stage's boundaries, at the inter-node
  bandwidth per GPU when the neighbouring stage is on another node (ranks run tp fastest, then dp, then pp:
  stages are tp x dp ranks apart), else intra-node.
- dp: a ring all-reduce of the gradients of the rank's parameters over dp ranks (float32 in bf16 runs with
  ZeRO, as training/deepspeed_config.py asks DeepSpeed; ZeRO 1 sends the same bytes as a reduce-scatter and an
  all-gather, and in bf16 DeepSpeed's BF16 optimizer all-reduces the float32 gradients whole, then gathers
  the updated bf16 weights; ZeRO 2 and 3 reduce-scatter after every micro-batch, and ZeRO 3 gathers the
  parameters twice a micro-batch: `zero_reductions`), at the inter-node bandwidth
  per GPU once the replicas span nodes; at pp > 1 the embedding's gradient is also summed between the first
  and the last stage, which both hold it (tied). None of it overlaps compute: DeepSpeed's pipeline engine and its BF16 optimizer (ZeRO 1) reduce
  after the last backward, and ZeRO 2 and 3 without `overlap_comm` (training/deepspeed_config.py leaves it
  off) reduce each bucket in the backward hook, waiting for it.
- optimizer: Adam's memory traffic over the rank's share of the parameters (ZeRO 1 and 2 divide it by dp): the
  float32 master weights, gradients and two moments read, the moments and weights written, and the 16-bit
  weights written: 30 bytes per parameter at the memory bandwidth (a calibrated machine's own Adam rate).

A calibrated machine (a hardware file) gives the figures of one rank when the layout's ranks all run on it
at once (`Hardware.for_layout`), and its own data-parallel and point-to-point links within the node. On a
CPU whose cores the ranks share, the slots of the sum above run while the other stages wait, with their
cores (`Hardware.while_one_stage_runs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from megatron_bloom.config import TrainConfig
from megatron_bloom.planner.communication import (
    all_reduce,
    pipeline_per_micro_batch,
    tensor_parallel_per_micro_batch,
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
    pipeline_s: float  # every stage's slot once, then m - 1 slots of the slowest
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
    world = parallel.tp * parallel.pp * parallel.dp
    alone = device.while_one_stage_runs(world, parallel.pp, train.micro_batch_size)
    # the trainer's own work was measured with a calibration's ranks as data-parallel replicas, and on one
    # rank alone: a layout without replicas does on each rank what one rank alone does (its replicas' work,
    # twice and more the one rank's on this machine, is theirs)
    trainer = device.for_layout(world if parallel.dp > 1 else 1, train.micro_batch_size)
    device = device.for_layout(world, train.micro_batch_size)
    stages = stages if stages is not None else plan_stages(config)
    times = [stage_time(config, stage, device, trainer) for stage in stages]
    m = micro_batches_per_step(config)
    # the first forward and the last backward: each stage while the others wait (on a CPU, with their cores)
    crossing = times if alone is device else [stage_time(config, stage, alone, trainer) for stage in stages]
    pipeline_s = sum(time.slot_s for time in crossing) + (m - 1) * max(time.slot_s for time in times)
    dp_s = max(data_parallel_seconds(config, stage, device) for stage in stages)
    shards = parallel.dp if config.zero.stage >= 1 else 1
    optimizer_s = max(stage.params_per_rank for stage in stages) / shards * ADAM_BYTES_PER_PARAMETER / (
        (device.optimizer_gb_per_s or device.memory_gb_per_s) * 1e9)
    # the trainer's per-step work (and per block: what scales with the parameters)
    optimizer_s += trainer.step_overhead_s + max(stage.blocks for stage in stages) * trainer.block_step_overhead_s
    return IterationTime(times, m, pipeline_s, dp_s, optimizer_s)


def stage_time(config: TrainConfig, stage: StagePlan, device: Hardware,
               trainer: Optional[Hardware] = None) -> StageTime:
    """One micro-batch's slot of `stage` on `device` (one rank's figures), with the trainer's own work in it
    from `trainer`'s figures (default: the device's)."""
    trainer = trainer or device
    model, parallel, train = config.model, config.parallel, config.train
    s, b, h, t = config.sample_length, train.micro_batch_size, model.hidden_size, parallel.tp
    last = stage.stage == parallel.pp - 1 and not config.fine_tuning
    passes = 3 + (device.recompute_passes if train.activation_checkpointing else 0)  # forward, backward (2)
    peak = device.peak_tflops(config.precision) * 1e12
    head = 2.0 * b * s * h * model.padded_vocab_size(t) / t * 3 if last else 0.0
    compute_s = head / (peak * (device.lm_head_efficiency or device.gemm_efficiency))
    measured_block = device.tensor_parallel_block_s(t, parallel.sequence_parallel, b)  # tp > 1 only
    if measured_block is not None:  # timed as this layout runs it: its collectives are in it
        compute_s += stage.blocks * measured_block * passes / 3
    else:
        dense = stage.blocks * 24.0 * b * s * h * h / t * passes
        attention = stage.blocks * 4.0 * b * s * s * h / t * passes
        elementwise = stage.blocks * 2.0 * layer_activation_bytes(config) * passes
        # the rates were measured on whole (tp 1) blocks, dispatch included; tp divides the work but not that
        undivided = stage.blocks * passes / 3 * device.block_overhead_s * (1 - 1 / t)
        compute_s += (dense / (peak * device.gemm_efficiency) + attention / (peak * device.attention_efficiency)
                      + elementwise / (device.memory_gb_per_s * 1e9) + undivided)
    # the trainer's own work in each micro-batch (a calibrated machine's figures)
    compute_s += trainer.micro_batch_overhead_s + stage.blocks * trainer.block_micro_batch_overhead_s
    if config.zero.stage == 3:  # DeepSpeed's per-module work (a calibrated machine's figures)
        compute_s += stage.blocks * device.zero3_block_overhead_s + device.zero3_micro_batch_overhead_s
    collectives, tp_bytes = tensor_parallel_per_micro_batch(config, stage, blocks=measured_block is None)
    tp_s = transfer_seconds(tp_bytes, collectives, device, across_nodes=False)
    sends, pipeline_bytes = pipeline_per_micro_batch(config, stage)
    across_nodes = device.nodes_apart(t * parallel.dp)  # neighbouring stages are tp x dp ranks apart
    p2p_s = transfer_seconds(pipeline_bytes, sends, device, across_nodes, "p2p")
    return StageTime(stage.stage, compute_s, tp_s, p2p_s)


def data_parallel_seconds(config: TrainConfig, stage: StagePlan, device: Hardware) -> float:
    """The gradient reduction of one rank of `stage`: over the data-parallel replicas, and at pp > 1 the tied
    embedding's between the end stages."""
    parallel, width = config.parallel, gradient_bytes(config)
    seconds = 0.0
    if parallel.dp > 1:
        across_nodes = device.nodes_apart(parallel.tp * parallel.dp)
        seconds += zero_reductions(config) * transfer_seconds(
            all_reduce(stage.params_per_rank * width, parallel.dp), 2 * (parallel.dp - 1), device, across_nodes,
            "gradient")
    end_stage = stage.stage in (0, parallel.pp - 1)
    if parallel.pp > 1 and end_stage and not config.fine_tuning:
        embedding = config.model.padded_vocab_size(parallel.tp) // parallel.tp * config.model.hidden_size
        seconds += transfer_seconds(all_reduce(embedding * width, 2), 2, device,
                                    device.nodes_apart(parallel.tp * parallel.dp * (parallel.pp - 1)), "gradient")
    return seconds


def zero_reductions(config: TrainConfig) -> float:
    """The data-parallel traffic of a step, in all-reduces of the gradients (2 (d - 1) / d of them each, at
    `gradient_bytes`; a reduce-scatter or an all-gather is half of one). ZeRO 0 and 1 reduce once a step: ZeRO 1
    reduce-scatters the gradients and gathers the new weights, except in bf16 (float32 gradients), where
    DeepSpeed's BF16 optimizer all-reduces the gradients whole (the engine's fallback all-reduce: it has no
    `reduce_gradients`) and then gathers the updated bf16 weights (`BF16_Optimizer.update_lp_params`). ZeRO
    2 and 3 keep only their partition of the gradients, so they reduce-scatter after every micro-batch's
    backward (DeepSpeed issue #2252); ZeRO 2 then gathers the new weights once a step, ZeRO 3 the parameters
    for every forward and again every backward (Rajbhandari et al. 2020, section 7), in the weights' width."""
    m, stage = micro_batches_per_step(config), config.zero.stage
    weights = WEIGHT_BYTES[config.precision] / gradient_bytes(config)  # a gather's width against a reduction's
    bf16_optimizer = weights < 1  # bf16 weights, float32 gradients
    return {1: (2 if bf16_optimizer else 1) / 2 + weights / 2, 2: (m + weights) / 2,
            3: m * (1 + 2 * weights) / 2}.get(stage, 1.0)


def gradient_bytes(config: TrainConfig) -> int:
    """Bytes per gradient element the data-parallel reduction sends: bf16 runs with ZeRO reduce in float32
    (training/deepspeed_config.py), others in the weights' width."""
    return 4 if config.precision == "bf16" and config.zero.stage >= 1 else WEIGHT_BYTES[config.precision]


def transfer_seconds(sent_bytes: float, messages: int, device: Hardware, across_nodes: bool,
                     link: str = "tensor_parallel") -> float:
    """Seconds to send `sent_bytes` in `messages`, between nodes or within one; within one, a "gradient" or
    "p2p" link has the figures a calibration measured for it, where it has them."""
    if across_nodes:
        bandwidth, latency = device.inter_node_gb_per_s, device.inter_node_latency_s
    else:
        bandwidth = {"gradient": device.gradient_gb_per_s, "p2p": device.p2p_gb_per_s}.get(link) \
            or device.intra_node_gb_per_s
        latency = {"gradient": device.gradient_latency_s, "p2p": device.p2p_latency_s}.get(link)
        latency = device.intra_node_latency_s if latency is None else latency
    return sent_bytes / (bandwidth * 1e9) + messages * latency
