"""The plan of a config: what `mbloom-plan` prints (a table) and `--json` returns (docs/commands.md)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_bloom.config import TrainConfig
from megatron_bloom.planner.communication import training_communication
from megatron_bloom.planner.cost import predict_iteration
from megatron_bloom.planner.hardware import Hardware
from megatron_bloom.planner.inference import inference_plan
from megatron_bloom.planner.memory import GB, micro_batches_per_step, plan_stages
from megatron_bloom.model.flops import iteration_flops


def with_data_parallel_size(config: TrainConfig) -> TrainConfig:
    """`parallel.dp` made explicit: as given, else from `launcher.nproc_per_node` (x slurm.nodes), else 1."""
    parallel = config.parallel
    if parallel.dp is None:
        nodes = config.slurm.nodes if config.launcher.name == "slurm" else 1
        world = (config.launcher.nproc_per_node or parallel.tp * parallel.pp) * nodes
        config.parallel = dataclasses.replace(parallel, dp=max(1, world // (parallel.tp * parallel.pp)))
        config.check_layout()
    return config


def build_report(config: TrainConfig, iter_time: Optional[float] = None,
                 device: Optional[Hardware] = None) -> dict:
    config = with_data_parallel_size(config)
    model, parallel, train = config.model, config.parallel, config.train
    world = parallel.tp * parallel.pp * parallel.dp
    stages = plan_stages(config)
    largest = max(stages, key=lambda stage: stage.memory.total)
    seq_length, lm_head = config.sample_length, not config.fine_tuning
    tokens = train.global_batch_size * seq_length
    flops = iteration_flops(model, train.global_batch_size, seq_length, train.activation_checkpointing, lm_head)
    report = {
        "params": model.num_parameters(),
        "params_per_rank": max(stage.params_per_rank for stage in stages),
        "memory_per_rank_gb": largest.memory.in_gb(),
        "flops_per_iter": flops,
        "bubble_fraction": (parallel.pp - 1) / micro_batches_per_step(config),
        "layout": {"tp": parallel.tp, "pp": parallel.pp, "dp": parallel.dp, "world_size": world,
                   "sequence_parallel": parallel.sequence_parallel, "zero_stage": config.zero.stage,
                   "precision": config.precision, "micro_batches_per_step": micro_batches_per_step(config),
                   "tokens_per_iter": tokens},
        "stages": [{"stage": s.stage, "blocks": s.blocks, "params_per_rank": s.params_per_rank,
                    "memory_gb": s.memory.in_gb(),
                    "communication_gb": {kind: round(sent / GB, 3)
                                         for kind, sent in training_communication(config, s).items()}}
                   for s in stages],
        "inference": inference_plan(config),
    }
    report["communication_per_iter_gb"] = max((stage["communication_gb"] for stage in report["stages"]),
                                              key=lambda sent: sum(sent.values()))
    if device is not None:
        # a calibrated machine: one rank's figures (a GPU's peak is its own, a CPU rank's its share)
        rank = device.for_layout(world if device.kind == "cpu" else 1, train.micro_batch_size)
        report["hardware"] = {"name": device.name, "memory_gb": round(device.memory_gb, 1),
                              "peak_tflops": round(rank.peak_tflops(config.precision), 1),
                              # CPU ranks share the machine's memory
                              "fits": largest.memory.total / 1e9 * (world if device.kind == "cpu" else 1)
                              <= device.usable_memory_gb}
    # As the trainer logs it: the recomputation's extra forward counts (hardware FLOPs); MFU counts the
    # model's FLOPs only (Chowdhery et al. 2022).
    model_flops = iteration_flops(model, train.global_batch_size, seq_length, False, lm_head)
    if iter_time is not None:
        report["iter_time_s"] = iter_time
        report["tflops_per_gpu"] = flops / iter_time / world / 1e12
        report["tokens_per_s"] = tokens / iter_time
        if device is not None:
            report["mfu"] = model_flops / iter_time / world / 1e12 / rank.peak_tflops(config.precision)
    elif device is not None and device.predicts and device.describe_mismatch(config.precision):
        report["prediction_unavailable"] = device.describe_mismatch(config.precision)
    elif device is not None and device.predicts:
        predicted = predict_iteration(config, device, stages)
        seconds = predicted.total_s
        report["predicted_iter_time_s"] = seconds
        report["predicted_tflops_per_gpu"] = flops / seconds / world / 1e12
        report["predicted_mfu"] = model_flops / seconds / world / 1e12 / rank.peak_tflops(config.precision)
        report["predicted_breakdown_s"] = {"pipeline": predicted.pipeline_s,
                                           "data_parallel": predicted.data_parallel_s,
                                           "optimizer": predicted.optimizer_s}
    return report


def format_table(report: dict) -> str:
    """The report as the table `mbloom-plan` prints without --json."""
    layout, memory = report["layout"], report["memory_per_rank_gb"]
    lines = [
        f"parameters        {report['params']:,} ({report['params'] / 1e9:.1f} B); largest rank "
        f"{report['params_per_rank']:,}",
        f"layout            tp {layout['tp']} x pp {layout['pp']} x dp {layout['dp']} = {layout['world_size']} ranks"
        f"{' (sequence parallel)' if layout['sequence_parallel'] else ''}, ZeRO {layout['zero_stage']}, {layout['precision']}, {layout['micro_batches_per_step']} micro-batches per "
        f"step, {layout['tokens_per_iter']:,} tokens per iteration",
        f"pipeline bubble   {report['bubble_fraction']:.1%} of each step ((pp - 1) / micro-batches)",
        f"FLOPs/iteration   {report['flops_per_iter']:.3e}",
        "",
        "training: GB per rank, and GB each rank sends per iteration over tp and between stages",
        "stage  blocks  params/rank     weights    grads  optimizer  activations     total    tp sent  pp sent",
    ]
    for stage in report["stages"]:
        gb, sent = stage["memory_gb"], stage["communication_gb"]
        lines.append(f"{stage['stage']:>5}  {stage['blocks']:>6}  {stage['params_per_rank']:>11,}  {gb['weights']:>10.2f} "
                     f"{gb['grads']:>8.2f} {gb['optimizer']:>10.2f} {gb['activations']:>12.2f} {gb['total']:>9.2f} "
                     f"{sent['tensor_parallel']:>10.2f} {sent['pipeline']:>8.2f}")
    lines.append(f"largest rank: {memory['total']:.2f} GB")
    lines += ["", "evaluation and generation at this tp x pp: GB per rank (eval.micro_batch_size, generate.batch_size "
              "sequences of model.seq_length), bytes sent per generated token",
              "stage  blocks     eval  generate  (KV cache)  bytes/token"]
    for stage in report["inference"]:
        lines.append(f"{stage['stage']:>5}  {stage['blocks']:>6} {stage['eval_gb']:>8.2f} {stage['generate_gb']:>9.2f} "
                     f"{stage['kv_cache_gb']:>11.2f} {stage['bytes_per_generated_token']:>12,}")
    if "hardware" in report:
        device = report["hardware"]
        verdict = "fits" if device["fits"] else "does NOT fit"
        lines.append(f"{device['name']}: {device['memory_gb']:.0f} GB per device, peak {device['peak_tflops']:.1f} "
                     f"TFLOP/s: {verdict}")
    if "predicted_iter_time_s" in report:
        parts = report["predicted_breakdown_s"]
        lines.append(f"predicted: {report['predicted_iter_time_s']:.2f} s per iteration, "
                     f"{report['predicted_tflops_per_gpu']:.1f} TFLOP/s per GPU, MFU {report['predicted_mfu']:.1%} "
                     f"(pipeline {parts['pipeline']:.2f} s, data-parallel {parts['data_parallel']:.2f} s, "
                     f"optimizer {parts['optimizer']:.2f} s)")
    if "prediction_unavailable" in report:
        lines.append(f"no prediction: {report['prediction_unavailable']}")
    if "tflops_per_gpu" in report:
        lines.append(f"at {report['iter_time_s']} s per iteration: {report['tflops_per_gpu']:.1f} TFLOP/s per GPU, "
                     f"{report['tokens_per_s']:,.0f} tokens/s" + (f", MFU {report['mfu']:.1%}" if "mfu" in report else ""))
    return "\n".join(lines)
