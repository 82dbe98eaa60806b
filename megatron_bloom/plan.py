"""`mbloom-plan`: parameters, memory per rank, FLOPs and pipeline bubble of a training config, before any job
is queued. No processes, no weights (formulas: megatron_bloom/planner/memory.py and training/flops.py).

    mbloom-plan model=bloom-176b parallel.tp=4 parallel.pp=12 parallel.dp=8 train.micro_batch_size=2 \\
        train.global_batch_size=2048 train.activation_checkpointing=true hardware=a100-80gb --iter-time 104.7

`--iter-time SECONDS` adds TFLOPs per GPU (counted as the trainer logs them) and MFU against the peak of
`hardware=` (a100-80gb, h100-80gb, h200, or cpu: this machine's measured GEMM peak). `--json` prints one
JSON object instead of the table.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from megatron_bloom.config.cli import parse_command_line
from megatron_bloom.errors import UserError, exit_on_user_error

USAGE = "[hydra overrides] [--iter-time SECONDS] [--json]"


def iter_time_seconds(value: Optional[object]) -> Optional[float]:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"--iter-time takes the seconds one training iteration takes; got {value!r}.")
    return seconds


def format_table(report: dict) -> str:
    layout, memory = report["layout"], report["memory_per_rank_gb"]
    lines = [
        f"parameters        {report['params']:,} ({report['params'] / 1e9:.1f} B); largest rank "
        f"{report['params_per_rank']:,}",
        f"layout            tp {layout['tp']} x pp {layout['pp']} x dp {layout['dp']} = {layout['world_size']} ranks, "
        f"ZeRO {layout['zero_stage']}, {layout['precision']}, {layout['micro_batches_per_step']} micro-batches per "
        f"step, {layout['tokens_per_iter']:,} tokens per iteration",
        f"pipeline bubble   {report['bubble_fraction']:.1%} of each step ((pp - 1) / micro-batches)",
        f"FLOPs/iteration   {report['flops_per_iter']:.3e}",
        "",
        "stage  blocks  params/rank     weights    grads  optimizer  activations     total  (GB per rank)",
    ]
    for stage in report["stages"]:
        gb = stage["memory_gb"]
        lines.append(f"{stage['stage']:>5}  {stage['blocks']:>6}  {stage['params_per_rank']:>11,}  {gb['weights']:>10.2f} "
                     f"{gb['grads']:>8.2f} {gb['optimizer']:>10.2f} {gb['activations']:>12.2f} {gb['total']:>9.2f}")
    lines.append(f"largest rank: {memory['total']:.2f} GB")
    if "hardware" in report:
        device = report["hardware"]
        verdict = "fits" if device["fits"] else "does NOT fit"
        lines.append(f"{device['name']}: {device['memory_gb']:.0f} GB per device, peak {device['peak_tflops']:.1f} "
                     f"TFLOP/s: {verdict}")
    if "tflops_per_gpu" in report:
        lines.append(f"at {report['iter_time_s']} s per iteration: {report['tflops_per_gpu']:.1f} TFLOP/s per GPU, "
                     f"{report['tokens_per_s']:,.0f} tokens/s" + (f", MFU {report['mfu']:.1%}" if "mfu" in report else ""))
    return "\n".join(lines)


@exit_on_user_error("mbloom-plan")
def main(argv: Optional[Sequence[str]] = None) -> None:
    overrides, flags = parse_command_line(argv, "mbloom-plan", USAGE, switches=("--json",), options=("--iter-time",),
                                          description=__doc__)
    iter_time, as_json = iter_time_seconds(flags.get("--iter-time")), bool(flags.get("--json"))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the stage split comes from DeepSpeed; no device is used
    from megatron_bloom.config import load_config
    from megatron_bloom.planner.hardware import hardware
    from megatron_bloom.planner.report import build_report

    config = load_config(overrides)
    report = build_report(config, iter_time, hardware(config.hardware))
    print(json.dumps(report) if as_json else format_table(report), flush=True)


if __name__ == "__main__":
    main()
