"""`mbloom-convert reshape` and the optimizer state it carries, on real DeepSpeed checkpoints: weights and
state exact, evaluation unchanged, training at the new layout continuing where the old one stood."""

import json

import pytest
import torch

from megatron_bloom.checkpoint.deepspeed_optimizer import MASTER, STATE_KEYS, read_optimizer_states
from megatron_bloom.checkpoint.layout import read_metadata, resolve_checkpoint
from megatron_bloom.checkpoint.weights import load_model_state_dict
from megatron_bloom.checkpoint.universal import read_layers
from megatron_bloom.parallel.sharding import merge_state_dicts
from megatron_bloom.pipeline.names import layer_prefixes
from tests.conftest import CORPUS, assert_user_error, overrides, run_cli, run_ranks
from tests.test_checkpoints import losses_by_iteration

pytestmark = pytest.mark.slow  # every test trains, converts or evaluates on real processes

LAYOUTS = [(1, 1), (4, 1), (1, 4)]


@pytest.fixture(scope="module")
def trained(pipeline_run, tmp_path_factory):
    """A (tp 2, pp 2) fp32 run of 12 iterations with ZeRO 1 (`pipeline_run`), its checkpoint of iteration 4
    reshaped to each of LAYOUTS."""
    root = tmp_path_factory.mktemp("reshape")
    (root / "run").symlink_to(pipeline_run / "run")
    source = pipeline_run / "ckpt" / "global_step4"
    for tp, pp in LAYOUTS:
        run_cli(["megatron_bloom.cli.convert", "reshape", "--checkpoint", str(source), "--output",
                 str(root / f"reshaped-{tp}-{pp}"), "--tp", str(tp), "--pp", str(pp)])
    return root, source


def full_optimizer_state(directory):
    """Every parameter's fp32 master and Adam moments, single-process names and shapes, and the step."""
    metadata = read_metadata(directory)
    if metadata.contents == "universal":
        return read_layers(directory, metadata, range(len(layer_prefixes(metadata.model))))
    full = {key: {} for key in STATE_KEYS}
    steps = set()
    for stage in range(metadata.pp):
        per_rank = [read_optimizer_states(directory, metadata, stage, rank) for rank in range(metadata.tp)]
        steps |= {states.step for states in per_rank}
        for key in STATE_KEYS:
            for name, tensor in merge_state_dicts([s.tensors[key] for s in per_rank], metadata.model).items():
                full[key].setdefault(name, tensor)
    assert len(steps) == 1
    return full, steps.pop()


def test_reshape_keeps_weights_and_optimizer_state_exactly(trained):
    root, source = trained
    weights = load_model_state_dict(source)[1]
    state, step = full_optimizer_state(source)
    assert step == 4
    for tp, pp in LAYOUTS:
        directory = resolve_checkpoint(root / f"reshaped-{tp}-{pp}")
        metadata = read_metadata(directory)
        assert (metadata.tp, metadata.pp, metadata.contents, metadata.iteration) == (tp, pp, "universal", 4)
        assert metadata.consumed_samples == 32
        reshaped_weights = load_model_state_dict(directory)[1]
        assert reshaped_weights.keys() == weights.keys()
        assert all(torch.equal(reshaped_weights[name], weights[name]) for name in weights)
        reshaped_state, reshaped_step = full_optimizer_state(directory)
        assert reshaped_step == step
        for key in STATE_KEYS:
            assert reshaped_state[key].keys() == weights.keys()
            assert all(torch.equal(reshaped_state[key][name], state[key][name]) for name in weights), key
        assert all(torch.equal(state[MASTER][name], weights[name]) for name in weights)  # fp32: master = weight


def test_reshaped_checkpoints_evaluate_to_the_same_loss(trained, shard, tmp_path):
    root, source = trained
    texts = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()[:24]]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    def eval_loss(checkpoint, tp):
        result = run_ranks(tp, "megatron_bloom.cli.eval", [
            f"checkpoint.load={checkpoint}", f"eval.input={tmp_path / 'docs.jsonl'}",
            f"eval.tokenizer={shard / 'tok'}", "precision=fp32", f"parallel.tp={tp}", "eval.seq_length=64"])
        return json.loads(result.stdout.strip().splitlines()[-1])["loss"]

    expected = eval_loss(source, 2)
    for tp, pp in LAYOUTS:
        assert abs(eval_loss(root / f"reshaped-{tp}-{pp}", tp) - expected) <= 1e-5, (tp, pp)


