"""Loss and perplexity of a checkpoint on a jsonl file, at any tp x pp x dp layout (`mbloom-eval`).

Each document's `text` is tokenized without special tokens and cut to `eval.seq_length` (default: the
model's); loss = summed next-token negative log-likelihood over all documents / number of predicted
tokens. Data-parallel ranks split the documents; at pp > 1 the micro-batches flow through the stages
(`pipeline.py`) and the sums come from the last one. A checkpoint with a fine-tuning head is evaluated on
`eval.input` in that task's format instead, with the task's metrics (`task_evaluation.py`).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Iterator, List, Sequence

import torch
import torch.distributed as dist

from megatron_bloom.checkpoint.layout import PRECISION_DTYPES, read_metadata, resolve_checkpoint
from megatron_bloom.checkpoint.weights import load_model
from megatron_bloom.config import TrainConfig
from megatron_bloom.data.documents import SkipReport, read_jsonl_texts
from megatron_bloom.data.padding import padded_batch
from megatron_bloom.data.progress import Progress
from megatron_bloom.errors import UserError
from megatron_bloom.inference.pipeline import MicroBatch, from_last_stage, run_micro_batches
from megatron_bloom.inference.task_evaluation import evaluate_task
from megatron_bloom.inference.tokenizer import command_tokenizer
from megatron_bloom.model.heads import IGNORE_INDEX
from megatron_bloom.parallel import ParallelState


def pad_batch(documents: Sequence[List[int]], pad_id: int, multiple_of: int = 1):
    """Right-padded ids, the 0/1 attention mask, and labels with -100 on padding."""
    length = max(len(doc) for doc in documents)
    input_ids, mask = padded_batch(documents, pad_id, -(-length // multiple_of) * multiple_of)
    return input_ids, mask, input_ids.masked_fill(mask == 0, IGNORE_INDEX)


def predicted_tokens(labels: torch.Tensor) -> int:
    """The positions whose next token is scored: every label after the first that is not padding."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def evaluate(config: TrainConfig, state: ParallelState) -> dict:
    """The JSON result `mbloom-eval` prints: loss, perplexity, tokens, documents and skipped lines of the
    language model, or the task's metrics for a checkpoint with a fine-tuning head."""
    sequence_parallel = config.parallel.sequence_parallel
    directory = resolve_checkpoint(Path(config.checkpoint.load))
    tokenizer = command_tokenizer(config, directory, read_metadata(directory))  # before the model: fail fast
    model, metadata = load_model(directory, state, PRECISION_DTYPES[config.precision], sequence_parallel,
                                 run_model=config.model, partition=config.parallel.pipeline_partition)
    model.eval()
    pad_id = metadata.model.pad_token_id if metadata.model.pad_token_id is not None else 0
    if config.task.name not in ("causal_lm", metadata.task.name):  # causal_lm, the default, takes any checkpoint
        raise UserError(f"task={config.task.name}, but {config.checkpoint.load} holds a {metadata.task.name} model.")
    if metadata.task.name != "causal_lm":  # a fine-tuned head: the task's data and metrics
        return evaluate_task(model, metadata.task, config, state, tokenizer, pad_id)
    seq_length = config.eval.seq_length or metadata.model.seq_length
    report = SkipReport()
    texts = list(read_jsonl_texts(config.eval.input, "text", report))
    if not texts:
        raise UserError(f"{config.eval.input} holds no documents with a non-empty \"text\"."
                        + (f" Skipped: {report.summary()}." if report.total else ""))
    if report.total and state.is_first_rank:
        print(f"mbloom-eval: skipped {report.total} lines of {config.eval.input}: {report.summary()}",
              file=sys.stderr)
    mine = texts[state.dp_rank:: state.dp]
    documents = [encoding.ids[:seq_length] for encoding in tokenizer.encode_batch(mine, add_special_tokens=False)]
    micro = config.eval.micro_batch_size
    progress = Progress(total=len(documents), enabled=state.is_first_rank, label="mbloom-eval (rank 0's share)"
                        if state.dp > 1 else "mbloom-eval")

    def micro_batches() -> Iterator[MicroBatch]:
        predicted = 0
        for start in range(0, len(documents), micro):
            progress.update(start, predicted)
            input_ids, mask, labels = pad_batch(documents[start: start + micro], pad_id,
                                                state.tp if sequence_parallel else 1)
            count = predicted_tokens(labels)
            if count:  # one-token documents predict nothing
                predicted += count
                yield MicroBatch(input_ids, mask, {"labels": labels})
        progress.update(len(documents), predicted)

    nll_sum, predicted = 0.0, 0
    with torch.no_grad(), progress:
        for batch, output in run_micro_batches(model, state, micro_batches()):
            count = predicted_tokens(batch.head_arguments["labels"])
            nll_sum += output.loss.double().item() * count
            predicted += count
    # on the device: NCCL groups reduce device tensors only
    totals = from_last_stage(torch.tensor([nll_sum, predicted, len(mine)], dtype=torch.float64, device=state.device),
                             state)
    if state.dp > 1:
        dist.all_reduce(totals, group=state.dp_group)
    nll_sum, predicted, documents_seen = totals.tolist()
    if predicted == 0:
        raise UserError(f"no document of {config.eval.input} has two or more tokens: there is nothing to predict.")
    loss = nll_sum / predicted
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(predicted),
            "documents": int(documents_seen), "skipped": report.total}
