"""Checks a training config needs beyond its own fields: the files on disk. mbloom-launch runs them before it
starts any process, mbloom-train before it joins a process group."""

from __future__ import annotations

from pathlib import Path

from megatron_bloom.checkpoint.layout import check_same_shape, read_metadata, resolve_checkpoint
from megatron_bloom.config import TrainConfig
from megatron_bloom.data.builder import check_prefixes, parse_blend
from megatron_bloom.data.tokenizer import load_tokenizer
from megatron_bloom.errors import ConfigError, UserError
from megatron_bloom.tasks.training_data import check_task_data


def validate_training_inputs(config: TrainConfig) -> None:
    """Every data prefix's .bin and .idx exist; the tokenizer's vocabulary fits the model's; a checkpoint
    named by `checkpoint.load` exists, is complete and holds a model of this run's shape. Fine-tuning: the
    task's files are readable and a tokenizer is named. Every rank finds the same: each problem is a
    `ConfigError`, which rank 0 alone prints."""
    try:
        _validate(config)
    except ConfigError:
        raise
    except UserError as error:
        raise ConfigError(str(error)) from None


def _validate(config: TrainConfig) -> None:
    if config.checkpoint.load not in (None, "auto"):
        directory = resolve_checkpoint(Path(config.checkpoint.load), warn=False)  # the start says which it takes
        check_same_shape(read_metadata(directory), config.model, directory)
    tp = config.parallel.tp
    if config.parallel.sequence_parallel and config.sample_length % tp:
        key = "task.max_length" if config.fine_tuning else "model.seq_length"
        raise ConfigError(f"parallel.sequence_parallel=true splits each sample's {config.sample_length} tokens "
                          f"({key}) over parallel.tp={tp} ranks: make {key} a multiple of {tp}, or set "
                          "parallel.sequence_parallel=false.")
    if config.fine_tuning:  # fine-tuning reads the task's jsonl files, not data.paths
        check_task_data(config)
    else:
        prefixes, _ = parse_blend(config.data.paths, config.data.temperature)
        check_prefixes(prefixes)
    if config.data.tokenizer:
        vocab = load_tokenizer(config.data.tokenizer).get_vocab_size()
        if vocab > config.model.vocab_size:
            raise ConfigError(f"data.tokenizer {config.data.tokenizer} has {vocab} tokens, more than "
                              f"model.vocab_size ({config.model.vocab_size}): raise model.vocab_size or use a "
                              "smaller tokenizer.")
