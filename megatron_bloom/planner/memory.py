"""What one rank holds while training: parameters per pipeline stage and tensor-parallel rank, and memory for
weights, gradients, optimizer state and activations, from the config alone (no processes, no weights).

Parameters (exact; BLOOM's layout, the LM head tied to the embedding):
    embedding          padded_vocab(tp) / tp * h        on the first stage, and a tied copy on the last
    embedding norm     2h                               first stage
    block              12h^2/t + 7h/t + 6h             (QKV, attention output, 4h MLP split over t ranks;
                                                        LayerNorms and row-parallel biases replicated)
    final norm         2h                               last stage
Stages hold the layers `parallel.pipeline_partition` gives them (`pipeline/partition.py`).

Memory per rank, P = this rank's parameters, d = dp, DeepSpeed's mixed-precision optimizers:
    weights     P * w            (w = 2 bytes in bf16/fp16, 4 in fp32); ZeRO 3: / d
    gradients   P * 2 + P * 4    16-bit runs: the weights' own gradients, then DeepSpeed accumulates in fp32
                                 (its BF16 optimizer, ZeRO, the fp16/bf16 wrapper); fp32 runs: P * 4;
                                 ZeRO 2/3 partition the fp32 part: / d. bf16 at ZeRO 1 with d > 1 adds
                                 the float32 all-reduce bucket of DeepSpeed's BF16 optimizer,
                                 4 * min(P, 5e8) (its default bucket of 5e8 elements)
    optimizer   P * (8 + 4 m)    Adam's two fp32 moments, plus the fp32 master (m = 1) unless a plain fp32
                                 run without ZeRO (m = 0); ZeRO 1-3: / d
    activations per micro-batch and transformer layer (Korthikanti et al. 2022, "Reducing Activation
                Recomputation in Large Transformer Models", Table 2; s tokens, b micro-batch, h hidden,
                a heads, t tp; 2-byte activations, doubled in fp32):
                    s*b*h * (10 + 24/t) + 5*a*s^2*b/t     tensor parallel
                    s*b*h * 34/t + 5*a*s^2*b/t            with sequence parallelism
                the 5*a*s^2*b/t term (attention scores, softmax) only with attention_impl=eager; the fused
                kernel keeps no s x s matrix on GPUs (ALiBi folded into q.k) and its 2*a*s^2*b/t bias on CPUs.
                Full recomputation keeps each layer's input, 2*s*b*h (/ t with
                sequence parallelism), plus one layer's activations while it is recomputed. Stage k of a 1F1B
                pipeline holds min(pp - k, micro-batches) micro-batches in flight; the last stage adds the
                logits, s*b*V/t * 2w: the logits (the chunked cross-entropy keeps them, no fp32 copy) and their
                gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from megatron_bloom.config import TrainConfig
from megatron_bloom.model.causal_blocks import CAUSAL_BLOCK_ROWS
from megatron_bloom.planner.hardware_file import is_cpu
from megatron_bloom.pipeline.partition import stage_layers

GB = 1e9
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ALLREDUCE_BUCKET_ELEMENTS = 5e8  # DeepSpeed's default allreduce_bucket_size


@dataclass
class Memory:
    """Bytes on one rank."""

    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def in_gb(self) -> dict:
        return {key: round(value / GB, 3) for key, value in (
            ("weights", self.weights), ("grads", self.grads), ("optimizer", self.optimizer),
            ("activations", self.activations), ("total", self.total))}


@dataclass
class StagePlan:
    stage: int
    blocks: int
    params_per_rank: int  # one tensor-parallel rank of this stage
    memory: Memory = field(default_factory=Memory)


def block_parameters_per_rank(h: int, tp: int) -> int:
    """One transformer block on one of `tp` ranks (see the module docstring)."""
    return 12 * h * h // tp + 7 * h // tp + 6 * h


def stage_parameters(config: TrainConfig) -> List[StagePlan]:
    """Every pipeline stage's blocks and parameters per tensor-parallel rank."""
    model, tp, pp = config.model, config.parallel.tp, config.parallel.pp
    h = model.hidden_size
    embedding = model.padded_vocab_size(tp) // tp * h
    # layer_specs: embedding, its norm, the blocks, final norm, then the LM head (a tied copy of the
    # embedding) or a fine-tuning head (a few outputs per position: left out)
    lm_head = model.num_layers + 3 if not config.fine_tuning else None
    plans = []
    partition = config.parallel.pipeline_partition
    for stage, layers in enumerate(stage_layers(model, pp, config.task.name, partition)):
        blocks = sum(1 for layer in layers if 2 <= layer < model.num_layers + 2)
        params = blocks * block_parameters_per_rank(h, tp)
        params += embedding if (0 in layers or lm_head in layers) else 0
        params += 2 * h if 1 in layers else 0
        params += 2 * h if model.num_layers + 2 in layers else 0
        plans.append(StagePlan(stage, blocks, params))
    return plans


