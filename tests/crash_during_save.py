"""`python -m tests.crash_during_save N [mbloom-train overrides]`: mbloom-train in this process, killed with
SIGKILL just before its N-th file-system step of checkpointing (a `torch.save`, `os.fsync`, `os.replace` or
tree removal). With `checkpoint.async_save`, the steps of the rank's background writer process (forked,
so counting as well) count too, in the order they happen, and the writer kills the rank, then itself. The steps run for real;
only their count decides the moment of the crash. Among several ranks, only the rank CRASH_RANK (default:
every rank) crashes; the launcher then stops the others, as torchrun does."""

import os
import shutil
import signal
import sys
import tempfile

import torch

def count_steps(kill_at: int, counter: str) -> None:
    """Count every file-system step in the file `counter` (one byte appended per step, so that the rank and
    its forked writer count together); the `kill_at`-th kills the rank."""
    rank_pid = os.getpid()
    descriptor = os.open(counter, os.O_WRONLY | os.O_APPEND)

    def counted(function):
        def wrapper(*args, **kwargs):
            os.write(descriptor, b".")
            if os.fstat(descriptor).st_size == kill_at:
                os.kill(rank_pid, signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)  # a writer: not one more step before the kernel's signal
            return function(*args, **kwargs)
        return wrapper

    torch.save, os.fsync, os.replace, shutil.rmtree = (counted(torch.save), counted(os.fsync),
                                                        counted(os.replace), counted(shutil.rmtree))


def main() -> None:
    kill_at, argv = int(sys.argv[1]), sys.argv[2:]
    if os.environ.get("CRASH_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        kill_at = 0  # this rank runs on until the launcher stops it
    descriptor, counter = tempfile.mkstemp(prefix="crash-steps-")
    os.close(descriptor)
    count_steps(kill_at, counter)
    from megatron_bloom.cli.train import main as train

    try:
        train(argv)
    finally:
        os.unlink(counter)


if __name__ == "__main__":
    main()
