"""`python -m tests.crash_during_save N [mbloom-train overrides]`: mbloom-train in this process, killed with
SIGKILL just before its N-th file-system step of checkpointing (a `torch.save`, `os.fsync`, `os.replace` or
tree removal; with `checkpoint.async_save`, steps of the background writer too). The steps run for real;
only their count decides the moment of the crash. Among several ranks, only the rank CRASH_RANK (default:
every rank) crashes; the launcher then stops the others, as torchrun does."""

import os
import shutil
import signal
import sys

import torch


def main() -> None:
    kill_at, argv = int(sys.argv[1]), sys.argv[2:]
    if os.environ.get("CRASH_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        kill_at = 0  # this rank runs on until the launcher stops it
    count = 0

    def counted(function):
        def wrapper(*args, **kwargs):
            nonlocal count
            count += 1
            if count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return wrapper

    torch.save, os.fsync, os.replace, shutil.rmtree = (counted(torch.save), counted(os.fsync),
                                                        counted(os.replace), counted(shutil.rmtree))
    from megatron_bloom.cli.train import main as train

    train(argv)


if __name__ == "__main__":
    main()
