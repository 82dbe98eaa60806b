"""A fine-tuning head as the last pipeline layer, and its loss (what the last stage computes).

The head is the task model's own module (`score`, `classifier` with its dropout, or `qa_outputs`, as in
`transformers`), replicated on every tensor-parallel rank: it reads the final hidden states, which every
rank holds whole, so each rank computes the same logits and the same head gradient with no collective
(Megatron-LM's classification heads do the same). Its weights keep their single-process names.

The labels a loss receives come from the task's data (`megatron_bloom.tasks.training_data`):
* sequence classification: (class index [b], index of the last real token [b]): the head scores every
  position and the loss pools the last real one, as `BloomForSequenceClassification` does;
* token classification: tags [b, s], -100 where not scored;
* question answering: [b, 2] answer start and end positions.
"""

from __future__ import annotations

from typing import Dict, Tuple, Union

import torch
from torch import nn

from megatron_bloom.model.config import ModelConfig
from megatron_bloom.model.heads import (
    TASK_HEAD_NAMES,
    TaskConfig,
    question_answering_loss,
    sequence_classification_loss,
    token_classification_loss,
)
from megatron_bloom.model.init import create_task_model, meta_device
from megatron_bloom.parallel.parallelize import materialize, sequence_gathered_head
from megatron_bloom.parallel.state import ParallelState
from megatron_bloom.pipeline import names
from megatron_bloom.pipeline.layers import Activations, split_activations


class TaskHeadPipe(nn.Module):
    """hidden states [b, s, h] (with sequence parallelism [b, s / tp, h]) -> per-position logits [b, s, outputs]
    of the task's head."""

    model_prefix = names.HEAD  # the head's weights are top-level in the single-process model (`score.weight`)

    def __init__(self, config: ModelConfig, state: ParallelState, shapes: Dict, seed: int, task: TaskConfig,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        self.head_name = TASK_HEAD_NAMES[task.name]
        with meta_device():
            task_model = create_task_model(config, task)  # on meta: nothing allocated, only its head is kept
            head = getattr(task_model, self.head_name)
            if sequence_parallel:  # it reads the whole sequence: gathered from the tp ranks' shards first
                head = sequence_gathered_head(head, state.tp_comm)
        self.add_module(self.head_name, head)
        self.dropout = getattr(task_model, "dropout", nn.Identity())  # token classification's classifier dropout
        materialize(self, config, state, shapes, seed, prefix=self.model_prefix)

    def forward(self, inputs: Activations) -> torch.Tensor:
        hidden_states, _ = split_activations(inputs)
        return getattr(self, self.head_name)(self.dropout(hidden_states))


class TaskLoss(nn.Module):
    """The task's loss of per-position logits against the labels of one micro-batch (see the module doc)."""

    def __init__(self, task: TaskConfig) -> None:
        super().__init__()
        self.task = task

    def forward(self, logits: torch.Tensor, labels: Union[torch.Tensor, Tuple[torch.Tensor, ...]]) -> torch.Tensor:
        logits = logits.float()
        name = self.task.name
        if name == "sequence_classification":
            targets, last_token = labels
            pooled = logits[torch.arange(logits.shape[0], device=logits.device), last_token]
            return sequence_classification_loss(pooled, targets, self.task.num_labels, self.task.problem_type)
        if name == "token_classification":
            return token_classification_loss(logits, labels)
        start_logits, end_logits = logits.unbind(-1)
        return question_answering_loss(start_logits, end_logits, labels[:, 0], labels[:, 1])
