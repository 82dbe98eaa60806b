"""Fine-tuning task data: the jsonl formats (bad lines counted), model inputs, answer decoding, metrics."""

import json

import pytest
import torch
from tokenizers import Tokenizer

from megatron_bloom.errors import UserError
from megatron_bloom.model.heads import IGNORE_INDEX
from megatron_bloom.tasks.features import (
    predicted_answers,
    question_answering_features,
    sequence_classification_features,
    span_text,
    token_classification_features,
)
from megatron_bloom.tasks.formats import LabelMap, read_task_file
from megatron_bloom.tasks.metrics import answer_metrics, classification_metrics, normalize_answer, tag_metrics
from tests.conftest import REPO, train_test_tokenizer

TASK_DATA = REPO / "data_prep" / "tasks"
PAD = 3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    texts = [line for path in sorted(TASK_DATA.glob("*.train.jsonl")) for line in path.read_text().splitlines()]
    directory = train_test_tokenizer(tmp_path_factory.mktemp("tok"), texts, vocab_size=400)
    return Tokenizer.from_file(str(directory / "tokenizer.json"))


def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_bad_lines_are_skipped_and_counted_by_reason(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [
        {"text": "good", "label": "pos"}, "{not json", "[1, 2]", {"text": "no label"}, {"text": 3, "label": "x"},
        {"text": "   ", "label": "pos"}, {"text": "index label", "label": 1}, {"text": "bool", "label": True}, ""])
    report = read_task_file(path, "sequence_classification")
    assert [example.text for example in report.examples] == ["good", "index label"]
    assert report.skipped == {"not JSON": 1, "not a JSON object": 1, "no 'label'": 1, "'text' of the wrong type": 1,
                              "empty 'text'": 1, "'label' of the wrong type": 1}

    path = write_lines(tmp_path / "b.jsonl", [
        {"tokens": ["a", "b"], "tags": ["O", "O"]}, {"tokens": ["a"], "tags": ["O", "O"]}, {"tokens": [], "tags": []},
        {"tokens": ["a", ""], "tags": ["O", "O"]}])
    report = read_task_file(path, "token_classification")
    assert len(report.examples) == 1
    assert report.skipped == {"'tags' not one per token": 1, "empty 'tokens'": 1,
                              "a token or tag that is not a non-empty string": 1}

    good = {"context": "Ada was born in Paris.", "question": "Where?",
            "answers": {"text": ["Paris"], "answer_start": [16]}}
    moved = dict(good, answers={"text": ["Paris"], "answer_start": [3]})
    uneven = dict(good, answers={"text": ["Paris", "x"], "answer_start": [16]})
    report = read_task_file(write_lines(tmp_path / "c.jsonl", [good, moved, uneven, {"context": "x"}]),
                            "question_answering")
    assert len(report.examples) == 1 and report.examples[0].id == "1"  # the line number when there is no id
    assert report.skipped == {"an answer not found at its answer_start": 1, "'answers' with as many texts as starts": 1,
                              "no 'question'": 1}


def test_files_without_usable_lines_and_unknown_tasks_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no usable sequence_classification example"):
        read_task_file(write_lines(tmp_path / "bad.jsonl", ["{oops", {"text": "x"}]), "sequence_classification")
    with pytest.raises(UserError, match="not found"):
        read_task_file(tmp_path / "missing.jsonl", "token_classification")
    with pytest.raises(UserError, match="causal_lm"):
        read_task_file(tmp_path / "bad.jsonl", "causal_lm")


def test_shipped_task_data_reads_cleanly():
    for name, task, count in (("sentiment", "sequence_classification", 3), ("entities", "token_classification", 4),
                              ("questions", "question_answering", None)):
        for split, size in (("train", 300), ("valid", 100)):
            report = read_task_file(TASK_DATA / f"{name}.{split}.jsonl", task)
            assert len(report.examples) == size and not report.skipped
        if count:
            assert len(LabelMap.from_examples(report.examples).names) == count


def test_label_maps():
    report_labels = LabelMap.from_examples([type("E", (), {"label": name})() for name in ["pos", "neg", "pos"]])
    assert report_labels.names == ["neg", "pos"] and report_labels.lookup("pos") == 1
    assert report_labels.lookup("other") is None and report_labels.lookup(1) == 1 and report_labels.lookup(2) is None
    assert LabelMap.from_examples([], given=["b", "a"]).names == ["b", "a"]
    with pytest.raises(UserError, match="twice"):
        LabelMap.from_examples([], given=["a", "a"])


