"""3D training on real gloo processes: the same losses and weights at every (tp, pp, dp) layout."""

import gc
import json
import os

import numpy as np
import pytest
import torch

from megatron_bloom.config import load_config
from megatron_bloom.parallel import ParallelState, merge_state_dicts
from tests.conftest import REPO, overrides, run_cli, run_ranks
from tests.distributed import run_distributed



def train_worker(rank, world_size, args):
    from megatron_bloom.pipeline.names import named_model_parameters
    from megatron_bloom.training.loop import train

    config = load_config(args)
    state = ParallelState.create(tp=config.parallel.tp, pp=config.parallel.pp, dp=config.parallel.dp)
    result = train(config, state)
    weights = {name: param.detach().float().clone() for name, param in named_model_parameters(result.engine.module)}
    return {"losses": result.losses, "weights": weights, "tp_rank": state.tp_rank, "dp_rank": state.dp_rank,
            "frozen": gc.get_freeze_count()}  # objects the loop left out of the garbage collector's sight


def full_weights(results, config):
    """The single-process weights, assembled from the data-parallel replica 0 of every stage."""
    by_tp_rank = {}
    for result in results:
        if result["dp_rank"] == 0:
            by_tp_rank.setdefault(result["tp_rank"], {}).update(result["weights"])
    return merge_state_dicts([by_tp_rank[rank] for rank in sorted(by_tp_rank)], config.model)


