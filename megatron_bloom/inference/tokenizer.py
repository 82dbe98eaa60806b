"""The tokenizer of `mbloom-eval` and `mbloom-generate`: the copy the checkpoint keeps, or one given by hand
(`eval.tokenizer`) that has the same vocabulary. A tokenizer with other ids would feed the model words it
was not trained on and still give a loss, so it is refused unless forced (`eval.force_tokenizer`)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from megatron_bloom.checkpoint.layout import CheckpointMetadata, checkpoint_tokenizer
from megatron_bloom.config import TrainConfig
from megatron_bloom.data.tokenizer import load_tokenizer, vocabulary_difference
from megatron_bloom.errors import UserError


def command_tokenizer(config: TrainConfig, directory: Path, metadata: CheckpointMetadata) -> Tokenizer:
    """The tokenizer for checkpoint `directory`, checked against the checkpoint's own and its vocabulary size."""
    own, given = checkpoint_tokenizer(directory, metadata), config.eval.tokenizer
    if given is None:
        if own is None:
            gone = f" (the one it recorded, {metadata.tokenizer}, is gone)" if metadata.tokenizer else ""
            raise UserError(f"checkpoint {directory} keeps no tokenizer{gone}: give the one it was trained with, "
                            "eval.tokenizer=TOK (a tokenizer.json or its directory).")
        tokenizer, name = load_tokenizer(own), str(own)
    else:
        tokenizer, name = load_tokenizer(given), given
        difference = vocabulary_difference(tokenizer, load_tokenizer(own)) if own is not None else None
        if difference is not None and not config.eval.force_tokenizer:
            raise UserError(f"eval.tokenizer={given} is not the tokenizer checkpoint {directory} was trained with "
                            f"(its copy: {own}): {difference}. The model would read other words than it learned. "
                            "Leave eval.tokenizer out to use the checkpoint's own, or set "
                            "eval.force_tokenizer=true to use this one anyway.")
    if tokenizer.get_vocab_size() > metadata.model.vocab_size:
        raise UserError(f"the tokenizer {name} has {tokenizer.get_vocab_size()} tokens, more than the model's "
                        f"vocabulary ({metadata.model.vocab_size}).")
    return tokenizer
