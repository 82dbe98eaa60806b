"""The jsonl formats of the fine-tuning tasks, read and checked line by line.

    sequence_classification   {"text": "...", "label": "positive"}            (label: a name or an index)
    token_classification      {"tokens": ["Paris", "is", ...], "tags": ["B-LOC", "O", ...]}
    question_answering        {"context": "...", "question": "...",
                               "answers": {"text": ["..."], "answer_start": [17]}}   (SQuAD's layout)

A line that is not JSON, lacks a field, has a field of the wrong type, tags that do not match its tokens or
an answer that is not found at its `answer_start` is skipped and counted by reason; a file with no usable
line at all is an error. Label names are mapped to indices by a `LabelMap` (given, or the sorted names
of the training file).
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

from megatron_bloom.errors import UserError
from megatron_bloom.model.heads import TaskConfig

FORMATS = {
    "sequence_classification": '{"text": "...", "label": "..."}',
    "token_classification": '{"tokens": ["..."], "tags": ["..."]}',
    "question_answering": '{"context": "...", "question": "...", "answers": {"text": ["..."], "answer_start": [0]}}',
}


@dataclass
class TextExample:
    text: str
    label: Union[str, int]


@dataclass
class TaggedExample:
    tokens: List[str]
    tags: List[str]


@dataclass
class QuestionExample:
    context: str
    question: str
    answers: List[str]
    answer_starts: List[int]  # character offsets of the answers in the context
    id: str = ""


Example = Union[TextExample, TaggedExample, QuestionExample]


@dataclass
class ReadReport:
    """What was read from one file: the usable examples and the skipped lines by reason."""

    path: Path
    examples: List[Example] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        return f"{self.path}: {len(self.examples)} examples" + (f", skipped {reasons}" if reasons else "")


class _Skip(Exception):
    """A line that cannot be used; the message is the reason it is counted under."""


def read_task_file(path: Union[str, Path], task: str) -> ReadReport:
    """The examples of a task's jsonl file, bad lines skipped and counted."""
    if task not in FORMATS:
        raise UserError(f"no data format for task {task!r}; the fine-tuning tasks are {', '.join(FORMATS)}.")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task data {path} not found.")
    parse = {"sequence_classification": _text_example, "token_classification": _tagged_example,
             "question_answering": _question_example}[task]
    report = ReadReport(path)
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise _Skip("not a JSON object")
                example = parse(record)
                if isinstance(example, QuestionExample) and not example.id:
                    example.id = str(number)
                report.examples.append(example)
            except json.JSONDecodeError:
                report.skipped["not JSON"] += 1
            except _Skip as reason:
                report.skipped[str(reason)] += 1
    if not report.examples:
        raise UserError(f"{path} holds no usable {task} example ({report.summary()}); each line should be "
                        f"{FORMATS[task]}.")
    return report


def _field(record: dict, name: str, kind: type):
    if name not in record:
        raise _Skip(f"no '{name}'")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _Skip(f"'{name}' of the wrong type")
    return value


def _text_example(record: dict) -> TextExample:
    text = _field(record, "text", str)
    label = _field(record, "label", (str, int))
    if not text.strip():
        raise _Skip("empty 'text'")
    return TextExample(text, label)


def _tagged_example(record: dict) -> TaggedExample:
    tokens, tags = _field(record, "tokens", list), _field(record, "tags", list)
    if not tokens:
        raise _Skip("empty 'tokens'")
    if len(tokens) != len(tags):
        raise _Skip("'tags' not one per token")
    if not all(isinstance(item, str) and item.strip() for item in tokens + tags):
        raise _Skip("a token or tag that is not a non-empty string")
    return TaggedExample(tokens, tags)


def _question_example(record: dict) -> QuestionExample:
    context, question = _field(record, "context", str), _field(record, "question", str)
    answers = _field(record, "answers", dict)
    texts, starts = _field(answers, "text", list), _field(answers, "answer_start", list)
    if len(texts) != len(starts):
        raise _Skip("'answers' with as many texts as starts")
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
            raise _Skip("'answers' of the wrong type")
        if context[start:start + len(text)] != text:
            raise _Skip("an answer not found at its answer_start")
    identifier = record.get("id", "")
    return QuestionExample(context, question, texts, starts, str(identifier) if identifier is not None else "")


@dataclass
class LabelMap:
    """Label names in index order (what `task.labels` lists and the exported model's `id2label` holds)."""

    names: List[str]

    @classmethod
    def from_examples(cls, examples: Iterable[Example], given: Optional[Sequence[str]] = None) -> "LabelMap":
        """The given names, or the sorted distinct labels (or tags) of the examples. Integer labels of
        sequence classification are indices and need no names: they get "0", "1", ... up to the largest."""
        if given:
            if len(set(given)) != len(given):
                raise UserError(f"task.labels lists a label twice: {list(given)}.")
            return cls(list(given))
        seen = set()
        for example in examples:
            seen.update(example.tags if isinstance(example, TaggedExample) else [example.label])
        if all(isinstance(label, int) for label in seen):
            return cls([str(index) for index in range(max(seen) + 1)])
        return cls(sorted(str(label) for label in seen))

    @classmethod
    def for_head(cls, examples: Sequence[Example], given: Optional[Sequence[str]], head: Optional[TaskConfig],
                 task: str) -> "LabelMap":
        """The labels of a classification head: `given` (task.labels) if set; else an existing head's names
        (a checkpoint's `id2label`) when the data's labels are among them; else the data's sorted labels.
        An existing `head` must have one output per label; a new one (None) gets as many."""
        if given:
            labels = cls.from_examples(examples, given)
        else:
            labels = cls.from_examples(examples)
            if head is not None and head.labels and set(labels.names) <= set(head.labels):
                labels = cls(list(head.labels))
        if head is not None and len(labels.names) != head.num_labels:
            raise UserError(f"the checkpoint's {task} head has {head.num_labels} outputs but the labels are "
                            f"{labels.names}; name them in index order with task.labels=[...].")
        if head is None and len(labels.names) < 2:
            raise UserError(f"{task} needs at least two labels; the data has only {labels.names}.")
        return labels

    @functools.cached_property
    def index(self) -> Dict[str, int]:
        return {name: position for position, name in enumerate(self.names)}

    def lookup(self, label: Union[str, int]) -> Optional[int]:
        """The index of a label name (or an integer index in range); None for an unknown one."""
        if isinstance(label, int):
            return label if 0 <= label < len(self.names) else None
        return self.index.get(label)
