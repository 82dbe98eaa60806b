"""`python -m tests.crash_during_save N [mbloom-train overrides]`: mbloom-train in this process, killed with
SIGKILL just before its N-th file-system step of checkpointing (a `torch.save`, `os.fsync`, `os.replace` or
tree removal). With `checkpoint.async_save`, the steps of the rank's background writer process count too,
in the order they happen, and the writer kills the rank (and so itself, with it). The steps run for real;
only their count decides the moment of the crash. Among several ranks, only the rank CRASH_RANK (default:
every rank) crashes; the launcher then stops the others, as torchrun does."""

import os
import shutil
import signal
import sys
import tempfile

import torch

COUNTER, KILL_AT, RANK_PID = "CRASH_STEP_COUNTER", "CRASH_KILL_AT", "CRASH_RANK_PID"


def count_steps() -> None:
    """Count every file-system step of this process in the rank's counter file (one byte appended per step,
    so that the rank and its writer count together); the `KILL_AT`-th kills the rank."""
    kill_at, rank_pid = int(os.environ[KILL_AT]), int(os.environ[RANK_PID])
    descriptor = os.open(os.environ[COUNTER], os.O_WRONLY | os.O_APPEND)

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


def counted_writer(requests, replies) -> None:
    """The background writer process, counting its steps with the rank's."""
    from megatron_bloom.training import async_checkpoint

    count_steps()
    async_checkpoint.serve_writes(requests, replies)


def main() -> None:
    kill_at, argv = int(sys.argv[1]), sys.argv[2:]
    if os.environ.get("CRASH_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        kill_at = 0  # this rank runs on until the launcher stops it
    descriptor, counter = tempfile.mkstemp(prefix="crash-steps-")
    os.close(descriptor)
    os.environ.update({COUNTER: counter, KILL_AT: str(kill_at), RANK_PID: str(os.getpid())})
    count_steps()
    from megatron_bloom.training import async_checkpoint
    from megatron_bloom.cli.train import main as train

    async_checkpoint.serve_writes = counted_writer  # what the rank's writer process runs
    try:
        train(argv)
    finally:
        os.unlink(counter)


if __name__ == "__main__":
    main()
