"""`mbloom-train task=NAME`: the three fine-tuning heads train at (tp, pp) = (1, 1) and (2, 2) with the
logits and losses of `transformers`' classes on the same weights and the same losses at both layouts; a
pre-training checkpoint starts the trunk with a new head; fine-tuning resumes exactly; a fine-tuned
bloom-tiny beats chance and its export gives `transformers` the same predictions."""

import json

import numpy as np
import pytest
import torch

from megatron_bloom.config import load_config
from megatron_bloom.errors import ConfigError, UserError
from megatron_bloom.model import TaskConfig, initial_value
from megatron_bloom.parallel import ParallelState
from megatron_bloom.parallel.sharding import full_shapes, shard_tensor
from megatron_bloom.tasks.metrics import classification_metrics
from megatron_bloom.tasks.training_data import build_task_data, collate_task_samples
from megatron_bloom.training.validation import validate_training_inputs
from tests.conftest import (
    TASK_DATA,
    TASK_FILES,
    assert_user_error,
    exported_task_model,
    run_cli,
    run_ranks,
    small_config,
    task_tokenizer,
)
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow  # every test trains, converts or evaluates on real processes

FILES = TASK_FILES
LENGTHS = {"sequence_classification": ["task.max_length=64"], "token_classification": ["task.max_length=64"],
           "question_answering": ["task.max_length=48", "task.stride=8"]}
CONFIG = small_config(vocab_size=512)  # 2 layers: one per pipeline stage
MICRO, STEPS = 2, 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return task_tokenizer(tmp_path_factory.mktemp("finetune-tok"))


