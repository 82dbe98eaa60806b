"""The tensor-parallel all-reduce on CPU: gloo against the shared-memory group (parallel/host_group.py).

    python benchmarks/all_reduce.py [--ranks 2] [--iters 50]

Starts `--ranks` gloo processes on this machine, one thread each (as the tp ranks of benchmarks/scaling.py
run), and times both over the activation sizes of bloom-small and bloom-560m micro-batches, in bf16 and
float32. Prints milliseconds per all-reduce and gloo's time over the shared-memory group's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
# [micro-batch, seq, hidden] activations: bloom-small at micro-batch 2 and 4, bloom-560m at 1 and 4; and
# the cross-entropy's per-token sums (a float32 per token)
SHAPES = [(2, 512, 512), (4, 512, 512), (1, 2048, 1024), (4, 2048, 1024), (4, 512, 1)]


def worker(rank: int, world_size: int, port: int, iters: int) -> None:
    sys.path.insert(0, str(REPO))
    from megatron_bloom.parallel.host_group import SharedMemoryGroup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    shared = SharedMemoryGroup.create(dist.group.WORLD)
    if shared is None:
        raise SystemExit("the shared-memory group could not be created here (see the warning above)")

    def timed(all_reduce, x) -> float:
        for _ in range(10):  # the buffer's pages are touched once, on first use
            all_reduce(x)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            all_reduce(x)
        return (time.perf_counter() - start) / iters * 1e3

    if rank == 0:
        print(f"{world_size} ranks, one thread each; ms per all-reduce")
        print(f"{'shape':>16} {'dtype':>9} {'MB':>6} {'gloo':>7} {'shm':>7} {'gloo/shm':>9}")
    for shape in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(shape).to(dtype)
            gloo = timed(lambda t: dist.all_reduce(t), x)
            shm = timed(shared.all_reduce_, x)
            if rank == 0:
                print(f"{str(shape):>16} {str(dtype).split('.')[1]:>9} {x.numel() * x.element_size() / 1e6:>6.2f} "
                      f"{gloo:>7.3f} {shm:>7.3f} {gloo / shm:>9.1f}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from megatron_bloom.parallel.distributed import free_port

    mp.spawn(worker, args=(args.ranks, free_port(), args.iters), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
