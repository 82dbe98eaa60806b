"""The shared-memory all-reduce of CPU ranks on one host (parallel/host_group.py), on real gloo processes:
gloo's results, the same bits on every rank, nothing left in /dev/shm, a clear error when a rank is gone."""

import pytest
import torch
import torch.distributed as dist

from megatron_bloom.parallel.host_group import SharedMemoryGroup
from megatron_bloom.parallel.mappings import all_reduce_
from megatron_bloom.parallel.state import ParallelState
from tests.distributed import run_distributed

SLOT_BYTES = 256 * 1024  # small slots (8 MB by default), so that tensors of a few hundred KB take several
# a few elements (one chunk); a bloom-small activation at micro-batch 1, 512 x 512 (2 chunks in bf16, 4 in
# float32); a size that leaves a ragged last chunk (2 chunks in bf16, 3 in float32)
SIZES = [7, 512 * 512, 5 * SLOT_BYTES // 8 + 3]


def compare_with_gloo(rank, world_size):
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    pair = pairs[rank // 2]
    groups = {"world": SharedMemoryGroup.create(dist.group.WORLD, slot_bytes=SLOT_BYTES),
              "pair": SharedMemoryGroup.create(pair, slot_bytes=SLOT_BYTES)}
    buffers = [line for line in open("/proc/self/maps") if "/dev/shm/mbloom-tp-" in line]
    report = {"created": {name: group is not None for name, group in groups.items()},
              "buffers_unlinked": len(buffers) == 2 and all(line.rstrip().endswith("(deleted)") for line in buffers),
              "differ": [], "ranks_disagree": []}
    for name, group in groups.items():
        process_group = group.process_group
        for dtype in (torch.bfloat16, torch.float32):
            for size in SIZES:
                for op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX):
                    generator = torch.Generator().manual_seed(1000 * rank + size)
                    if name == "world" and op == dist.ReduceOp.SUM:  # 4 ranks: exact whatever the order
                        x = torch.randint(-50, 50, (size,), generator=generator).to(dtype)
                    else:
                        x = torch.randn(size, generator=generator).to(dtype)
                    expected = x.clone()
                    dist.all_reduce(expected, op=op, group=process_group)
                    all_reduce_(x, group, op)
                    case = (name, str(dtype), size, str(op))
                    if not torch.equal(x, expected):
                        report["differ"].append(case)
                    everyone = [torch.empty_like(x) for _ in range(dist.get_world_size(process_group))]
                    dist.all_gather(everyone, x, group=process_group)
                    if not all(torch.equal(other, x) for other in everyone):
                        report["ranks_disagree"].append(case)
    return report


@pytest.mark.slow
def test_shared_memory_all_reduce_gives_gloo_s_results_on_every_rank():
    """4 ranks: the whole world and two pairs, bf16 and float32, SUM and MAX, in one chunk and in several."""
    for report in run_distributed(compare_with_gloo, 4):
        assert report["created"] == {"world": True, "pair": True}
        assert report["buffers_unlinked"]  # mapped, and already gone from /dev/shm
        assert report["differ"] == [] and report["ranks_disagree"] == []


def tp_layers_use_it(rank, world_size):
    state = ParallelState.create(tp=2, pp=1)
    return isinstance(state.tp_comm, SharedMemoryGroup), state.tp_comm.process_group is state.tp_group


def test_cpu_tensor_parallel_layers_communicate_through_it():
    assert run_distributed(tp_layers_use_it, 2) == [(True, True)] * 2


def a_rank_does_not_come(rank, world_size):
    group = SharedMemoryGroup.create(dist.group.WORLD, timeout_s=1.0)
    if rank == 1:
        return None
    try:
        group.all_reduce_(torch.ones(4))
    except RuntimeError as error:
        return str(error)
    return "no error"


@pytest.mark.slow
def test_a_rank_that_never_arrives_is_an_error_not_a_hang():
    message = run_distributed(a_rank_does_not_come, 2)[0]
    assert "rank 1 of the group did not arrive within 1.0" in message
