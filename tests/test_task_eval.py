"""`mbloom-eval task=...`: fine-tuning heads imported from transformers, evaluated at tp 2 (and dp 2) on the
shipped task data, give the metrics of transformers' own predictions on the same inputs."""

import json

import pytest
import torch

from megatron_bloom.data.tokenizer import load_tokenizer
from megatron_bloom.model import ModelConfig, TaskConfig
from megatron_bloom.tasks.features import (
    predicted_answers,
    question_answering_features,
    sequence_classification_features,
    token_classification_features,
)
from megatron_bloom.tasks.formats import LabelMap, read_task_file
from megatron_bloom.tasks.metrics import answer_metrics, classification_metrics, tag_metrics
from tests.conftest import REPO, assert_user_error, hf_model, run_cli, run_torchrun, train_test_tokenizer

TASK_DATA = REPO / "data_prep" / "tasks"
CONFIG = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=512, seq_length=128)
FILES = {"sequence_classification": "sentiment", "token_classification": "entities", "question_answering": "questions"}
SETTINGS = {"sequence_classification": [], "token_classification": [],
            "question_answering": ["task.max_length=48", "task.stride=8"]}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    texts = [line for path in sorted(TASK_DATA.glob("*.train.jsonl")) for line in path.read_text().splitlines()]
    return train_test_tokenizer(tmp_path_factory.mktemp("task-tok"), texts, vocab_size=500)


def exported(root, task_name: str):
    """A transformers model of the task (label names set), converted with `mbloom-convert from-hf`."""
    examples = read_task_file(TASK_DATA / f"{FILES[task_name]}.train.jsonl", task_name).examples
    labels = None if task_name == "question_answering" else LabelMap.from_examples(examples).names
    task = TaskConfig(name=task_name, num_labels=len(labels) if labels else 2)
    reference = hf_model(CONFIG, task, seed=3)
    if labels:
        reference.config.id2label = dict(enumerate(labels))
        reference.config.label2id = {name: index for index, name in enumerate(labels)}
    reference.save_pretrained(root / "hf")
    run_cli(["megatron_bloom.convert", "from-hf", "--hf", str(root / "hf"), "--output", str(root / "ckpt")])
    return reference, labels


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


@pytest.mark.parametrize("task_name, nproc, layout", [
    ("sequence_classification", 2, ["parallel.tp=2"]),
    ("token_classification", 2, ["parallel.tp=2"]),
    ("question_answering", 2, ["parallel.tp=2"]),
    ("sequence_classification", 2, ["parallel.dp=2"]),  # the data-parallel ranks split the rows
], ids=["sequence-tp2", "token-tp2", "qa-tp2", "sequence-dp2"])
def test_task_metrics_match_transformers(tmp_path, tokenizer_dir, task_name, nproc, layout):
    reference, labels = exported(tmp_path, task_name)
    result = run_torchrun(nproc, "megatron_bloom.eval", [
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
    wrong_task = run_cli(["megatron_bloom.eval", *common, f"eval.input={TASK_DATA / 'entities.valid.jsonl'}",
                          "task=token_classification"], check=False)
    assert_user_error(wrong_task, "task=token_classification", "sequence_classification model")
    wrong_labels = run_cli(["megatron_bloom.eval", *common, f"eval.input={TASK_DATA / 'sentiment.valid.jsonl'}",
                            "task.labels=[good,bad]"], check=False)
    assert_user_error(wrong_labels, "3 outputs", "task.labels")
