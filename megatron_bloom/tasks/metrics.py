"""The metrics each task reports: accuracy and macro F1; tag F1; exact match and F1 of answers (SQuAD v1.1)."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Dict, Optional, Sequence

import torch

from megatron_bloom.model.heads import IGNORE_INDEX


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor, num_labels: int) -> Dict[str, float]:
    """Accuracy and the macro average of each class's F1 (a class never predicted nor present is left out)."""
    accuracy = _fraction(predictions == labels)
    scores = []
    for label in range(num_labels):
        predicted, actual = predictions == label, labels == label
        if predicted.any() or actual.any():
            scores.append(_f1(int((predicted & actual).sum()), int(predicted.sum()), int(actual.sum())))
    return {"accuracy": accuracy, "macro_f1": sum(scores) / len(scores)}


def tag_metrics(predictions: torch.Tensor, labels: torch.Tensor, outside: Optional[int]) -> Dict[str, float]:
    """Over the scored tokens (labels != -100): accuracy, and the micro F1 of the tags other than the
    `outside` one ("O"; every tag counts when there is none)."""
    scored = labels != IGNORE_INDEX
    predictions, labels = predictions[scored], labels[scored]
    predicted = predictions != outside if outside is not None else torch.ones_like(predictions, dtype=torch.bool)
    actual = labels != outside if outside is not None else torch.ones_like(labels, dtype=torch.bool)
    correct = int(((predictions == labels) & predicted & actual).sum())
    return {"accuracy": _fraction(predictions == labels),
            "f1": _f1(correct, int(predicted.sum()), int(actual.sum()))}


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(character for character in text.lower() if character not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def answer_metrics(predictions: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> Dict[str, float]:
    """Exact match and token F1, each the best over an example's gold answers, averaged over examples."""
    exact = f1 = 0.0
    for prediction, answers in zip(predictions, gold_answers):
        exact += max(float(normalize_answer(prediction) == normalize_answer(answer)) for answer in answers)
        f1 += max(_answer_f1(prediction, answer) for answer in answers)
    return {"exact_match": exact / len(predictions), "f1": f1 / len(predictions)}


def _answer_f1(prediction: str, answer: str) -> float:
    predicted, actual = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not predicted or not actual:
        return float(predicted == actual)
    common = sum((Counter(predicted) & Counter(actual)).values())
    return _f1(common, len(predicted), len(actual))


def _fraction(hits: torch.Tensor) -> float:
    """The share of true entries, exactly (a float32 mean would print 0.79 as 0.7900000214576721)."""
    return int(hits.sum()) / hits.numel() if hits.numel() else float("nan")


def _f1(correct: int, predicted: int, actual: int) -> float:
    if correct == 0:
        return 0.0
    precision, recall = correct / predicted, correct / actual
    return 2 * precision * recall / (precision + recall)
