"""Run a test function on several real processes over gloo (CPU), as torchrun would, and collect results."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_bloom.parallel.distributed import free_port
from megatron_bloom.parallel.process_exit import leave
from tests.processes import forkserver_context


def _worker(rank: int, world_size: int, port: int, results: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # the machine has few cores; oversubscribing threads only slows every rank
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(results) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave(0)  # as the commands end (megatron_bloom/parallel/process_exit.py)


def run_distributed(fn: Callable, world_size: int, *args: Any) -> List[Any]:
    """`fn(rank, world_size, *args)` on `world_size` spawned processes; returns each rank's result.

    `fn` must be a module-level function (it is pickled). A failure on any rank raises here with its
    traceback.
    """
    with tempfile.TemporaryDirectory() as results:
        forkserver_context()  # the ranks are forked from the preloaded server (tests/processes.py)
        mp.start_processes(_worker, args=(world_size, free_port(), results, fn, args), nprocs=world_size, join=True,
                           start_method="forkserver")
        return [torch.load(Path(results) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _worker_that_may_be_left(rank: int, world_size: int, port: int, results: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.save(fn(rank, world_size, *args), Path(results) / f"rank{rank}.pt")
    os._exit(0)  # no teardown barrier: a peer may be gone


def run_distributed_with_casualties(fn: Callable, world_size: int, *args: Any,
                                    timeout_s: float = 120.0) -> List[Any]:
    """As `run_distributed`, for a test in which ranks die: each rank's result, or None for a rank that left
    no result (it died). Fails if a rank is still running after `timeout_s`."""
    with tempfile.TemporaryDirectory() as results:
        context = forkserver_context()
        port = free_port()
        processes = [context.Process(target=_worker_that_may_be_left,
                                     args=(rank, world_size, port, results, fn, args)) for rank in range(world_size)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout_s)
        hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
        for process in processes:
            process.kill()
        assert not hung, f"ranks {hung} still ran after {timeout_s} s"
        return [torch.load(path, weights_only=False) if (path := Path(results) / f"rank{rank}.pt").exists()
                else None for rank in range(world_size)]