def micro_batches_per_step(config: TrainConfig) -> int:
    return config.train.global_batch_size // (config.train.micro_batch_size * config.parallel.dp)


def layer_activation_bytes(config: TrainConfig) -> float:
    """Activations one transformer layer keeps for the backward pass, per micro-batch (no recomputation)."""
    model, parallel = config.model, config.parallel
    s, b, h, a, t = config.sample_length, config.train.micro_batch_size, model.hidden_size, model.num_heads, parallel.tp
    scale = 2.0 if config.precision == "fp32" else 1.0  # Korthikanti's counts assume 2-byte activations
    linear = s * b * h * (34.0 / t if parallel.sequence_parallel else 10.0 + 24.0 / t)
    if model.attention_impl == "eager":
        scores = 5.0 * a * s * s * b / t
    elif is_cpu(config.hardware) and not config.fine_tuning:
        # Causal blocks keep each block's 2-byte probabilities against the keys up to it: (n + 1) / 2n of s x s.
        blocks = -(-s // CAUSAL_BLOCK_ROWS)
        scores = 2.0 * a * s * s * b * (blocks + 1) / (2 * blocks) / t
    elif is_cpu(config.hardware):  # padded samples: the masked kernel keeps ALiBi + mask, a 2-byte s x s per head
        scores = 2.0 * a * s * s * b / t
    else:  # GPUs: ALiBi folded into q.k, causal flash kernel, nothing of size s x s
        scores = 0.0
    return scale * (linear + scores)


def activation_bytes(config: TrainConfig, stage: StagePlan) -> float:
    model, parallel, train = config.model, config.parallel, config.train
    s, b, h, t = config.sample_length, train.micro_batch_size, model.hidden_size, parallel.tp
    w = WEIGHT_BYTES[config.precision]
    per_layer = layer_activation_bytes(config)
    if train.activation_checkpointing:
        kept = w * s * b * h / (t if parallel.sequence_parallel else 1)
        per_micro_batch = stage.blocks * kept
        working = per_layer  # the one layer being recomputed
    else:
        per_micro_batch = stage.blocks * per_layer
        working = 0.0
    in_flight = min(parallel.pp - stage.stage, micro_batches_per_step(config))
    total = in_flight * per_micro_batch + working
    if stage.stage == parallel.pp - 1 and not config.fine_tuning:  # the LM head's logits and their gradient
        total += s * b * model.padded_vocab_size(t) / t * 2 * w
    return total


def rank_memory(config: TrainConfig, stage: StagePlan) -> Memory:
    params, dp, zero = stage.params_per_rank, config.parallel.dp, config.zero.stage
    w = WEIGHT_BYTES[config.precision]
    master = 0 if config.precision == "fp32" and zero == 0 else 4
    low_precision_grads = params * 2 if w == 2 else 0
    # bf16 gradients are reduced in float32 (training/deepspeed_config.py), at ZeRO 1 through one flat bucket
    reduction_bucket = 4 * min(params, ALLREDUCE_BUCKET_ELEMENTS) if (
        config.precision == "bf16" and zero == 1 and dp > 1) else 0
    return Memory(
        weights=params * w / (dp if zero >= 3 else 1),
        grads=low_precision_grads + params * 4 / (dp if zero >= 2 else 1) + reduction_bucket,
        optimizer=params * (8 + master) / (dp if zero >= 1 else 1),
        activations=activation_bytes(config, stage))


def plan_stages(config: TrainConfig) -> List[StagePlan]:
    """Parameters and memory of every stage (`config.parallel.dp` must be set)."""
    stages = stage_parameters(config)
    for stage in stages:
        stage.memory = rank_memory(config, stage)
    return stages
