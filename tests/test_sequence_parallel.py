"""Sequence parallelism in training: the (tp 2, pp 2) run of `pipeline_run` with it on gives the same
losses and weights, and saves the same checkpoints (a run switches it on or off when it resumes). In bf16
it learns without skipping a step: `test_training.py`'s 3D bf16 run has it on."""

import json

import numpy as np
import pytest
import torch

from megatron_bloom.checkpoint.weights import load_model_state_dict
from tests.conftest import overrides, run_ranks

pytestmark = pytest.mark.slow  # every test trains on 4 real processes
SEQUENCE_PARALLEL = "parallel.sequence_parallel=true"


def losses(run_dir):
    """Iteration -> loss of a run's metrics.jsonl (the last line of an iteration counts)."""
    return {line["iter"]: line["loss"] for line in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def assert_same_losses(actual: dict, expected: dict, iterations) -> None:
    assert sorted(actual) == list(iterations)
    np.testing.assert_allclose([actual[i] for i in iterations], [expected[i] for i in iterations], rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def sequence_parallel_run(shard, tmp_path_factory):
    """`pipeline_run` again with sequence parallelism: 12 iterations at tp 2 x pp 2, ZeRO 1, fp32,
    checkpoints after 4, 8 and 12."""
    root = tmp_path_factory.mktemp("sp")
    run_ranks(4, "megatron_bloom.cli.train", overrides(shard, root / "run", 2, 2, 1, iters=12) + [
        f"checkpoint.dir={root / 'ckpt'}", "checkpoint.save_interval=4", SEQUENCE_PARALLEL])
    return root


def test_sequence_parallel_trains_like_without_it(pipeline_run, sequence_parallel_run):
    assert_same_losses(losses(sequence_parallel_run / "run"), losses(pipeline_run / "run"), range(1, 13))
    with_sp, without = (load_model_state_dict(run / "ckpt")[1] for run in (sequence_parallel_run, pipeline_run))
    assert with_sp.keys() == without.keys()
    for name, value in without.items():  # the LayerNorms and row-parallel biases too: summed over tp
        torch.testing.assert_close(with_sp[name], value, rtol=1e-5, atol=1e-5, msg=name)
    # the same files: nothing in a checkpoint says whether sequence parallelism was on
    files = {run: sorted(path.name for path in (run / "ckpt" / "global_step12").iterdir())
             for run in (sequence_parallel_run, pipeline_run)}
    assert files[sequence_parallel_run] == files[pipeline_run]


@pytest.mark.parametrize("switch", ["on-then-off", "off-then-on"])
def test_a_run_switches_sequence_parallelism_when_it_resumes(shard, pipeline_run, sequence_parallel_run, tmp_path,
                                                             switch):
    """From iteration 8 of the run with it on (off), on to 12 with it off (on): the losses of the run that was
    never interrupted."""
    start = (sequence_parallel_run if switch == "on-then-off" else pipeline_run) / "ckpt" / "global_step8"
    args = overrides(shard, tmp_path / "run", 2, 2, 1, iters=12) + [f"checkpoint.load={start}"]
    run_ranks(4, "megatron_bloom.cli.train", args + ([SEQUENCE_PARALLEL] if switch == "off-then-on" else []))
    assert_same_losses(losses(tmp_path / "run"), losses(pipeline_run / "run"), range(9, 13))
