"""`mbloom-plan`: parameters, memory per rank, FLOPs and pipeline bubble of a training config, before any job
is queued. No processes, no weights (formulas: megatron_bloom/planner/memory.py and model/flops.py).

    mbloom-plan model=bloom-176b parallel.tp=4 parallel.pp=12 parallel.dp=8 train.micro_batch_size=2 \\
        train.global_batch_size=2048 train.activation_checkpointing=true hardware=a100-80gb --iter-time 104.7

`--iter-time SECONDS` adds TFLOPs per GPU (counted as the trainer logs them) and MFU against the peak of
`hardware=` (a100-80gb, h100-80gb, h200, or cpu: this machine's measured GEMM peak); without it a preset
predicts them (planner/cost.py). `--search cluster.gpus=N [cluster.gpus_per_node=G]` lists the layouts of the
model that fit N accelerators, fastest first, and says why the first (planner/search.py). `--json` prints one
JSON object instead of the table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

from megatron_bloom.cli.arguments import parse_command_line
from megatron_bloom.cli.errors import exit_on_user_error
from megatron_bloom.errors import UserError

USAGE = "[hydra overrides] [--iter-time SECONDS | --search cluster.gpus=N] [--json]"
SWITCHES, OPTIONS = ("--json", "--search"), ("--iter-time",)  # flags besides the overrides (OPTIONS take a value)


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


@exit_on_user_error("mbloom-plan")
def main(argv: Optional[Sequence[str]] = None) -> None:
    overrides, flags = parse_command_line(argv, "mbloom-plan", USAGE, switches=SWITCHES, options=OPTIONS,
                                          description=__doc__)
    iter_time, as_json = iter_time_seconds(flags.get("--iter-time")), bool(flags.get("--json"))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the stage split comes from DeepSpeed; no device is used
    from megatron_bloom.config import load_config
    from megatron_bloom.planner.hardware import hardware
    from megatron_bloom.planner.report import build_report, format_table

    config = load_config(overrides)
    if flags.get("--search"):
        from megatron_bloom.planner.search import explain, format_candidates, search

        if iter_time is not None:
            raise UserError("--search predicts each layout's time: leave out --iter-time.")
        candidates = search(config, hardware(config.hardware))
        print(json.dumps({"candidates": [dataclasses.asdict(c) for c in candidates], "why": explain(candidates)})
              if as_json else format_candidates(candidates), flush=True)
        return
    report = build_report(config, iter_time, hardware(config.hardware))
    print(json.dumps(report) if as_json else format_table(report), flush=True)


if __name__ == "__main__":
    main()
