"""What a user sees of a training run: iteration lines while it runs, a line per saved checkpoint, a summary
at the end, and none of DeepSpeed's own start-up output."""

import os
import re
import subprocess
import sys

from tests.conftest import REPO, overrides, run_ranks

# DeepSpeed's start-up prints and warnings (its comm op build, pipeline seeds and topology, BF16-optimizer
# memory reports, the "untested optimizer" warning)
DEEPSPEED_CHATTER = ("built successfully", "SEED_LAYERS", "Using topology", "CPU Virtual Memory", "MA ",
                     "untested optimizer", "begin bf16_optimizer")


def test_iteration_lines_appear_while_the_run_goes_on_and_a_summary_ends_it(shard, tmp_path):
    args = overrides(shard, tmp_path / "run", 1, 1, 1, iters=30) + [f"checkpoint.dir={tmp_path / 'ckpt'}",
                                                                     "checkpoint.save_interval=15"]
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    run = subprocess.Popen([sys.executable, "-m", "megatron_bloom.cli.train", *args], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = run.stdout.readline()
        while first and not first.startswith("iter "):
            first = run.stdout.readline()
        still_running = run.poll() is None  # the first iteration's line came while the run goes on
        rest, stderr = run.communicate(timeout=300)
    finally:
        run.kill()
    assert run.returncode == 0, stderr[-3000:]
    assert first.startswith("iter      1/30") and still_running
    lines = [first, *rest.splitlines()]
    saved = [line for line in lines if line.startswith("saved checkpoint")]
    assert [line.split()[2] for line in saved] == [str(tmp_path / "ckpt" / f"global_step{i}") for i in (15, 30)]
    assert re.fullmatch(r"mbloom-train: done at iteration 30: 30 iterations and 30,720 tokens in \d+ min \d+ s; "
                        rf"final loss \d\.\d{{4}}; checkpoints in {re.escape(str(tmp_path / 'ckpt'))}", lines[-1])
    assert not [line for line in lines + stderr.splitlines() if any(word in line for word in DEEPSPEED_CHATTER)]


def test_a_pipeline_run_prints_none_of_deepspeeds_start_up_output(shard, tmp_path):
    """tp 2 x pp 2, bf16 with ZeRO 1 (DeepSpeed's BF16 optimizer): only our lines, from rank 0 (on stderr,
    at most which side each CPU operator runs)."""
    result = run_ranks(4, "megatron_bloom.cli.train",
                       overrides(shard, tmp_path / "run", 2, 2, 1, iters=2, precision="bf16"), cwd=tmp_path)
    lines = (result.stdout + result.stderr).splitlines()
    assert not [line for line in lines if any(word in line for word in DEEPSPEED_CHATTER)], lines
    output = result.stdout.splitlines()
    assert sum(line.startswith("iter ") for line in output) == 2 and output[-1].startswith("mbloom-train: done")
    assert all(re.match(r"megatron_bloom: [\w@]+ runs (our kernel|torch) on this CPU \(", line)
               for line in result.stderr.splitlines()), result.stderr
