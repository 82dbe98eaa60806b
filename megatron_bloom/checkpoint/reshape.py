"""`mbloom-convert reshape`: a checkpoint re-sliced for another tensor-parallel size, optimizer state kept.

A training checkpoint (DeepSpeed's files of any tp, pp, dp and ZeRO stage) or an earlier reshape becomes
a `universal` checkpoint (see `universal.py`) sliced for the new tp: weights exact, each parameter's fp32
master and Adam moments carried over, the iteration, data position and LR schedule kept, so a run of the
new layout continues training rather than restarting. It is read one source pipeline stage (or layer) at
a time, so memory holds one stage's state, not the model's. A weights-only checkpoint (from-hf) stays
weights-only. The new pp is recorded; any pipeline split loads the per-layer files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Set, Tuple

from megatron_bloom.checkpoint.deepspeed_optimizer import STATE_KEYS, read_optimizer_states
from megatron_bloom.checkpoint.layout import (
    PRECISION_DTYPES,
    TRAINING,
    UNIVERSAL,
    WEIGHTS,
    CheckpointMetadata,
    check_files_layout,
    checkpoint_tokenizer,
    publish_checkpoint,
    read_metadata,
    resolve_checkpoint,
    save_model_checkpoint,
    tag_for,
)
from megatron_bloom.checkpoint.universal import StateTensors, read_layers, write_layers
from megatron_bloom.checkpoint.weights import load_model_state_dict
from megatron_bloom.data.progress import Progress
from megatron_bloom.errors import UserError
from megatron_bloom.parallel.sharding import merge_state_dicts, split_for_ranks
from megatron_bloom.pipeline import names


def reshape_checkpoint(source: Path, output: Path, tp: int, pp: int) -> Path:
    """Write `source` (a checkpoint dir or root) re-sliced for `tp` ranks under `output`; returns its dir."""
    directory = resolve_checkpoint(source)
    metadata = read_metadata(directory)
    check_files_layout(metadata.model, tp, pp)
    tokenizer = checkpoint_tokenizer(directory, metadata)  # the reshaped checkpoint keeps a copy too
    if metadata.contents == WEIGHTS:
        _, full = load_model_state_dict(directory)
        target = dataclasses.replace(metadata, tp=tp, pp=pp, files={})
        return save_model_checkpoint(output, split_for_ranks(full, metadata.model, tp), target, tokenizer)

    target = dataclasses.replace(metadata, tp=tp, pp=pp, contents=UNIVERSAL, files={})
    weight_dtype = PRECISION_DTYPES[metadata.precision]

    prefixes = names.layer_prefixes(metadata.model, metadata.task.name)
    expected = {layer for layer, prefix in enumerate(prefixes) if prefix is not None}

    def write(staging: Path) -> None:
        written: Set[int] = set()
        with Progress(total=len(expected), unit="layers written", label="mbloom-convert reshape") as progress:
            for states, step in _source_chunks(directory, metadata):
                for name in list(states[STATE_KEYS[0]]):  # the tied embedding comes with the first and last stage
                    if names.layer_of(name, metadata.model)[0] in written:
                        for key in STATE_KEYS:
                            del states[key][name]
                written.update(write_layers(staging, states, step, metadata.model, tp, weight_dtype))
                progress.update(len(written))
        if written != expected:
            raise UserError(f"checkpoint {directory} holds optimizer state for layers {sorted(written)}, not "
                            f"for all of {sorted(expected)}.")

    return publish_checkpoint(output, tag_for(metadata.iteration), write, target, tokenizer)


def _source_chunks(directory: Path, metadata: CheckpointMetadata) -> Iterator[Tuple[StateTensors, int]]:
    """The source's full (single-process) optimizer state, one pipeline stage or layer at a time."""
    if metadata.contents == TRAINING:
        for stage in range(metadata.pp):
            per_rank = [read_optimizer_states(directory, metadata, stage, tp_rank) for tp_rank in range(metadata.tp)]
            yield ({key: merge_state_dicts([states.tensors[key] for states in per_rank], metadata.model)
                    for key in STATE_KEYS}, max(states.step for states in per_rank))
    elif metadata.contents == UNIVERSAL:
        for layer, prefix in enumerate(names.layer_prefixes(metadata.model, metadata.task.name)):
            if prefix is not None:
                yield read_layers(directory, metadata, [layer])
    else:
        raise UserError(f"checkpoint {directory} has contents {metadata.contents!r}, which reshape does not read.")
