"""The shared-memory all-reduce of CPU ranks on one host (parallel/host_group.py), on real gloo processes:
gloo's results, the same bits on every rank, nothing left in /dev/shm, and the guards: ranks that disagree,
two jobs on one host, a buffer not shared or too big for /dev/shm, a peer gone or absent."""

import contextlib
import io
import os
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_bloom.parallel import host_group
from megatron_bloom.parallel.host_group import CollectiveError, SharedMemoryGroup
from megatron_bloom.parallel.mappings import all_reduce_
from megatron_bloom.parallel.state import ParallelState
from tests.distributed import run_distributed, run_distributed_with_casualties

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
    except CollectiveError as error:
        return str(error)
    return "no error"


@pytest.mark.slow
def test_a_rank_that_never_arrives_is_an_error_not_a_hang():
    message = run_distributed(a_rank_does_not_come, 2)[0]
    assert "rank 1 of the group did not arrive within 1 s" in message


def disagreeing_calls(rank, world_size):
    group = SharedMemoryGroup.create(dist.group.WORLD, timeout_s=30.0)
    cases = {"size": (torch.ones(7 + 2 * rank), dist.ReduceOp.SUM),
             "dtype": (torch.ones(7, dtype=torch.float32 if rank == 0 else torch.bfloat16), dist.ReduceOp.SUM),
             "op": (torch.ones(7), dist.ReduceOp.SUM if rank == 0 else dist.ReduceOp.MAX)}
    errors = {}
    for name, (x, op) in cases.items():
        try:
            group.all_reduce_(x, op)
            errors[name] = None
        except CollectiveError as error:
            errors[name] = str(error)
    agreed = torch.full((5,), float(rank + 1))
    group.all_reduce_(agreed)  # the group still works after the refusals
    return errors, agreed.tolist()


def test_ranks_that_disagree_on_size_dtype_or_op_get_an_error_naming_them():
    for errors, agreed in run_distributed(disagreeing_calls, 2):
        assert "rank 0: 7 elements of torch.float32, op sum; rank 1: 9 elements of torch.float32, op sum" \
            in errors["size"]
        assert "rank 0: 7 elements of torch.float32, op sum; rank 1: 7 elements of torch.bfloat16, op sum" \
            in errors["dtype"]
        assert "rank 0: 7 elements of torch.float32, op sum; rank 1: 7 elements of torch.float32, op max" \
            in errors["op"]
        assert agreed == [3.0] * 5


def buffer_of_this_process():
    """(inode, mode) of the one shared-memory buffer this process maps."""
    [line] = [line for line in open("/proc/self/maps") if "/dev/shm/mbloom-tp-" in line]
    stat = os.stat(f"/proc/self/map_files/{line.split()[0]}")
    return stat.st_ino, stat.st_mode & 0o777


def one_of_two_jobs(rank, world_size, rendezvous, value):
    group = SharedMemoryGroup.create(dist.group.WORLD)
    Path(rendezvous, f"{value}-{rank}").touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(rendezvous)) < 4 and time.monotonic() < deadline:  # both jobs hold their buffers now
        time.sleep(0.01)
    x = torch.full((1000,), value)
    group.all_reduce_(x)
    return buffer_of_this_process(), x.unique().tolist()


def test_two_jobs_on_one_host_never_share_a_buffer(tmp_path):
    """Two 2-rank jobs at once: each job's ranks map one buffer of their own (owner-only), and each sums its
    own values."""
    with ThreadPoolExecutor(2) as pool:
        jobs = list(pool.map(lambda value: run_distributed(one_of_two_jobs, 2, str(tmp_path), value), [1.0, 100.0]))
    (buffer_a, sum_a), (buffer_a1, _) = jobs[0]
    (buffer_b, sum_b), (buffer_b1, _) = jobs[1]
    assert buffer_a == buffer_a1 and buffer_b == buffer_b1 and buffer_a[0] != buffer_b[0]
    assert buffer_a[1] == buffer_b[1] == 0o600
    assert (sum_a, sum_b) == ([2.0], [200.0])


MAP_BUFFER = host_group._map_buffer


def map_a_private_copy(path, size):
    """What a rank in a container with its own /dev/shm would map: a file of the same name, elsewhere."""
    with tempfile.TemporaryDirectory() as elsewhere:
        private = Path(elsewhere) / Path(path).name
        private.write_bytes(bytes(size))
        return MAP_BUFFER(str(private), size)


def create_and_report(rank, world_size, slot_bytes=host_group.SLOT_BYTES, not_shared=False):
    job = os.environ["TORCHELASTIC_RUN_ID"] = f"test-{os.getppid()}"  # in the buffer's name
    if not_shared and rank == 1:
        host_group._map_buffer = map_a_private_copy  # this rank's process only
    warnings = io.StringIO()
    with contextlib.redirect_stderr(warnings):
        group = SharedMemoryGroup.create(dist.group.WORLD, slot_bytes=slot_bytes)
    x = torch.full((3,), float(rank + 1))
    all_reduce_(x, group or dist.group.WORLD)
    left_behind = [name for name in os.listdir("/dev/shm") if name.startswith(f"mbloom-tp-{os.getuid()}-{job}-")]
    return group is None, warnings.getvalue(), x.tolist(), left_behind


def test_ranks_that_do_not_share_the_buffer_fall_back_to_gloo():
    (fell_back, warning, x, left_behind), (fell_back1, warning1, _, _) = \
        run_distributed(create_and_report, 2, host_group.SLOT_BYTES, True)
    assert fell_back and fell_back1 and x == [3.0] * 3
    assert warning.count("\n") == 1 and warning1 == ""  # one line, from the group's first rank
    assert "all-reduce through gloo" in warning and "rank 1: it does not see the writes of ranks [0]" in warning
    assert left_behind == []


def test_a_dev_shm_too_small_for_the_buffer_falls_back_to_gloo():
    stat = os.statvfs("/dev/shm")
    too_big = stat.f_bavail * stat.f_frsize // 2  # 3 slots of it are needed
    (fell_back, warning, x, _), (fell_back1, _, _, _) = run_distributed(create_and_report, 2, too_big)
    assert fell_back and fell_back1 and x == [3.0] * 3
    assert warning.count("\n") == 1 and "MB free" in warning


def a_peer_is_killed(rank, world_size):
    group = SharedMemoryGroup.create(dist.group.WORLD, timeout_s=60.0)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        group.all_reduce_(torch.ones(4))
    except CollectiveError as error:
        return str(error), time.monotonic() - start
    return "no error", time.monotonic() - start


def test_a_peer_that_dies_is_named_at_once_not_at_the_timeout():
    (message, waited), killed = run_distributed_with_casualties(a_peer_is_killed, 2)
    assert killed is None
    assert "rank 1 (pid" in message and "exited while rank 0 waited for it" in message
    assert waited < 10  # of a 60 s timeout: noticed at the next 0.1 s check, give or take a loaded machine
