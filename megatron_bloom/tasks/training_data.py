"""Fine-tuning data: a task's jsonl files as the micro-batches `mbloom-train task=NAME` reads.

Each example becomes fixed-length features (`features.py`); training reads them epoch after epoch, every
epoch in its own order (a permutation seeded by the run seed and the epoch), so sample i of the run is
always the same example and a resumed run, which knows only how many samples it consumed, reads exactly
the next batch (the pre-training sampler serves both). A micro-batch is ((token ids, attention mask),
labels) with the labels the task's loss takes (`pipeline.task_head`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from megatron_bloom.config import TrainConfig
from megatron_bloom.data.sampler import PretrainingSampler
from megatron_bloom.data.skips import SkippedSamples
from megatron_bloom.data.tokenizer import load_tokenizer
from megatron_bloom.errors import ConfigError, UserError
from megatron_bloom.model import TaskConfig
from megatron_bloom.model.heads import last_token_index
from megatron_bloom.tasks.features import Features, task_features
from megatron_bloom.tasks.formats import LabelMap, read_task_file


class TaskSamples(Dataset):
    """`total` samples from a task's features: epoch e visits every feature once, in a shuffled order."""

    def __init__(self, features: Features, task: str, total: int, seed: int, pad_token_id: Optional[int]) -> None:
        self.features, self.task, self.total, self.seed = features, task, total, seed
        self.rows = features.input_ids.shape[0]
        self.last_token = last_token_index(features.input_ids, pad_token_id)
        self._epoch, self._order = -1, np.arange(0)

    def __len__(self) -> int:
        return self.total

    def row(self, index: int) -> int:
        epoch, position = divmod(index, self.rows)
        if epoch != self._epoch:  # samples are read in order, so one permutation is kept at a time
            self._epoch, self._order = epoch, np.random.RandomState((self.seed, epoch)).permutation(self.rows)
        return int(self._order[position])

    def __getitem__(self, index: int):
        row = self.row(index)
        inputs = (self.features.input_ids[row], self.features.attention_mask[row])
        labels = self.features.labels[row]
        if self.task == "sequence_classification":
            return inputs, (labels, self.last_token[row])
        return inputs, labels


def collate_task_samples(samples: List) -> Tuple:
    """Samples -> ((ids [b, s], mask [b, s]), labels), the labels stacked in the same structure (tuples:
    what the pipeline layers and DeepSpeed's pipeline engine take apart)."""
    def stack(parts):
        return tuple(stack(group) for group in zip(*parts)) if isinstance(parts[0], tuple) else torch.stack(parts)

    return stack(samples)


@dataclass
class TaskData:
    task: TaskConfig  # the head to train: name, number of outputs, label names
    train: TaskSamples
    valid: Optional[TaskSamples]


def build_task_data(config: TrainConfig, samples: Tuple[int, int], head: Optional[TaskConfig],
                    report_to_stderr: bool) -> TaskData:
    """The head and its training / validation samples (`samples`: how many of each the run reads) from
    `task.train` / `task.valid`. `head` is the starting checkpoint's head of the same task, if any: its
    labels are kept and its number of outputs must match."""
    settings = config.task
    tokenizer = load_tokenizer(config.data.tokenizer)
    pad_id = config.model.pad_token_id if config.model.pad_token_id is not None else 0
    train_report = read_task_file(settings.train, settings.name)
    task = TaskConfig(name=settings.name)
    labels = None
    if head is not None and head.problem_type not in (None, "single_label_classification"):
        raise UserError(f"the checkpoint's {head.name} head is for {head.problem_type}; fine-tuning trains "
                        "single-label classification (one label a line): start from a checkpoint without that head.")
    if settings.name != "question_answering":
        labels = LabelMap.for_head(train_report.examples, settings.labels, head, settings.name)
        task = replace(task, num_labels=len(labels.names), labels=labels.names,
                       problem_type=head.problem_type if head is not None else None)

    def features_of(report) -> Features:
        return task_features(settings.name, report.examples, tokenizer, labels, settings.max_length,
                             settings.stride, pad_id)

    splits = [TaskSamples(features_of(train_report), settings.name, samples[0], config.train.seed,
                          config.model.pad_token_id)]
    reports = [train_report]
    if settings.valid is not None and samples[1] > 0:
        reports.append(read_task_file(settings.valid, settings.name))
        splits.append(TaskSamples(features_of(reports[-1]), settings.name, samples[1], config.train.seed + 1,
                                  config.model.pad_token_id))
    if report_to_stderr:
        for report, split in zip(reports, splits):
            unknown = split.features.skipped
            print(f"{settings.name} data {report.summary()}" + (f", {unknown} with unknown labels" if unknown else "")
                  + f": {split.rows} features of {settings.max_length} tokens", file=sys.stderr, flush=True)
    return TaskData(task, splits[0], splits[1] if len(splits) > 1 else None)


def build_task_loader(samples: TaskSamples, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                      dp_size: int, skipped: Optional[SkippedSamples] = None) -> DataLoader:
    """Micro-batches of this data-parallel rank from `consumed_samples` on (the pre-training sampler)."""
    sampler = PretrainingSampler(len(samples), consumed_samples, micro_batch_size, dp_rank, dp_size, skipped)
    return DataLoader(samples, batch_sampler=sampler, num_workers=0, collate_fn=collate_task_samples)


def check_task_data(config: TrainConfig) -> None:
    """Before any process starts: a fine-tuning run names its files and a tokenizer."""
    settings = config.task
    if settings.train is None:
        raise ConfigError(f"task={settings.name} trains on task.train=PATH.jsonl (one example a line); it is not "
                        "set.")
    if not config.data.tokenizer:
        raise ConfigError(f"task={settings.name} tokenizes task.train with data.tokenizer=TOK (a tokenizer.json or "
                        "a directory holding one); it is not set.")
    for key in ("train", "valid"):
        path = getattr(settings, key)
        if path is not None:
            read_task_file(path, settings.name)  # missing file, or not one usable line: a clear error now