@pytest.mark.parametrize("layout", [(1, 1, 1, 1), (4, 1, 1, 0), (1, 4, 1, 1), (1, 1, 2, 3)],
                         ids=["tp1-zero1", "tp4-zero0", "pp4-zero1", "dp2-zero3"])
def test_training_continues_after_a_reshape_with_the_optimizer_state(trained, shard, tmp_path, layout):
    """Iterations 5-12 from the reshaped iteration-4 checkpoint, at a new (tp, pp, dp, ZeRO stage), give the
    losses of the original run; starting with a fresh optimizer instead visibly does not."""
    root, source = trained
    tp, pp, dp, zero = layout
    reference = losses_by_iteration(root / "run")
    args = overrides(shard, tmp_path / "run", tp, pp, dp, zero=zero, iters=12)
    run_ranks(tp * pp * dp, "megatron_bloom.cli.train", args + [f"checkpoint.load={root / f'reshaped-{tp}-{pp}'}"])
    continued = losses_by_iteration(tmp_path / "run")
    assert sorted(continued) == list(range(5, 13))
    for iteration, loss in continued.items():
        assert abs(loss - reference[iteration]) <= 1e-5 * reference[iteration], (iteration, loss, reference[iteration])
    if layout == (1, 1, 1, 1):
        run_ranks(1, "megatron_bloom.cli.train", overrides(shard, tmp_path / "fresh", 1, 1, 1, iters=12) + [
            f"checkpoint.load={source}"])
        fresh = losses_by_iteration(tmp_path / "fresh")
        assert max(abs(fresh[i] - reference[i]) / reference[i] for i in fresh) > 2e-4


def test_the_optimizer_state_of_every_zero_stage_and_precision_reads_back(shard, tmp_path):
    """The readers of ZeRO 3's per-parameter partitions, of the torch optimizer without ZeRO (pipeline
    stages included, split by blocks where the `trained` fixture's are split by FLOPs), and of both bf16
    optimizers: fp32 runs of the same training agree with each other, and a bf16 run's masters round to
    exactly the bf16 weights DeepSpeed saved."""
    states = {}
    for name, (tp, pp, dp, zero, precision) in {"zero3": (1, 1, 2, 3, "fp32"), "pipeline-zero0": (1, 2, 1, 0, "fp32"),
                                                "bf16-zero1": (1, 1, 2, 1, "bf16"),
                                                "bf16-zero0": (1, 1, 1, 0, "bf16")}.items():
        run_ranks(tp * pp * dp, "megatron_bloom.cli.train", overrides(
            shard, tmp_path / name, tp, pp, dp, zero=zero, iters=3, precision=precision) + [
            f"checkpoint.dir={tmp_path / name / 'ckpt'}", "parallel.pipeline_partition=blocks"])
        directory = resolve_checkpoint(tmp_path / name / "ckpt")
        assert read_metadata(directory).pipeline_partition == "blocks"
        states[name] = full_optimizer_state(directory)
        weights = load_model_state_dict(directory)[1]
        masters = states[name][0][MASTER]
        assert all(torch.equal(masters[param].to(weights[param].dtype), weights[param]) for param in weights)
    reference, step = states["zero3"]
    other, other_step = states["pipeline-zero0"]
    assert step == other_step == 3
    for key in STATE_KEYS:
        for param, tensor in reference[key].items():
            scale = tensor.abs().max().clamp_min(1e-12)
            assert (other[key][param] - tensor).abs().max() <= 1e-4 * scale, (key, param)
    for name in ("bf16-zero1", "bf16-zero0"):
        moments = states[name][0]["exp_avg_sq"]
        assert all(torch.isfinite(t).all() for t in moments.values()) and any(t.abs().sum() > 0 for t in moments.values())


def test_reshape_refuses_an_impossible_layout(trained, tmp_path):
    root, source = trained
    result = run_cli(["megatron_bloom.cli.convert", "reshape", "--checkpoint", str(source), "--output",
                      str(tmp_path / "bad"), "--tp", "3", "--pp", "1"], check=False)
    assert_user_error(result, "3")
    result = run_cli(["megatron_bloom.cli.convert", "reshape", "--checkpoint", str(source), "--output",
                      str(tmp_path / "bad"), "--tp", "1", "--pp", "5"], check=False)
    assert_user_error(result, "--pp 5", "4 layers")
    assert not (tmp_path / "bad").exists()