def grad_norms(run_dir):
    return [json.loads(line)["grad_norm"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(shard, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "ref"
    args = overrides(shard, run_dir, 1, 1, 1)
    results = run_distributed(train_worker, 1, args)
    return results[0]["losses"], full_weights(results, load_config(args)), grad_norms(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp, dp, zero", [(2, 1, 1, 1), (1, 2, 1, 0), (1, 1, 2, 1), (2, 2, 2, 1)],
                         ids=["tp2", "pp2-zero0", "dp2", "tp2-pp2-dp2"])
def test_every_layout_trains_like_one_process(shard, reference, tmp_path, tp, pp, dp, zero):
    """... with the same gradient norm in metrics.jsonl (pp 2 without ZeRO: the norm over both stages)."""
    reference_losses, reference_weights, reference_norms = reference
    assert reference_losses[-1] < reference_losses[0]  # it learns
    args = overrides(shard, tmp_path / "run", tp, pp, dp, zero=zero)
    results = run_distributed(train_worker, tp * pp * dp, args)
    for result in results:  # every rank reports the same global-batch loss
        np.testing.assert_allclose(result["losses"], reference_losses, rtol=1e-4)
        assert result["frozen"] == 0
    np.testing.assert_allclose(grad_norms(tmp_path / "run"), reference_norms, rtol=1e-4)
    weights = full_weights(results, load_config(args))
    assert weights.keys() == reference_weights.keys()
    for name, value in reference_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-4, msg=name)


def zero_stages_worker(rank, world_size, shard, run_root):
    from megatron_bloom.training.loop import train

    losses = {}
    for stage in (0, 1, 2, 3):
        config = load_config(overrides(shard, f"{run_root}/zero{stage}", 1, 1, 2, zero=stage, iters=8))
        state = ParallelState.create(tp=1, pp=1, dp=2)
        losses[stage] = train(config, state).losses
    return losses


@pytest.mark.slow
def test_zero_stages_give_the_same_losses(shard, tmp_path):
    """... and the same gradient norms in metrics.jsonl (fp32 without ZeRO too, where DeepSpeed keeps none)."""
    results = run_distributed(zero_stages_worker, 2, shard, str(tmp_path))
    for losses in results:
        for stage in (1, 2, 3):
            np.testing.assert_allclose(losses[stage], losses[0], rtol=1e-5, err_msg=f"zero stage {stage}")
        assert losses[0][-1] < losses[0][0]
    norms = {stage: [json.loads(line)["grad_norm"] for line in (tmp_path / f"zero{stage}" / "metrics.jsonl").open()]
             for stage in (0, 1, 2, 3)}
    assert len(norms[0]) == 8 and all(np.isfinite(norms[0]))
    for stage in (1, 2, 3):
        np.testing.assert_allclose(norms[stage], norms[0], rtol=1e-4, err_msg=f"zero stage {stage}")


@pytest.mark.slow
def test_bf16_3d_run_learns(shard, tmp_path):
    """mbloom-train on 8 ranks (tp 2 x pp 2 x dp 2), bf16 with sequence parallelism, 24 iterations on real
    shards: no step skipped, and the loss falls by about 0.28 from the first 8 to the last 8 as the learning
    rate decays over the 24."""
    args = overrides(shard, tmp_path / "run", 2, 2, 2, iters=24, precision="bf16") + [
        "parallel.sequence_parallel=true"]
    result = run_ranks(8, "megatron_bloom.cli.train", args, cwd=tmp_path, timeout=600)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["iter"] for line in lines] == list(range(1, 25))
    assert set(lines[0]) == {"iter", "loss", "lr", "grad_norm", "consumed_samples", "step_s", "tokens_per_s",
                             "tflops_per_rank", "skipped", "slowest_rank", "slowest_rank_step_s",
                             "median_rank_step_s"}
    assert not any(line["skipped"] for line in lines)
    assert lines[-1]["consumed_samples"] == 24 * 8
    first, last = np.mean([l["loss"] for l in lines[:8]]), np.mean([l["loss"] for l in lines[-8:]])
    assert last < first - 0.2, (first, last)
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert "iter     24/24" in result.stdout


@pytest.mark.parametrize("extra, fragments", [
    (["data.paths=[/nonexistent/corpus]"], ["data.paths names files that do not exist", "/nonexistent/corpus.bin"]),
    (["data.paths=[/data/fort_de.bin]"], ["data.paths takes prefixes, without .bin or .idx: /data/fort_de.bin "
                                          "should be /data/fort_de."]),
    (["data.paths=[]"], ["data.paths is empty"]),
    (["parallel.tp=3"], ["model.num_heads (4)", "parallel.tp (3)"]),
    (["parallel.pp=5"], ["model.num_layers (4)", "parallel.pp (5)"]),
    (["parallel.pp=2", "zero.stage=3"], ["zero.stage=3", "parallel.pp=2"]),
    (["parallel.dp=3"], ["train.global_batch_size (8)", "parallel.dp (3)"]),
    (["model.vocab_size=512"], ["has 1024 tokens, more than model.vocab_size (512)"]),
    (["model.seq_length=0"], ["model.seq_length"]),
    (["parallel.tp=2", "parallel.dp=1", "parallel.sequence_parallel=true", "model.seq_length=127"],
     ["127 tokens (model.seq_length) over parallel.tp=2", "a multiple of 2"]),
    (["train.rampup_batch_size=[4,3,100]"], ["train.rampup_batch_size [4, 3, 100]", "whole increments of 3"]),
    (["checkpoint.save_interval=5"], ["checkpoint.save_interval and checkpoint.keep_last need checkpoint.dir"]),
])
def test_invalid_training_configs_are_refused_before_starting(shard, tmp_path, capsys, extra, fragments):
    """mbloom-train's own `main`, in this process: each is refused before any process group exists."""
    from megatron_bloom.cli.train import main
    from tests.conftest import assert_user_error_in_process

    args = overrides(shard, tmp_path / "run", 1, 1, 1) + [f"data.tokenizer={shard / 'tok'}"]
    args = [a for a in args if not a.startswith(("parallel.dp=", "parallel.tp=", "parallel.pp="))] + extra
    assert_user_error_in_process(main, args, capsys, *fragments)
    assert not (tmp_path / "run").exists()


def test_a_layout_that_does_not_match_the_processes_is_refused(shard, tmp_path):
    """A command started as users start it: tp 2 on one process stops with one paragraph, no traceback."""
    from tests.conftest import assert_user_error

    args = overrides(shard, tmp_path / "run", 2, 1, 1)
    args = [a for a in args if not a.startswith("parallel.dp=")]
    result = run_cli(["megatron_bloom.cli.train", *args], check=False, timeout=120)
    assert_user_error(result, "must equal the number of processes (1)")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_under_torchrun_a_config_mistake_is_said_once(shard, tmp_path):
    """Two ranks with a layout of four: rank 0 says it in one paragraph, the other rank quietly exits 2."""
    from tests.processes import run_module_ranks

    args = [a for a in overrides(shard, tmp_path / "run", 4, 1, 1) if not a.startswith("parallel.dp=")]
    result = run_module_ranks(2, "megatron_bloom.cli.train", args, cwd=tmp_path, env=dict(os.environ), timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.count("mbloom-train: error") == 1 and "must equal the number of processes (2)" in result.stderr


def test_token_ids_beyond_the_vocabulary_stop_the_run_with_a_clear_message(shard, tmp_path):
    """Shards made with a 1024-token tokenizer, a model of 512 and no data.tokenizer to check against: the
    first batch stops the run with one paragraph, not an index error inside the embedding."""
    from tests.conftest import assert_user_error

    args = overrides(shard, tmp_path / "run", 1, 1, 1, iters=2) + ["model.vocab_size=512"]
    result = run_cli(["megatron_bloom.cli.train", *args], check=False, timeout=120)
    assert_user_error(result, "the training data holds token id", "model.vocab_size is 512", "data.tokenizer")


def poisoned_worker(rank, world_size, args, poisoned_iterations):
    """Train with the first block's output made NaN (on rank 0 only) during some iterations."""
    import math

    from megatron_bloom.pipeline.layers import BlockPipe
    from megatron_bloom.pipeline.names import named_model_parameters
    from megatron_bloom.training.loop import TrainingDiverged, train

    config = load_config(args)
    state = ParallelState.create(tp=1, pp=1, dp=world_size)
    calls = {"n": 0}
    micro_per_iteration = config.train.global_batch_size // (config.train.micro_batch_size * world_size)
    snapshots = []

    def inject(engine):
        block = next(m for m in engine.module.modules() if isinstance(m, BlockPipe))

        weight = dict(named_model_parameters(engine.module))["transformer.h.0.mlp.dense_4h_to_h.weight"]

        def hook(module, inputs, output):
            iteration = calls["n"] // micro_per_iteration + 1
            if calls["n"] % micro_per_iteration == 0:  # the weights as the previous iteration left them
                snapshots.append(weight.detach().clone())
            calls["n"] += 1
            if rank == 0 and iteration in poisoned_iterations:
                return output * math.nan

        block.register_forward_hook(hook)

    try:
        result = train(config, state, on_engine=inject)
        return {"losses": result.losses, "snapshots": snapshots, "error": None}
    except TrainingDiverged as error:
        return {"losses": None, "snapshots": snapshots, "error": str(error)}


# ZeRO 1: DeepSpeed skips the step (its ZeRO optimizer in fp32, its BF16 optimizer in bf16); ZeRO 0, and ZeRO 2
# in bf16 (no separate overflow pass): our optimizer does.
@pytest.mark.slow
@pytest.mark.parametrize("zero, precision", [(0, "fp32"), (1, "fp32"), (1, "bf16"), (2, "bf16")])
def test_a_nan_step_is_skipped_on_every_rank_and_counted(shard, tmp_path, zero, precision):
    import json

    args = overrides(shard, tmp_path / "run", 1, 1, 2, zero=zero, iters=6, precision=precision)
    results = run_distributed(poisoned_worker, 2, args, {3})
    for result in results:
        losses = result["losses"]
        assert np.isnan(losses[2]) and all(np.isfinite(losses[i]) for i in (0, 1, 3, 4, 5))
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["skipped"] for line in lines] == [False, False, True, False, False, False]
    for result in results:  # iteration 3 changed no weight; every other iteration did
        before = result["snapshots"]  # weights at the start of iterations 1..6
        assert torch.equal(before[3], before[2])
        assert all(not torch.equal(before[i + 1], before[i]) for i in (0, 1, 3, 4))


@pytest.mark.slow
def test_consecutive_nan_steps_stop_the_run_with_a_clear_message(shard, tmp_path):
    args = overrides(shard, tmp_path / "run", 1, 1, 1, iters=10) + ["train.max_consecutive_skips=3"]
    results = run_distributed(poisoned_worker, 1, args, set(range(2, 11)))
    message = results[0]["error"]
    assert message.startswith("stopped at iteration 4: the last 3 iterations had a non-finite loss or gradient")
    assert "train.max_consecutive_skips" in message


def test_wandb_offline_and_tensorboard_need_no_network(shard, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = overrides(shard, tmp_path / "run", 1, 1, 1, iters=4) + ["logging.wandb.mode=offline",
                                                                     "logging.tensorboard=true"]
    run_cli(["megatron_bloom.cli.train", *args], timeout=300)
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    losses = [event.value for event in events.Scalars("train/loss")]
    metrics = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(losses, metrics, rtol=1e-6)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops_cleanly_after_the_current_iteration(shard, tmp_path):
    """SLURM preemption: SIGTERM to every rank of a (tp 2) run; all stop after the same iteration, save a
    checkpoint there first, and a run at another layout (tp 1) continues from it at the next iteration."""
    import os
    import signal
    import subprocess
    import time

    import psutil

    from megatron_bloom.checkpoint.layout import read_metadata
    from tests.conftest import torchrun_command

    args = overrides(shard, tmp_path / "run", 2, 1, 1, iters=10_000) + [f"checkpoint.dir={tmp_path / 'ckpt'}"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(torchrun_command(2, "megatron_bloom.cli.train", args), cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    for worker in psutil.Process(process.pid).children(recursive=True):  # what SLURM signals: every task
        worker.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert 3 <= last["iter"] < 10_000
    assert (f"received SIGTERM: stopped cleanly after iteration {last['iter']} ({last['consumed_samples']} "
            f"samples consumed, checkpoint saved in {tmp_path / 'ckpt'})") in stdout
    assert read_metadata(tmp_path / "ckpt").iteration == last["iter"]
    resumed = run_cli(["megatron_bloom.cli.train", *args[:-1], "parallel.tp=1", f"train.iters={last['iter'] + 1}",
                       f"checkpoint.load={tmp_path / 'ckpt'}"], check=False)
    # another layout (tp 1): a weights-only continuation, at the next iteration
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"iter {last['iter'] + 1:>6}/{last['iter'] + 1}" in resumed.stdout
    assert "starts from the weights only" in resumed.stderr


@pytest.mark.slow
def test_batch_size_ramp_up(shard, tmp_path):
    """Megatron's rampup_batch_size [4, 4, 24] to 16: +4 every 8 samples consumed, so batches of 4, 4, 8, 12,
    then 16; the same losses through the pipeline engine (pp 2) as in one process."""
    ramp = ["train.rampup_batch_size=[4,4,24]", "train.global_batch_size=16"]
    single = run_distributed(train_worker, 1, overrides(shard, tmp_path / "one", 1, 1, 1, iters=8) + ramp)
    piped = run_distributed(train_worker, 2, overrides(shard, tmp_path / "pp", 1, 2, 1, iters=8) + ramp)
    consumed = [json.loads(line)["consumed_samples"]
                for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert consumed == [4, 8, 16, 28, 44, 60, 76, 92]
    np.testing.assert_allclose(piped[0]["losses"], single[0]["losses"], rtol=1e-4)


@pytest.mark.slow
def test_periodic_validation_loss(shard, tmp_path):
    """Validation every 3 iterations on the held-out documents: the same through the pipeline engine with two
    data-parallel replicas as in one process."""
    tp, pp, dp = 1, 2, 2
    results = {}
    for name, (t, p, d) in (("reference", (1, 1, 1)), ("layout", (tp, pp, dp))):
        args = overrides(shard, tmp_path / name, t, p, d, iters=6) + ["train.eval_interval=3", "train.eval_iters=2",
                                                                       "data.split='8,2,0'"]
        run_ranks(t * p * d, "megatron_bloom.cli.train", args, cwd=tmp_path)
        results[name] = [json.loads(l) for l in (tmp_path / name / "validation.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in results["layout"]] == [3, 6]
    assert results["layout"][1]["valid_loss"] < results["layout"][0]["valid_loss"]
    np.testing.assert_allclose([r["valid_loss"] for r in results["layout"]],
                               [r["valid_loss"] for r in results["reference"]], rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp, dp", [(1, 1, 1), (1, 2, 1)], ids=["stacked", "pipeline"])
def test_activation_checkpointing_changes_nothing_but_memory(shard, reference, tmp_path, tp, pp, dp):
    args = overrides(shard, tmp_path / "run", tp, pp, dp) + ["train.activation_checkpointing=true"]
    results = run_distributed(train_worker, tp * pp * dp, args)
    np.testing.assert_allclose(results[0]["losses"], reference[0], rtol=1e-4)


def compiled_train_worker(rank, world_size, args):
    import torch._dynamo.utils

    result = train_worker(rank, world_size, args)
    return {**result, "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp, dp", [(1, 1, 1), (1, 2, 1)], ids=["stacked", "pipeline"])
def test_compiled_blocks_train_like_eager_ones(shard, reference, tmp_path, tp, pp, dp):
    """train.compile: every block through torch.compile (inductor's C++ kernels here), the same losses and
    weights as the eager reference run, within float32 rounding."""
    args = overrides(shard, tmp_path / "run", tp, pp, dp) + ["train.compile=true"]
    results = run_distributed(compiled_train_worker, tp * pp * dp, args)
    assert all(result["compiled_graphs"] >= 1 for result in results)
    np.testing.assert_allclose(results[0]["losses"], reference[0], rtol=1e-5)
    weights = full_weights(results, load_config(args))
    assert max((weights[name] - value).abs().max().item() for name, value in reference[1].items()) < 1e-5


def accumulated_gradients_worker(rank, world_size, args, micro_batches):
    """The float32 gradients of `micro_batches` different micro-batches accumulated in one step, and each
    micro-batch's on its own (a fresh engine each time: the same initial weights)."""
    from deepspeed.utils import safe_get_full_grad

    from megatron_bloom.training.loop import build_engine

    config = load_config(args).model
    tokens = torch.randint(0, config.vocab_size, (micro_batches, config.seq_length + 1),
                           generator=torch.Generator().manual_seed(0))

    def gradients(rows, accumulation):
        run_config = load_config(args + [f"train.global_batch_size={accumulation}", "train.micro_batch_size=1"])
        engine, _, _ = build_engine(run_config, ParallelState.create(tp=1, pp=1, dp=1))
        for step, row in enumerate(rows):
            engine.set_gradient_accumulation_boundary(step == len(rows) - 1)
            engine.backward(engine(tokens[row:row + 1, :-1], tokens[row:row + 1, 1:]))
        return {name: safe_get_full_grad(param).clone() for name, param in engine.module.named_parameters()}

    accumulated = gradients(range(micro_batches), micro_batches)
    singles = [gradients([row], 1) for row in range(micro_batches)]
    return accumulated, singles


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2])
def test_bf16_gradients_accumulate_in_fp32(shard, tmp_path, zero):
    """bf16 gradients are summed over micro-batches in float32, as Megatron-LM requires for bf16. DeepSpeed
    divides each of the 4 micro-batches' loss by 4, a power of two, so micro-batch i adds exactly g_i / 4 in
    bf16: the accumulated gradient is their exact sum (within float32 rounding), where a bf16 sum would
    round at each micro-batch (about 2^-9 relative)."""
    args = overrides(shard, tmp_path / "run", 1, 1, 1, zero=zero, precision="bf16")
    ((accumulated, singles),) = run_distributed(accumulated_gradients_worker, 1, args, 4)
    worst = 0.0
    for name, grad in accumulated.items():
        assert grad.dtype == torch.float32
        exact = sum(single[name].double() for single in singles) / 4
        worst = max(worst, ((grad.double() - exact).abs().max() / exact.abs().max()).item())
    assert worst < 1e-6
