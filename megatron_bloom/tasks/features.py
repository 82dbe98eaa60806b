"""Task examples as fixed-length model inputs: token ids, attention mask and labels, right-padded.

Every feature has `max_length` tokens (pipeline stages exchange fixed shapes), padded with the model's pad
id; the heads find the last real token by that id, as `transformers`' `BloomForSequenceClassification` does.

* Sequence classification: the text's tokens (truncated), the label's index.
* Token classification: the words joined by spaces and tokenized once; each word's tag goes to its first
  token, the other tokens get -100 (not scored), as in `transformers`' token-classification examples.
* Question answering: the question's tokens, then a window of the context's; a long context gives several
  windows, each overlapping the last by `stride` tokens. The answer's first and last tokens are the labels;
  a window that does not hold the whole answer points both at position 0. Each feature keeps the character
  span of each context token, so predicted spans map back to text (`span_text`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from tokenizers import Tokenizer

from megatron_bloom.data.padding import padded_batch
from megatron_bloom.errors import UserError
from megatron_bloom.model.heads import IGNORE_INDEX
from megatron_bloom.tasks.formats import LabelMap, QuestionExample, TaggedExample, TextExample


@dataclass
class Features:
    """A task's tensors; `labels` is [n] (classes), [n, max_length] (tags) or [n, 2] (answer start, end)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    skipped: int = 0  # examples left out (an unknown label)
    # question answering: the example each feature came from and its context tokens' character spans
    example_index: List[int] = field(default_factory=list)
    offsets: List[List[Optional[Tuple[int, int]]]] = field(default_factory=list)


def sequence_classification_features(examples: Sequence[TextExample], tokenizer: Tokenizer, labels: LabelMap,
                                     max_length: int, pad_id: int) -> Features:
    rows, targets, skipped = [], [], 0
    for example in examples:
        target = labels.lookup(example.label)
        if target is None:
            skipped += 1
            continue
        rows.append(tokenizer.encode(example.text).ids[:max_length])
        targets.append(target)
    _require(rows, "sequence_classification", skipped)
    input_ids, attention_mask = padded_batch(rows, pad_id, max_length)
    return Features(input_ids, attention_mask, torch.tensor(targets, dtype=torch.long), skipped)


def token_classification_features(examples: Sequence[TaggedExample], tokenizer: Tokenizer, labels: LabelMap,
                                  max_length: int, pad_id: int) -> Features:
    rows, targets, skipped = [], [], 0
    for example in examples:
        tag_ids = [labels.lookup(tag) for tag in example.tags]
        if None in tag_ids:
            skipped += 1
            continue
        text, char_words = _join_words(example.tokens)
        encoding = tokenizer.encode(text)
        row_labels, previous_word = [], None
        for start, end in encoding.offsets[:max_length]:
            # a token belongs to the word of its last character (byte-level BPE glues the space before it)
            word = char_words[end - 1] if end > start else None
            row_labels.append(tag_ids[word] if word is not None and word != previous_word else IGNORE_INDEX)
            previous_word = word if word is not None else previous_word
        rows.append(encoding.ids[:max_length])
        targets.append(row_labels + [IGNORE_INDEX] * (max_length - len(row_labels)))
    _require(rows, "token_classification", skipped)
    input_ids, attention_mask = padded_batch(rows, pad_id, max_length)
    return Features(input_ids, attention_mask, torch.tensor(targets, dtype=torch.long), skipped)


def _join_words(words: Sequence[str]) -> Tuple[str, List[Optional[int]]]:
    """The words joined by spaces, and for each character the index of its word (None for the spaces)."""
    char_words: List[Optional[int]] = []
    for index, word in enumerate(words):
        char_words += ([None] if index else []) + [index] * len(word)
    return " ".join(words), char_words


