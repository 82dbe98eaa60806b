"""`mbloom-eval task=...`: fine-tuning heads imported from transformers, evaluated at tp 2 x pp 2 (and dp 2) on the
shipped task data, give the metrics of transformers' own predictions on the same inputs."""

import json

import pytest
import torch

from megatron_bloom.data.tokenizer import load_tokenizer
from megatron_bloom.model import ModelConfig
from megatron_bloom.tasks.features import (
    predicted_answers,
    question_answering_features,
    sequence_classification_features,
    token_classification_features,
)
from megatron_bloom.tasks.formats import LabelMap, read_task_file
from megatron_bloom.tasks.metrics import answer_metrics, classification_metrics, tag_metrics
from tests.conftest import (
    TASK_DATA,
    TASK_FILES,
    assert_user_error,
    exported_task_model,
    run_cli,
    run_ranks,
    task_tokenizer,
)

pytestmark = pytest.mark.slow  # every test trains, converts or evaluates on real processes

CONFIG = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=512, seq_length=128)
FILES = TASK_FILES
SETTINGS = {"sequence_classification": [], "token_classification": [],
            "question_answering": ["task.max_length=48", "task.stride=8"]}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return task_tokenizer(tmp_path_factory.mktemp("task-tok"))


def exported(root, task_name: str):
    """A transformers model of the task (label names set), converted with `mbloom-convert from-hf`."""
    return exported_task_model(root, task_name, CONFIG, seed=3)


def expected_metrics(reference, task_name: str, labels, tokenizer_dir) -> dict:
    """The metrics of transformers' predictions on the same features (fp32)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    examples = read_task_file(TASK_DATA / f"{FILES[task_name]}.valid.jsonl", task_name).examples
    pad = CONFIG.pad_token_id
    with torch.no_grad():
        if task_name == "question_answering":
            features = question_answering_features(examples, tokenizer, 48, 8, pad)
            output = reference(features.input_ids, attention_mask=features.attention_mask)
            answers = predicted_answers(output.start_logits, output.end_logits, features,
                                        [example.context for example in examples])
            return answer_metrics(answers, [example.answers for example in examples])
        label_map = LabelMap(labels)
        build = (sequence_classification_features if task_name == "sequence_classification"
                 else token_classification_features)
        features = build(examples, tokenizer, label_map, 128, pad)
        predictions = reference(features.input_ids, attention_mask=features.attention_mask).logits.argmax(-1)
    if task_name == "sequence_classification":
        return classification_metrics(predictions, features.labels, len(labels))
    return tag_metrics(predictions, features.labels, label_map.lookup("O"))


TP2_PP2 = ["parallel.tp=2", "parallel.pp=2"]  # the head on the last stage; the metrics shared from there


@pytest.mark.parametrize("task_name, nproc, layout", [
    ("sequence_classification", 4, TP2_PP2),
    ("token_classification", 4, TP2_PP2),
    ("question_answering", 4, TP2_PP2),
    ("sequence_classification", 2, ["parallel.dp=2"]),  # the data-parallel ranks split the rows
], ids=["sequence-tp2-pp2", "token-tp2-pp2", "qa-tp2-pp2", "sequence-dp2"])
def test_task_metrics_match_transformers(tmp_path, tokenizer_dir, task_name, nproc, layout):
    reference, labels = exported(tmp_path, task_name)
    result = run_ranks(nproc, "megatron_bloom.cli.eval", [
        f"checkpoint.load={tmp_path / 'ckpt'}", f"eval.input={TASK_DATA / FILES[task_name]}.valid.jsonl",
        f"eval.tokenizer={tokenizer_dir}", f"task={task_name}", "precision=fp32", "eval.micro_batch_size=16",
        *SETTINGS[task_name], *layout])
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["task"] == task_name and summary["examples"] == 100 and summary["skipped"] == 0
    expected = expected_metrics(reference, task_name, labels, tokenizer_dir)
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, abs=1e-9), (key, summary, expected)


def test_task_mismatches_are_user_errors(tmp_path, tokenizer_dir):
    exported(tmp_path, "sequence_classification")
    common = [f"checkpoint.load={tmp_path / 'ckpt'}", f"eval.tokenizer={tokenizer_dir}"]
    wrong_task = run_cli(["megatron_bloom.cli.eval", *common, f"eval.input={TASK_DATA / 'entities.valid.jsonl'}",
                          "task=token_classification"], check=False)
    assert_user_error(wrong_task, "task=token_classification", "sequence_classification model")
    wrong_labels = run_cli(["megatron_bloom.cli.eval", *common, f"eval.input={TASK_DATA / 'sentiment.valid.jsonl'}",
                            "task.labels=[good,bad]"], check=False)
    assert_user_error(wrong_labels, "3 outputs", "task.labels")
