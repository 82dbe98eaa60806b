"""A fine-tuned head's metrics on a task's jsonl file: `mbloom-eval task=NAME` (any tp x pp; dp splits the rows).

The file is read in the task's format (bad lines skipped and counted), turned into fixed-length features,
run through the model in micro-batches, and scored: accuracy and macro F1 (sequence classification),
accuracy and tag F1 (token classification), exact match and F1 (question answering).
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from megatron_bloom.config import TrainConfig
from megatron_bloom.inference.pipeline import MicroBatch, from_last_stage, run_micro_batches
from megatron_bloom.model import TaskConfig
from megatron_bloom.parallel import ParallelState
from megatron_bloom.tasks.features import predicted_answers, task_features
from megatron_bloom.tasks.formats import LabelMap, read_task_file
from megatron_bloom.tasks.metrics import answer_metrics, classification_metrics, tag_metrics


def evaluate_task(model, task: TaskConfig, config: TrainConfig, state: ParallelState, tokenizer,
                  pad_id: int) -> dict:
    report = read_task_file(config.eval.input, task.name)
    examples, settings = report.examples, config.task
    labels = None
    if task.name != "question_answering":
        labels = LabelMap.for_head(examples, settings.labels, task, task.name)
    features = task_features(task.name, examples, tokenizer, labels, settings.max_length, settings.stride, pad_id)
    outputs = _run(model, features, config.eval.micro_batch_size, state)
    result = {"task": task.name, "examples": len(examples), "skipped": sum(report.skipped.values()),
              "skipped_by_reason": dict(report.skipped)}
    if task.name == "question_answering":
        start_logits, end_logits = outputs
        answers = predicted_answers(start_logits, end_logits, features, [example.context for example in examples],
                                    settings.max_answer_tokens)
        result.update(answer_metrics(answers, [example.answers for example in examples]))
    elif task.name == "sequence_classification":
        result["unknown_label"] = features.skipped
        result.update(classification_metrics(outputs[0].argmax(-1), features.labels, task.num_labels))
    else:
        result["unknown_label"] = features.skipped
        outside = labels.lookup("O")
        result.update(tag_metrics(outputs[0].argmax(-1), features.labels, outside))
    return result


@torch.no_grad()
def _run(model, features, micro_batch_size: int, state: ParallelState) -> List[torch.Tensor]:
    """The head's outputs for every feature row (logits, or start and end logits), on every rank: each
    data-parallel rank runs its share of the rows (through the pipeline's stages at pp > 1), then they are
    gathered."""
    rows = torch.arange(features.input_ids.shape[0])
    mine = rows[state.dp_rank:: state.dp]
    batches = (MicroBatch(features.input_ids[index], features.attention_mask[index])
               for index in (mine[start: start + micro_batch_size] for start in range(0, len(mine), micro_batch_size)))
    pieces: List[List[torch.Tensor]] = []
    for _, output in run_micro_batches(model, state, batches):
        logits = [output.start_logits, output.end_logits] if hasattr(output, "start_logits") else [output.logits]
        pieces.append([tensor.float().cpu() for tensor in logits])
    local = from_last_stage([torch.cat(parts) for parts in zip(*pieces)] if pieces else [], state)
    gathered = [(mine, local)]
    if state.dp > 1:
        gathered = [None] * state.dp
        dist.all_gather_object(gathered, (mine, local), group=state.dp_group)
    outputs = None
    for indices, tensors in gathered:
        if not len(indices):
            continue
        if outputs is None:
            outputs = [tensor.new_zeros((len(rows), *tensor.shape[1:])) for tensor in tensors]
        for output, tensor in zip(outputs, tensors):
            output[indices] = tensor
    return outputs
