"""`mbloom-train`: one rank of training (under torchrun / deepspeed / srun), or a single process alone.

    [torchrun --nproc-per-node N -m] mbloom-train model=bloom-tiny data.paths=[PREFIX] parallel.tp=2 ...
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_bloom.cli.arguments import parse_overrides
from megatron_bloom.cli.errors import exit_on_user_error
from megatron_bloom.config import load_config
from megatron_bloom.parallel import init_distributed
from megatron_bloom.parallel.distributed import state_for_run
from megatron_bloom.parallel.process_exit import run_and_leave
from megatron_bloom.training.host_memory import keep_freed_host_memory
from megatron_bloom.training.validation import validate_training_inputs

USAGE = "[model=bloom-tiny] data.paths=[PREFIX] [parallel.tp=N parallel.pp=N] [train.iters=N] ..."


@exit_on_user_error("mbloom-train")
def main(argv: Optional[Sequence[str]] = None) -> None:
    # Emitted on every rank by DeepSpeed internals (its pipeline's tied-weight broadcast, a collective it
    # still calls by an old name); nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")
    warnings.filterwarnings("ignore", message=r"`torch.distributed.all_gather_into_tensor` is deprecated")
    config = load_config(parse_overrides(argv, "mbloom-train", USAGE))
    validate_training_inputs(config)  # before any process group or DeepSpeed start-up
    world_size = init_distributed(always=True)  # DeepSpeed needs a process group, even for one process
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    layout = config.parallel
    state = state_for_run(layout.tp, layout.pp, layout.dp, world_size, require_groups=True,
                          shared_memory_timeout_s=layout.shared_memory_timeout_s)
    if state.device.type == "cpu":
        keep_freed_host_memory()
    from megatron_bloom.training.loop import train  # DeepSpeed is imported only when training

    try:
        train(config, state)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run() -> None:
    """The console script: `main`, then an exit that gloo's threads cannot abort (parallel/process_exit.py)."""
    run_and_leave(main)


if __name__ == "__main__":
    run()
