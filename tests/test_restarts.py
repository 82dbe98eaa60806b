"""Runs that survive their ranks: `launcher.max_restarts` (torchrun's elastic restarts) after a rank is
killed and after a rank hangs, the watchdog's stack dumps, `events.jsonl`, the lock on checkpoint.dir,
ranks that die with their launcher, skipped samples, a loss spike rolled back past garbage data, and an
exact resume under the defaults of a cluster run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_bloom.checkpoint.layout import read_metadata
from megatron_bloom.training.events import read_events
from tests.conftest import REPO, assert_user_error, overrides, run_cli, run_ranks
from tests.test_checkpoints import losses_by_iteration

pytestmark = pytest.mark.slow


def heartbeat(run_dir, rank):
    return json.loads((run_dir / "heartbeats" / f"rank-{rank:05d}.json").read_text())


def wait_for_iteration(run_dir, iteration, process, timeout=300):
    """Until metrics.jsonl has a line for `iteration` written since the last restart."""
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        assert process.poll() is None, "the job ended early"
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if lines and json.loads(lines[-1])["iter"] >= iteration:
            return
        time.sleep(0.05)
    raise AssertionError(f"no iteration {iteration} after {timeout} s")


def alive(pid):
    """Whether any thread of process `pid` runs. A zombie waiting for its reaper does not; a killed process
    whose first thread is a zombie may still have threads ending (one in an fsync, say), and it holds its
    files, and so its locks, until the last one has ended."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                    return True
        except OSError:
            continue
    return False