def test_sequence_classification_features(tokenizer):
    examples = read_task_file(TASK_DATA / "sentiment.valid.jsonl", "sequence_classification").examples[:5]
    labels = LabelMap(["negative", "positive"])  # "neutral" is unknown here: those examples are left out
    features = sequence_classification_features(examples, tokenizer, labels, max_length=16, pad_id=PAD)
    kept = [example for example in examples if example.label != "neutral"]
    assert features.skipped == len(examples) - len(kept)
    assert features.input_ids.shape == (len(kept), 16)
    assert features.labels.tolist() == [labels.lookup(example.label) for example in kept]
    for row, example in enumerate(kept):
        ids = tokenizer.encode(example.text).ids[:16]  # truncated to max_length
        assert features.input_ids[row, :len(ids)].tolist() == ids
        assert features.attention_mask[row].sum() == len(ids)
        assert (features.input_ids[row, len(ids):] == PAD).all()


def test_each_words_tag_goes_to_its_first_token(tokenizer):
    examples = read_task_file(TASK_DATA / "entities.valid.jsonl", "token_classification").examples[:20]
    labels = LabelMap.from_examples(examples)
    features = token_classification_features(examples, tokenizer, labels, max_length=64, pad_id=PAD)
    assert features.attention_mask.sum(-1).max() < 64  # nothing truncated here
    for row, example in enumerate(examples):
        scored = features.labels[row][features.labels[row] != IGNORE_INDEX].tolist()
        assert scored == [labels.lookup(tag) for tag in example.tags]  # one label per word, in order
        encoding = tokenizer.encode(" ".join(example.tokens))
        first_tokens = (features.labels[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        decoded = [tokenizer.decode(encoding.ids[a:b]).strip()
                   for a, b in zip(first_tokens, first_tokens[1:] + [len(encoding.ids)])]
        assert decoded == example.tokens  # each scored token starts a word and the words follow in order
    # truncation drops the tags of the words that do not fit
    short = token_classification_features(examples, tokenizer, labels, max_length=3, pad_id=PAD)
    assert short.labels.shape == (20, 3)


def test_question_answering_windows_and_decoding(tokenizer):
    examples = read_task_file(TASK_DATA / "questions.valid.jsonl", "question_answering").examples[:6]
    features = question_answering_features(examples, tokenizer, max_length=32, stride=6, pad_id=PAD)
    assert len(features.example_index) > len(examples)  # the contexts need several windows each
    assert sorted(set(features.example_index)) == list(range(len(examples)))
    for row, example in enumerate(features.example_index):
        start, end = features.labels[row].tolist()
        if (start, end) != (0, 0):
            context = examples[example].context
            assert span_text(context, features.offsets[row], start, end) == examples[example].answers[0]
    assert all(any(features.labels[row].tolist() != [0, 0] for row, index in enumerate(features.example_index)
                   if index == example) for example in range(len(examples)))  # some window holds each answer
    # logits peaked at the labelled positions decode to the gold answers
    start_logits = torch.full(features.input_ids.shape, -5.0)
    end_logits = torch.full(features.input_ids.shape, -5.0)
    for row, (start, end) in enumerate(features.labels.tolist()):
        if (start, end) != (0, 0):
            start_logits[row, start], end_logits[row, end] = 5.0, 5.0
    answers = predicted_answers(start_logits, end_logits, features, [example.context for example in examples])
    assert answers == [example.answers[0] for example in examples]
    with pytest.raises(UserError, match="task.stride"):
        question_answering_features(examples, tokenizer, max_length=16, stride=12, pad_id=PAD)


def test_metrics():
    predictions, labels = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])
    metrics = classification_metrics(predictions, labels, num_labels=3)
    assert metrics["accuracy"] == 0.75
    assert metrics["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 2 / 3) / 3)
    tags = torch.tensor([[0, 1, IGNORE_INDEX, 2], [0, 0, 1, IGNORE_INDEX]])
    predicted = torch.tensor([[0, 1, 2, 1], [1, 0, 1, 0]])
    # outside = 0; of the 6 scored tokens 3 are tagged, 4 predicted tagged, 2 rightly: P 1/2, R 2/3, F1 4/7
    assert tag_metrics(predicted, tags, outside=0) == {"accuracy": pytest.approx(4 / 6), "f1": pytest.approx(4 / 7)}
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    result = answer_metrics(["the Eiffel tower", "in Paris", ""], [["Eiffel Tower"], ["Paris", "France"], ["x"]])
    assert result["exact_match"] == pytest.approx(1 / 3)
    assert result["f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
