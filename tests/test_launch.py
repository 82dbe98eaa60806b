"""Launching for real: the torchrun and deepspeed scripts with 2 processes, `mbloom-launch` (dry run,
validation before anything starts, a local sweep of 2 points), and SLURM: a one-node cluster started on this
machine runs `launch/slurm/train.sbatch` (a rank killed, the job restarting itself) and a job `mbloom-launch
launcher=slurm` submits, preempted and
requeued on the way."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_bloom.cli.launch import main as launch
from megatron_bloom.training.events import read_events
from tests.conftest import REPO, assert_user_error_in_process, overrides, run_cli
from tests.test_checkpoints import losses_by_iteration

TRAIN = ["model=bloom-tiny", "precision=fp32", "train.global_batch_size=8", "train.micro_batch_size=2",
         "data.num_workers=0", "logging.interval=1", "sched.warmup_iters=1"]


def data_args(shard):
    return [f"data.paths=[{shard / 'corpus'}]", f"data.cache_dir={shard / 'cache'}"]


def environment(**extra):
    return dict(os.environ, PYTHONPATH=str(REPO), **extra)


@pytest.mark.slow
def test_torchrun_and_deepspeed_scripts_train_with_2_processes(shard, tmp_path):
    """Both scripts start tp 2 on this node; the deepspeed launcher's run equals torchrun's. (The README's
    tour and the quickstart start tp 2 x pp 2 with torchrun.)"""
    args = TRAIN + data_args(shard) + ["parallel.tp=2", "train.iters=3"]
    for script in ("torchrun", "deepspeed"):
        result = subprocess.run([str(REPO / "launch" / f"{script}.sh"), *args, f"run.dir={tmp_path / script}"],
                                env=environment(NPROC_PER_NODE="2"), cwd=tmp_path, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert losses_by_iteration(tmp_path / "torchrun") == losses_by_iteration(tmp_path / "deepspeed")
    assert sorted(losses_by_iteration(tmp_path / "torchrun")) == [1, 2, 3]


def test_dry_run_prints_the_command_and_bad_configs_start_nothing(shard, tmp_path, capsys):
    args = TRAIN + data_args(shard) + ["parallel.tp=2", "parallel.pp=2", f"run.dir={tmp_path / 'run'}"]
    result = run_cli(["megatron_bloom.cli.launch", "--dry-run", *args])
    command = result.stdout.strip().splitlines()[-1]
    assert "torch.distributed.run --standalone --nproc-per-node 4 --max-restarts 0 -m megatron_bloom.cli.train" in command
    assert "parallel.dp=1" in command and f"run.dir={tmp_path / 'run'}" in command
    script = run_cli(["megatron_bloom.cli.launch", "--dry-run", "launcher=slurm", "slurm.nodes=2", "slurm.partition=gpu",
                      *args, "parallel.dp=2"]).stdout
    assert "#SBATCH --nodes=2" in script and "#SBATCH --partition=gpu" in script
    assert "export NPROC_PER_TASK=4" in script and "sbatch " in script

    bad = {"parallel.tp=3": ["parallel.tp (3)"],
           "launcher.nproc_per_node=3": ["launcher.nproc_per_node (3)", "parallel.pp (2)"],
           f"data.paths=[{tmp_path / 'missing'}]": ["missing"],
           "optim.lr=1e-3,1e-4": ["optim.lr", "--multirun"],
           "train.global_batch_size=7": ["train.global_batch_size (7)"],
           f"checkpoint.load={tmp_path / 'empty'}": [f"{tmp_path / 'empty'} is not a megatron_bloom checkpoint"]}
    (tmp_path / "empty").mkdir()
    for override, fragments in bad.items():  # mbloom-launch's `main` in this process: refused before a start
        assert_user_error_in_process(launch, [*args, override], capsys, *fragments)
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.slow
def test_a_local_sweep_runs_every_point_in_its_own_dir(shard, tmp_path):
    root = tmp_path / "sweep"
    result = run_cli(["megatron_bloom.cli.launch", "--multirun", *TRAIN, *data_args(shard), "train.iters=2",
                      "optim.lr=1e-3,1e-4", f"run.dir={root}"], timeout=600)
    rows = [json.loads(line) for line in (root / "summary.jsonl").read_text().splitlines()]
    assert [row["status"] for row in rows] == ["completed"] * 2
    assert [row["overrides"][-3] for row in rows] == ["optim.lr=0.001", "optim.lr=0.0001"]
    for number in range(2):
        assert sorted(losses_by_iteration(root / str(number))) == [1, 2]
        assert (root / str(number) / "config.yaml").is_file() and (root / str(number) / "launch.log").is_file()
    table = result.stdout.strip().splitlines()
    assert table[-4].split()[:4] == ["#", "optim.lr", "status", "iters"] and len(table) >= 4
    losses = [row["final_loss"] for row in rows]
    assert losses[0] != losses[1]  # the same data and initial weights, another learning rate


def scontrol_field(job_id, field, env):
    text = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True, env=env).stdout
    return next((item.split("=", 1)[1] for item in text.split() if item.startswith(field + "=")), None)


def wait_for_state(job_id, env, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = scontrol_field(job_id, "JobState", env)
        if state in states:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {state} after {timeout} s")


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_sbatch_trains_and_a_preempted_job_requeues_and_resumes(shard, pipeline_run, tmp_path, slurm):
    # 1. sbatch the script itself: 2 tasks on the node (overcommitted), each a torchrun of 2 ranks: tp 2 x
    # pp 2, a checkpoint every 3 iterations, launcher.max_restarts=2. Rank 3 is killed after iteration 5 and
    # rank 1 after iteration 8; both tasks restart their ranks each time from the newest checkpoint, and the
    # job ends with the losses of the run never interrupted (`pipeline_run`), bit for bit.
    run_dir = tmp_path / "sbatch"
    args = overrides(shard, run_dir, 2, 2, 1, iters=12) + [
        f"checkpoint.dir={tmp_path / 'sbatch-ckpt'}", "checkpoint.save_interval=3", "launcher.max_restarts=2"]
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", "--overcommit", f"--output={tmp_path / 'sbatch-%j.out'}",
         str(REPO / "launch" / "slurm" / "train.sbatch"), *args],
        env={**slurm, "NPROC_PER_TASK": "2"}, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = int(submitted.stdout.strip())
    resumed_from = []  # the newest complete checkpoint when each victim died: what its restart must resume from
    for attempt, (rank, after) in enumerate([(3, 5), (1, 8)]):
        deadline = time.time() + 240
        while not any(json.loads(line)["iter"] >= after for line in (
                (run_dir / "metrics.jsonl").read_text().splitlines()[-1:] if (run_dir / "metrics.jsonl").is_file()
                else [])):
            assert time.time() < deadline and scontrol_field(job_id, "JobState", slurm) in ("PENDING", "RUNNING")
            time.sleep(0.1)
        victim = json.loads((run_dir / "heartbeats" / f"rank-{rank:05d}.json").read_text())
        assert victim["attempt"] == attempt, victim
        os.kill(victim["pid"], signal.SIGKILL)
        # On a loaded machine the ranks may finish the next checkpoint (every 3) before the kill lands; one
        # whose files were all written may still be published just after. Read it once that has settled,
        # before the restarted attempt (seconds away) can save again.
        time.sleep(1.0)
        resumed_from.append(int((tmp_path / "sbatch-ckpt" / "latest").read_text().strip().removeprefix("global_step")))
    assert resumed_from[0] in (3, 6) and resumed_from[1] in (6, 9), resumed_from
    assert wait_for_state(job_id, slurm) == "COMPLETED", (tmp_path / f"sbatch-{job_id}.out").read_text()[-3000:]
    assert losses_by_iteration(run_dir) == losses_by_iteration(pipeline_run / "run")
    restarts = [event for event in read_events(run_dir) if event["event"] == "restart"]
    assert [(event["rank"], event["resumed_from"]) for event in restarts] == [(3, resumed_from[0]),
                                                                            (1, resumed_from[1])], restarts

    # 2. mbloom-launch writes and submits the script; SLURM's end-of-time warning (SIGUSR1 to the batch
    # script) makes the ranks save a checkpoint and the job requeue itself; it resumes and completes.
    run_dir, checkpoints = tmp_path / "launched", tmp_path / "ckpt"
    result = subprocess.run([sys.executable, "-m", "megatron_bloom.cli.launch", "launcher=slurm", *TRAIN, *data_args(shard),
                             "parallel.tp=2", "train.iters=15", f"run.dir={run_dir}", f"checkpoint.dir={checkpoints}",
                             "checkpoint.save_interval=100"], env=slurm, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    job_id = int(result.stdout.split("submitted SLURM job ")[1].split()[0])
    assert (run_dir / "train.sbatch").is_file()
    deadline = time.time() + 240
    while not ((run_dir / "metrics.jsonl").is_file() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert time.time() < deadline and scontrol_field(job_id, "JobState", slurm) in ("PENDING", "RUNNING")
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job_id)], env=slurm, check=True, timeout=60)
    wait_for_state(job_id, slurm, states=("PENDING",), timeout=120)  # requeued (it starts again ~10 s later)
    assert wait_for_state(job_id, slurm) == "COMPLETED", next(run_dir.glob("slurm-*.out")).read_text()[-3000:]
    assert scontrol_field(job_id, "Restarts", slurm) == "1"
    output = next(run_dir.glob("slurm-*.out")).read_text()
    assert "saving a checkpoint, then requeueing" in output and "an exact resume" in output
    assert sorted(losses_by_iteration(run_dir)) == list(range(1, 16))