def launch(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "megatron_bloom.cli.launch", *args], cwd=cwd,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_killed_ranks_and_a_hung_rank_restart_the_job_which_ends_bit_for_bit(shard, pipeline_run, tmp_path):
    """tp 2 x pp 2 through mbloom-launch with launcher.max_restarts=3 and a checkpoint every 3 iterations:
    rank 2 gets SIGKILL after iteration 5, rank 1 after iteration 8, and rank 3 SIGSTOP after iteration 11
    (the attempt's sixth step: past `first_steps_s`, the limit is the median's, at least `min_s`).
    The watchdogs of the live ranks find the hang, name rank 3 and dump their stacks; each restart resumes
    from the newest checkpoint; the job exits 0 and every iteration's last loss is the uninterrupted run's
    (`pipeline_run`), bit for bit. (The same two kills on SLURM: test_launch.py.)"""
    run_dir = tmp_path / "run"
    args = overrides(shard, run_dir, 2, 2, 1, iters=12) + [
        f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.save_interval=3", "launcher.max_restarts=3",
        "train.watchdog.min_s=4", "train.watchdog.factor=5", "train.watchdog.heartbeat_s=0.5",
        "train.watchdog.first_steps_s=15"]
    job = launch(args, tmp_path)
    for attempt, (rank, after, stop) in enumerate([(2, 5, signal.SIGKILL), (1, 8, signal.SIGKILL),
                                                   (3, 11, signal.SIGSTOP)]):
        wait_for_iteration(run_dir, after, job)
        victim = heartbeat(run_dir, rank)
        assert victim["attempt"] == attempt
        os.kill(victim["pid"], stop)
        time.sleep(2)  # the survivors leave, torchrun restarts the ranks
    output, _ = job.communicate(timeout=400)
    assert job.returncode == 0, output[-5000:]

    assert losses_by_iteration(run_dir) == losses_by_iteration(pipeline_run / "run")
    iterations = [json.loads(line)["iter"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert iterations[-3:] == [10, 11, 12] and all(iterations.count(i) == 2 for i in (4, 5, 7, 8, 10, 11)), iterations
    metadata = read_metadata(tmp_path / "ckpt")
    assert (metadata.iteration, metadata.consumed_samples, metadata.tp, metadata.pp) == (12, 96, 2, 2)
    events = read_events(run_dir)
    assert [event["event"] for event in events] == ["restart", "restart", "hang", "restart"], events
    first, second, hang, third = events
    assert first["restart"] == 1 and first["rank"] == 2 and "without an exit" in first["reason"]
    assert first["resumed_from"] == 3 and first["iterations_lost"] in (2, 3)  # 3: a rank had begun iteration 6
    assert second["restart"] == 2 and "without an exit" in second["reason"] and second["resumed_from"] == 6
    assert second["iterations_lost"] in (2, 3)
    # ranks that die within one heartbeat of each other cannot be told apart: the killed one is among them
    assert 1 in [failed["rank"] for failed in second["failed_ranks"] if "without an exit" in failed["reason"]]
    assert hang["not_responding"] == [3] and hang["iteration"] == 12, hang
    assert third["restart"] == 3 and third["resumed_from"] == 9 and third["iterations_lost"] in (1, 2, 3)
    assert any("hang" in failed["reason"] for failed in third["failed_ranks"]), third
    dumps = {path.name: path.read_text() for path in (run_dir / "hangs").glob("attempt-2-rank-*.txt")}
    assert dumps and "attempt-2-rank-00003.txt" not in dumps  # a stopped rank cannot dump
    assert all("File " in text for text in dumps.values()), dumps  # the live ranks' Python stacks
    assert any("Ranks not responding: [3]" in text for text in dumps.values()), dumps
    assert "restart 1: rank 2 died without an exit" in output


def test_ranks_die_with_their_launcher_and_one_run_holds_a_checkpoint_dir(shard, tmp_path):
    """`kill -9` of mbloom-launch's process group leaves no rank alive (torchrun puts each in a session of its
    own; the parent-death signal ends them); while a run lives, a second on its checkpoint.dir is refused
    naming it; the lock file a killed run leaves does not block the next."""
    run_dir, checkpoints = tmp_path / "run", tmp_path / "ckpt"
    args = overrides(shard, run_dir, 2, 1, 1, iters=100000) + [f"checkpoint.dir={checkpoints}"]
    job = launch(args, tmp_path)
    wait_for_iteration(run_dir, 2, job)
    pids = [heartbeat(run_dir, rank)["pid"] for rank in (0, 1)]

    second = run_cli(["megatron_bloom.cli.train", *overrides(shard, tmp_path / "second", 1, 1, 1, iters=2),
                      f"checkpoint.dir={checkpoints}"], check=False)
    assert_user_error(second, f"checkpoint.dir {checkpoints} is in use by another run", f"process {pids[0]}",
                      str(run_dir))

    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    deadline = time.time() + 10
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids), "ranks outlived their launcher"

    assert (checkpoints / ".lock").read_text()  # left behind, naming the dead run
    run_cli(["megatron_bloom.cli.train", *overrides(shard, tmp_path / "third", 1, 1, 1, iters=2),
             f"checkpoint.dir={checkpoints}"])
    assert sorted(losses_by_iteration(tmp_path / "third")) == [1, 2]


def test_skipped_samples_are_kept_in_the_checkpoint_and_a_resume_skips_them(shard, tmp_path):
    """train.skip_samples=[[16,24]]: iteration 3 reads positions 24-31 (consumed_samples 32 after it); the
    range goes into every checkpoint, so a resume from one (without the key) reads what the run read."""
    args = overrides(shard, tmp_path / "run", 1, 1, 1, iters=6) + [
        "train.skip_samples=[[16,24]]", f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.save_interval=3"]
    run_ranks(1, "megatron_bloom.cli.train", args)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["consumed_samples"] for line in lines] == [8, 16, 32, 40, 48, 56]
    assert read_metadata(tmp_path / "ckpt" / "global_step3").skipped_samples == [[16, 24]]
    run_ranks(1, "megatron_bloom.cli.train", overrides(shard, tmp_path / "resumed", 1, 1, 1, iters=6) + [
        f"checkpoint.load={tmp_path / 'ckpt' / 'global_step3'}"])
    resumed = losses_by_iteration(tmp_path / "resumed")
    assert list(resumed) == [4, 5, 6]
    assert all(resumed[i] == losses_by_iteration(tmp_path / "run")[i] for i in (4, 5, 6))


def plant_garbage(shard, prefix, data_args, positions, seed=0):
    """A copy of `shard`'s corpus at `prefix` whose training samples at `positions` (of the dataset the run
    with `data_args` builds) are random tokens from the upper half of the vocabulary: a block of garbage text
    the run reads in one batch. Document lengths stay, so every index is the same."""
    import shutil

    import numpy as np

    from megatron_bloom.config import load_config
    from megatron_bloom.data.builder import build_datasets
    from megatron_bloom.data.indexed_dataset import IndexedDataset

    for suffix in (".bin", ".idx"):
        shutil.copy(f"{shard / 'corpus'}{suffix}", f"{prefix}{suffix}")
    config = load_config(data_args)
    dataset = build_datasets(config.data, config.model.seq_length, config.train.seed,
                             (config.train.iters * config.train.global_batch_size, 0, 0))[0]
    indexed = IndexedDataset(prefix)
    tokens = np.memmap(f"{prefix}.bin", dtype=indexed.dtype, mode="r+")
    rng = np.random.default_rng(seed)
    for position in positions:
        sample = int(dataset.sample_order[position])
        (first_slot, first_offset), (last_slot, last_offset) = dataset.sample_starts[sample:sample + 2]
        for slot in range(int(first_slot), int(last_slot) + 1):
            document = int(dataset.document_order[slot])
            start = int(first_offset) if slot == first_slot else 0
            end = int(last_offset) + 1 if slot == last_slot else int(indexed.lengths[document])
            offset = int(indexed.pointers[document]) // indexed.dtype.itemsize
            tokens[offset + start: offset + end] = rng.integers(512, 1024, end - start)
    tokens.flush()


def test_a_loss_spike_rolls_back_past_the_garbage_and_a_resume_skips_it_too(shard, tmp_path):
    """A shard whose iteration-20 batch is garbage: the spike is found, the run reloads its checkpoint of
    iteration 15, steps over exactly the 8 samples recorded in events.jsonl, and ends below the spike. A
    later start from that checkpoint in the same run.dir skips them too: its iteration 20 is the rolled-back
    run's, bit for bit. (A learning rate that has the model past uniform guessing by then.)"""
    prefix = tmp_path / "garbage"
    args = overrides(shard, tmp_path / "run", 1, 1, 1, iters=25) + [
        f"data.paths=[{prefix}]", f"data.cache_dir={tmp_path / 'cache'}", f"checkpoint.dir={tmp_path / 'ckpt'}",
        "checkpoint.save_interval=5", "optim.lr=6e-3", "train.loss_spike.policy=rollback",
        "train.loss_spike.window=10"]
    plant_garbage(shard, prefix, args, range(19 * 8, 20 * 8))
    result = run_ranks(1, "megatron_bloom.cli.train", args)
    events = read_events(tmp_path / "run")
    assert [event["event"] for event in events] == ["loss_spike", "rollback"], events
    spike, rollback = events
    assert spike["iteration"] == 20 and spike["samples"] == [152, 160] and spike["policy"] == "rollback"
    assert rollback["to_iteration"] == 15 and rollback["skipped_samples"] == [152, 160]
    losses = losses_by_iteration(tmp_path / "run")  # the last line of an iteration counts
    assert list(losses) == list(range(1, 26)) and losses[20] < spike["loss"] - 1 and losses[25] < spike["loss"]
    assert "loss spike at iteration 20" in result.stderr and "rolled back to" in result.stderr
    assert read_metadata(tmp_path / "ckpt").skipped_samples == [[152, 160]]

    resumed = args + [f"checkpoint.load={tmp_path / 'ckpt' / 'global_step15'}", "checkpoint.dir=null",
                      "checkpoint.save_interval=null"]
    run_ranks(1, "megatron_bloom.cli.train", resumed)
    assert losses_by_iteration(tmp_path / "run")[20] == losses[20]  # appended by the resumed run


def test_a_resume_under_the_cluster_defaults_is_exact(shard, tmp_path):
    """bf16, ZeRO 1, 2 data-parallel replicas and 2 data-loader workers each: a run started from its
    checkpoint of iteration 3 continues with the losses of the run that went on, bit for bit."""
    args = overrides(shard, tmp_path / "run", 1, 1, 2, iters=6, precision="bf16") + [
        "data.num_workers=2", f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.save_interval=3"]
    run_ranks(2, "megatron_bloom.cli.train", args)
    run_ranks(2, "megatron_bloom.cli.train", overrides(shard, tmp_path / "resumed", 1, 1, 2, iters=6,
                                                        precision="bf16") + [
        "data.num_workers=2", f"checkpoint.load={tmp_path / 'ckpt' / 'global_step3'}"])
    whole, resumed = losses_by_iteration(tmp_path / "run"), losses_by_iteration(tmp_path / "resumed")
    assert list(resumed) == [4, 5, 6] and all(resumed[i] == whole[i] for i in (4, 5, 6)), (whole, resumed)