def task_overrides(task_name, tokenizer_dir, run_dir, tp=1, pp=1):
    return ["model=bloom-tiny", "model.num_layers=2", "model.vocab_size=512", f"task={task_name}",
            f"task.train={TASK_DATA / FILES[task_name]}.train.jsonl", f"data.tokenizer={tokenizer_dir}",
            *LENGTHS[task_name], "precision=fp32", f"train.iters={STEPS}", "train.global_batch_size=8",
            f"train.micro_batch_size={MICRO}", "optim.lr=1e-3", "sched.warmup_iters=2", "zero.stage=1",
            f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.dp=1", f"run.dir={run_dir}", "logging.interval=1"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tokenizer_dir):
    """Per task: a random transformers head (label names set, saved) and its `from-hf` checkpoint; and a
    random language model's (the pre-training checkpoint a fine-tuning run may start from)."""
    root = tmp_path_factory.mktemp("imported")
    for index, task_name in enumerate([*FILES, "causal_lm"]):
        exported_task_model(root / task_name, task_name, CONFIG, seed=index)
    return root


def first_micro_batch(config):
    data = build_task_data(config, (MICRO, 0), None, report_to_stderr=False)
    return collate_task_samples([data.train[index] for index in range(MICRO)])


def layout_worker(rank, world_size, imported, tokenizer_dir, run_root, tp, pp):
    """Per task, from the imported head: the logits and loss of the first micro-batch, then 20 steps."""
    from megatron_bloom.training.checkpointing import start_point
    from megatron_bloom.training.loop import build_engine, train

    results = {}
    state = ParallelState.create(tp=tp, pp=pp, dp=1)
    for task_name in FILES:
        config = load_config(task_overrides(task_name, tokenizer_dir, run_root / task_name, tp, pp)
                             + [f"checkpoint.load={imported / task_name / 'ckpt'}",
                                f"checkpoint.dir={run_root / task_name / 'ckpt'}"])
        start = start_point(config, state)
        task = build_task_data(config, (MICRO, 0), start.metadata.task, report_to_stderr=False).task
        engine, _, _ = build_engine(config, state, start, task)
        inputs, labels = first_micro_batch(config)
        if pp == 1:
            with torch.no_grad():
                engine.module.eval()
                logits, loss = engine.module.outputs(inputs), engine.module(inputs, labels)
        else:
            loss, logits = engine.eval_batch(iter([(inputs, labels)]), return_logits=True, num_micro_batches=1)
        results[task_name] = {"logits": logits, "loss": float(loss), "task": task,
                              "losses": train(config, state).losses}
    results["run_root"] = run_root
    if tp * pp > 1:
        results["new_head"] = new_head_check(imported, tokenizer_dir, run_root, state)
    return results


def new_head_check(imported, tokenizer_dir, run_root, state):
    """A run of another task than its checkpoint's: the trunk's weights are the checkpoint's, the head has
    its initial values, and the run starts at iteration 0."""
    from megatron_bloom.checkpoint.weights import load_model_state_dict
    from megatron_bloom.training.checkpointing import start_point
    from megatron_bloom.pipeline.names import named_model_parameters
    from megatron_bloom.training.loop import build_engine

    config = load_config(task_overrides("sequence_classification", tokenizer_dir, run_root / "new", 2, 2)
                         + [f"checkpoint.load={imported / 'causal_lm' / 'ckpt'}"])
    start = start_point(config, state)
    task = build_task_data(config, (MICRO, 0), None, report_to_stderr=False).task
    engine, _, _ = build_engine(config, state, start, task)
    metadata, full = load_model_state_dict(start.directory)
    shapes = full_shapes(config.model, task)
    checked = []
    for name, param in named_model_parameters(engine.module):
        value = full[name] if name.startswith("transformer.") else initial_value(name, shapes[name], config.model,
                                                                                config.train.seed)
        torch.testing.assert_close(param.detach(), shard_tensor(name, value, metadata.model, 2, state.tp_rank),
                                   rtol=0, atol=0, msg=name)
        checked.append(name)
    return {"new_head": start.new_head, "iteration": start.progress().iteration, "checked": checked}


@pytest.fixture(scope="module")
def layouts(imported, tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    single = run_distributed(layout_worker, 1, imported, tokenizer_dir, root / "1x1", 1, 1)[0]
    grid = run_distributed(layout_worker, 4, imported, tokenizer_dir, root / "2x2", 2, 2)
    return single, grid


def reference_outputs(imported, task_name, tokenizer_dir, tmp_path):
    """transformers' logits (per position for token tasks) and loss on the same first micro-batch."""
    import transformers

    from megatron_bloom.checkpoint.hf import ARCHITECTURES

    reference = getattr(transformers, ARCHITECTURES[task_name]).from_pretrained(imported / task_name / "hf").eval()
    config = load_config(task_overrides(task_name, tokenizer_dir, tmp_path))
    (input_ids, mask), labels = first_micro_batch(config)
    with torch.no_grad():
        if task_name == "question_answering":
            output = reference(input_ids, attention_mask=mask, start_positions=labels[:, 0],
                               end_positions=labels[:, 1])
            return torch.stack([output.start_logits, output.end_logits], dim=-1), output.loss, None
        if task_name == "sequence_classification":
            output = reference(input_ids, attention_mask=mask, labels=labels[0])
            return output.logits, output.loss, labels[1]
        output = reference(input_ids, attention_mask=mask, labels=labels)
        return output.logits, output.loss, None


@pytest.mark.parametrize("task_name", list(FILES))
def test_heads_match_transformers_and_train_alike_at_both_layouts(layouts, imported, tokenizer_dir, tmp_path,
                                                                  task_name):
    single, grid = layouts
    expected_logits, expected_loss, last_token = reference_outputs(imported, task_name, tokenizer_dir, tmp_path)
    last_stage = [result[task_name] for result in grid if result[task_name]["logits"] is not None]
    assert len(last_stage) == 2  # the two tp ranks of the last pipeline stage
    for result in [single[task_name], *last_stage]:
        logits = result["logits"]
        if last_token is not None:  # the head scores every position; the loss pools the last real token
            logits = logits[torch.arange(MICRO), last_token]
        assert (logits - expected_logits).abs().max().item() <= 1e-5
        assert abs(result["loss"] - expected_loss.item()) <= 1e-5
    assert single[task_name]["task"].labels == imported_labels(imported, task_name)
    reference_losses = single[task_name]["losses"]
    assert len(reference_losses) == STEPS and all(np.isfinite(reference_losses))
    for result in grid:  # every rank reports the global-batch loss
        np.testing.assert_allclose(result[task_name]["losses"], reference_losses, rtol=1e-4)


def test_fine_tuned_checkpoints_of_both_layouts_hold_the_same_weights(layouts, tmp_path):
    """The (2, 2) run's checkpoint (pipeline layer files, head included), reshaped to (1, 1), and the (1, 1)
    run's: the same fine-tuned weights and head. (Sequence classification: in question answering a bias
    added to every position's logit, `qa_outputs.bias` and `ln_f.bias`, gets a zero gradient, so Adam
    moves it by rounding noise alone, differently at each layout.)"""
    from megatron_bloom.checkpoint.weights import load_model_state_dict

    single, grid = layouts
    root = single["run_root"].parent
    source = root / "2x2" / "sequence_classification" / "ckpt"
    run_cli(["megatron_bloom.cli.convert", "reshape", "--checkpoint", str(source),
             "--output", str(tmp_path / "reshaped"), "--tp", "1", "--pp", "1"])
    metadata, reshaped = load_model_state_dict(tmp_path / "reshaped")
    _, pipeline_files = load_model_state_dict(source)  # what mbloom-eval and to-hf read: the layer files
    assert pipeline_files.keys() == reshaped.keys()
    for name, value in pipeline_files.items():
        torch.testing.assert_close(reshaped[name], value, rtol=0, atol=0, msg=name)
    assert metadata.task.name == "sequence_classification" and metadata.iteration == STEPS
    assert metadata.task.labels == ["negative", "neutral", "positive"]
    _, expected = load_model_state_dict(root / "1x1" / "sequence_classification" / "ckpt")
    assert reshaped.keys() == expected.keys() and "score.weight" in expected
    for name, value in expected.items():
        torch.testing.assert_close(reshaped[name], value, rtol=1e-4, atol=1e-4, msg=name)


def imported_labels(imported, task_name):
    if task_name == "question_answering":
        return None
    id2label = json.loads((imported / task_name / "hf" / "config.json").read_text())["id2label"]
    return [id2label[str(index)] for index in range(len(id2label))]


def test_a_pretraining_checkpoint_starts_the_trunk_and_a_new_head(layouts):
    _, grid = layouts
    for result in grid:
        check = result["new_head"]
        assert check["new_head"] and check["iteration"] == 0
        assert any(name.startswith("transformer.") for name in check["checked"])
    head_owners = [result for result in grid if "score.weight" in result["new_head"]["checked"]]
    assert len(head_owners) == 2  # the last stage's two tp ranks


def resume_worker(rank, world_size, overrides, checkpoints):
    from megatron_bloom.training.loop import train

    state = ParallelState.create(tp=1, pp=1, dp=world_size)
    first = train(load_config(overrides + [f"checkpoint.dir={checkpoints}", "checkpoint.save_interval=5"]), state)
    resumed = train(load_config(overrides + [f"checkpoint.dir={checkpoints}",
                                             f"checkpoint.load={checkpoints / 'global_step5'}"]), state)
    return first.losses, resumed.losses


@pytest.mark.parametrize("dp, precision", [(1, "fp32"), (2, "bf16")], ids=["fp32", "bf16-dp2"])
def test_fine_tuning_resumes_exactly(tokenizer_dir, tmp_path, dp, precision):
    """... in fp32 on one rank, and under the defaults a cluster run has: bf16, ZeRO 1, 2 replicas."""
    overrides = task_overrides("sequence_classification", tokenizer_dir, tmp_path / "run") + [
        "train.iters=10", f"precision={precision}", f"parallel.dp={dp}"]
    for first, resumed in run_distributed(resume_worker, dp, overrides, tmp_path / "ckpt"):
        assert len(first) == 10 and resumed == first[5:]  # the data position and optimizer state carry over


def test_fine_tuned_bloom_tiny_beats_chance_and_exports_the_same_predictions(tmp_path, tokenizer_dir):
    """The real commands: mbloom-train (dp 2) from scratch, mbloom-eval, mbloom-convert to-hf."""
    import transformers

    from megatron_bloom.checkpoint.weights import load_model

    train_file, valid_file = (TASK_DATA / f"sentiment.{split}.jsonl" for split in ("train", "valid"))
    run_ranks(2, "megatron_bloom.cli.train", [
        "model=bloom-tiny", "task=sequence_classification", f"task.train={train_file}", f"task.valid={valid_file}",
        f"data.tokenizer={tokenizer_dir}", "precision=fp32", "train.iters=30", "train.global_batch_size=16",
        "train.micro_batch_size=4", "optim.lr=1e-3", "train.eval_interval=30", "train.eval_iters=2",
        "logging.interval=1", f"run.dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'ckpt'}"])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["iter"] for line in lines] == list(range(1, 31))
    validation = json.loads((tmp_path / "run" / "validation.jsonl").read_text())
    assert set(validation) == {"iter", "valid_loss"}  # no perplexity for a classifier
    evaluated = run_cli(["megatron_bloom.cli.eval", f"checkpoint.load={tmp_path / 'ckpt'}", f"eval.input={valid_file}",
                         f"eval.tokenizer={tokenizer_dir}", "precision=fp32"])
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert metrics["examples"] == 100 and metrics["accuracy"] >= 0.6  # chance: 1/3 (35/35/30 in the data)

    run_cli(["megatron_bloom.cli.convert", "to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--output",
             str(tmp_path / "hf")])
    exported = transformers.BloomForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert exported.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    config = load_config(["model=bloom-tiny", "task=sequence_classification", f"task.train={valid_file}",
                          f"data.tokenizer={tokenizer_dir}"])
    data = build_task_data(config, (100, 0), None, report_to_stderr=False)
    features = data.train.features
    ours, _ = load_model(tmp_path / "ckpt", ParallelState.single())
    with torch.no_grad():
        predictions = exported(features.input_ids, attention_mask=features.attention_mask).logits.argmax(-1)
        our_predictions = ours(features.input_ids, attention_mask=features.attention_mask).logits.argmax(-1)
    assert torch.equal(predictions, our_predictions)
    expected = classification_metrics(predictions, features.labels, 3)
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert metrics["macro_f1"] == pytest.approx(expected["macro_f1"], abs=1e-9)


def test_bad_fine_tuning_configs_are_clear_errors(tmp_path, tokenizer_dir, imported):
    base = task_overrides("sequence_classification", tokenizer_dir, tmp_path)
    for extra, fragment in [(["task.train=null"], "task.train=PATH.jsonl"),
                            (["data.tokenizer=null"], "data.tokenizer=TOK"),
                            ([f"task.train={tmp_path / 'missing.jsonl'}"], "not found")]:
        with pytest.raises((ConfigError, UserError), match=fragment):
            validate_training_inputs(load_config(base + extra))
    one_label = tmp_path / "one.jsonl"
    one_label.write_text('{"text": "a", "label": "yes"}\nnot json\n{"text": "b", "label": "yes"}\n')
    with pytest.raises(UserError, match="at least two labels"):
        build_task_data(load_config(base + [f"task.train={one_label}"]), (8, 0), None, report_to_stderr=False)
    head = TaskConfig(name="sequence_classification", num_labels=2, labels=["bad", "good"])
    with pytest.raises(UserError, match="2 outputs"):
        build_task_data(load_config(base), (8, 0), head, report_to_stderr=False)
    regression = TaskConfig(name="sequence_classification", num_labels=3, problem_type="regression")
    with pytest.raises(UserError, match="regression"):
        build_task_data(load_config(base), (8, 0), regression, report_to_stderr=False)
    refused = run_cli(["megatron_bloom.cli.train", *base, "task.train=null"], check=False)
    assert_user_error(refused, "task=sequence_classification", "task.train=PATH.jsonl")