def question_answering_features(examples: Sequence[QuestionExample], tokenizer: Tokenizer, max_length: int,
                                stride: int, pad_id: int, max_question_tokens: Optional[int] = None) -> Features:
    """Features for every window of every example (labels from the first answer)."""
    max_question_tokens = max_question_tokens or max_length // 2
    rows, targets, example_index, offsets = [], [], [], []
    for index, example in enumerate(examples):
        question = tokenizer.encode(example.question + "\n").ids[:max_question_tokens]
        context = tokenizer.encode(example.context)
        window = max_length - len(question)
        if window <= stride:
            raise UserError(f"task.max_length ({max_length}) leaves {window} context tokens per window after the "
                            f"question, not more than task.stride ({stride}): raise max_length or lower stride.")
        answer = (example.answer_starts[0], example.answer_starts[0] + len(example.answers[0])) \
            if example.answers else None
        start = 0
        while True:
            spans = context.offsets[start:start + window]
            rows.append(question + context.ids[start:start + window])
            targets.append(_answer_positions(spans, answer, len(question)))
            example_index.append(index)
            offsets.append([None] * len(question) + [tuple(span) for span in spans])
            if start + window >= len(context.ids):
                break
            start += window - stride
    input_ids, attention_mask = padded_batch(rows, pad_id, max_length)
    return Features(input_ids, attention_mask, torch.tensor(targets, dtype=torch.long), 0, example_index, offsets)


def _answer_positions(spans, answer: Optional[Tuple[int, int]], shift: int) -> Tuple[int, int]:
    if answer is None or not spans or not (spans[0][0] <= answer[0] and answer[1] <= spans[-1][1]):
        return 0, 0
    first = next(i for i, (start, end) in enumerate(spans) if end > answer[0])
    last = max(i for i, (start, end) in enumerate(spans) if start < answer[1])
    return shift + first, shift + last


def task_features(task: str, examples: Sequence, tokenizer: Tokenizer, labels: Optional[LabelMap], max_length: int,
                  stride: int, pad_id: int) -> Features:
    """The features of any fine-tuning task (`labels`: the classification tasks' label map)."""
    if task == "question_answering":
        return question_answering_features(examples, tokenizer, max_length, stride, pad_id)
    build = sequence_classification_features if task == "sequence_classification" else token_classification_features
    return build(examples, tokenizer, labels, max_length, pad_id)


def span_text(context: str, offsets: Sequence[Optional[Tuple[int, int]]], start: int, end: int) -> str:
    """The context's text from token `start` to token `end` of a feature ("" when not both in the context)."""
    if not (0 <= start <= end < len(offsets)) or offsets[start] is None or offsets[end] is None:
        return ""
    return context[offsets[start][0]:offsets[end][1]].strip()


def _require(rows: list, task: str, skipped: int) -> None:
    if not rows:
        raise UserError(f"no {task} example has a label of task.labels ({skipped} with unknown labels).")


def predicted_answers(start_logits: torch.Tensor, end_logits: torch.Tensor, features: Features,
                      contexts: Sequence[str], max_answer_tokens: int = 30) -> List[str]:
    """Each example's answer: over all its windows, the context span (start <= end, at most
    `max_answer_tokens` long) with the largest start + end logit."""
    best: List[Tuple[float, str]] = [(float("-inf"), "")] * len(contexts)
    for row, example in enumerate(features.example_index):
        spans = features.offsets[row]
        padding = [False] * (start_logits.shape[1] - len(spans))
        in_context = torch.tensor([span is not None for span in spans] + padding)
        starts = start_logits[row].float().masked_fill(~in_context, float("-inf"))
        ends = end_logits[row].float().masked_fill(~in_context, float("-inf"))
        scores = starts[:, None] + ends[None, :]  # [start, end]
        length = torch.arange(scores.shape[0])
        allowed = (length[None, :] >= length[:, None]) & (length[None, :] - length[:, None] < max_answer_tokens)
        scores = scores.masked_fill(~allowed, float("-inf"))
        score, flat = scores.flatten().max(dim=0)
        if score.item() > best[example][0]:
            start, end = divmod(int(flat), scores.shape[1])
            best[example] = (score.item(), span_text(contexts[example], spans, start, end))
    return [text for _, text in best]
