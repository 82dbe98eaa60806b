"""What `mbloom-generate` does: prompts in, completions out, at any tp x pp x dp layout.

Prompts (`generate.prompt`, or the lines of `generate.input`) are tokenized without special tokens and
split into batches of `generate.batch_size`; data-parallel replicas take turns with the batches. A batch is
decoded by the whole model on each rank at pp = 1 (`generation.py`), or by pipelined decoding over the
stages at pp > 1 (`pipelined_generation.py`). Sampling draws each prompt's tokens from a generator seeded
by `generate.seed` and the prompt's index, so results do not depend on the layout or the batching.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Tuple

import torch
import torch.distributed as dist

from megatron_bloom.checkpoint.layout import PRECISION_DTYPES, read_metadata, resolve_checkpoint
from megatron_bloom.checkpoint.weights import load_model
from megatron_bloom.config import TrainConfig
from megatron_bloom.config.schema import GenerateConfig
from megatron_bloom.data.documents import SkipReport, read_jsonl_texts
from megatron_bloom.data.progress import Progress
from megatron_bloom.errors import UserError
from megatron_bloom.inference.generation import GenerationTimes, TextStream, generate_batch, prepare_for_inference
from megatron_bloom.inference.pipeline import from_last_stage, has_outputs
from megatron_bloom.inference.pipelined_generation import generate_batch_pipelined
from megatron_bloom.inference.tokenizer import command_tokenizer
from megatron_bloom.parallel import ParallelState


def read_prompts(config: GenerateConfig) -> List[str]:
    if config.prompt is not None and config.input is not None:
        raise UserError("give either generate.prompt or generate.input (a jsonl file of prompts), not both.")
    if config.input is None:
        return [config.prompt]
    report = SkipReport()
    prompts = list(read_jsonl_texts(config.input, "prompt", report))
    if report.total:
        print(f"mbloom-generate: skipped {report.total} lines of {config.input}: {report.summary()}", file=sys.stderr)
    if not prompts:
        raise UserError(f"{config.input} holds no line with a non-empty \"prompt\".")
    return prompts


def generate(config: TrainConfig, state: ParallelState) -> Tuple[List[dict], GenerationTimes]:
    """Every prompt's completion, in prompt order (on every rank), and the generation times (this data-
    parallel replica's, as its last stage measured them)."""
    if config.parallel.sequence_parallel:
        raise UserError("generation runs one position at a time: use parallel.sequence_parallel=false.")
    dtype = PRECISION_DTYPES[config.precision]
    directory = resolve_checkpoint(Path(config.checkpoint.load))
    tokenizer = command_tokenizer(config, directory, read_metadata(directory))  # before the model: fail fast
    model, metadata = load_model(directory, state, dtype, run_model=config.model,
                                 partition=config.parallel.pipeline_partition)
    decode_model = prepare_for_inference(model.model if state.pp > 1 else model, state, dtype,
                                         config.generate.batch_size, config.generate.quantize, config.generate.compile)
    texts = read_prompts(config.generate)
    prompts = [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]
    empty = [index for index, prompt in enumerate(prompts) if not prompt]
    if empty:
        raise UserError(f"prompt {empty[0] + 1} is empty after tokenization: give each prompt some text.")
    batch_size = config.generate.batch_size
    starts = range(state.dp_rank * batch_size, len(prompts), state.dp * batch_size)  # this rank's batches
    mine, times, new_tokens, done = [], GenerationTimes(), 0, 0
    # more than one batch: a bar or periodic lines on stderr, from the first rank (its share of the prompts;
    # at pp > 1 it is the first stage, which does not see the new tokens)
    progress = Progress(total=sum(len(prompts[start: start + batch_size]) for start in starts), unit="prompts",
                        label="mbloom-generate", enabled=state.is_first_rank and len(prompts) > batch_size)
    with progress:
        for start in starts:
            batch = prompts[start: start + batch_size]
            generators = [torch.Generator().manual_seed(config.generate.seed + index)
                          for index in range(start, start + len(batch))]
            stream = (TextStream(tokenizer, start, len(batch)) if config.generate.stream and state.tp_rank == 0
                      and has_outputs(state) else None)
            if state.pp > 1:  # the completions exist on the last stage; the first goes on with the next batch
                completions = generate_batch_pipelined(model, batch, metadata.model, config.generate, state,
                                                       generators, times, stream)
            else:
                completions = generate_batch(model, batch, metadata.model, config.generate, state, generators, times,
                                             stream, decode_model)
            if stream is not None:
                stream.close()
            for offset, tokens in enumerate(completions or []):
                mine.append({"index": start + offset, "prompt": texts[start + offset],
                             "completion": tokenizer.decode(tokens, skip_special_tokens=False), "token_ids": tokens})
                new_tokens += len(tokens)
            done += len(batch)
            progress.update(done, new_tokens)
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    by_index = {record["index"]: record for records in everyone for record in records}
    times = from_last_stage(times, state)
    return [{key: by_index[i][key] for key in ("prompt", "completion", "token_ids")} for i in sorted(by_index)], times
