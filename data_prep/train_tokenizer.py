"""A byte-level BPE tokenizer with BLOOM's special tokens, trained from corpora: `mbloom-train-tokenizer`.

Texts are streamed to the `tokenizers` trainer, so inputs larger than memory work (the trainer keeps only
its word counts). Writes DIR/tokenizer.json plus the files `transformers.AutoTokenizer` reads.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_prep.sources import Source, checked_records, iter_chunks, resolve_inputs
from megatron_bloom.data.documents import SkipReport, no_usable_documents
from megatron_bloom.errors import UserError

# BLOOM's special tokens, at these ids.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
BYTE_ALPHABET = 256


def iter_texts(sources: Sequence[Source], text_key: str, report: SkipReport) -> Iterator[str]:
    """The usable texts of the inputs, in order; bad records are counted in `report`."""
    for chunk in iter_chunks(sources, text_key, None):
        for where, text, _, reason in checked_records(chunk, text_key, None):
            if reason:
                report.skip(reason, where)
            else:
                yield text


def new_tokenizer() -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization): every byte is in the alphabet, so nothing is unknown."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(inputs: Sequence[str | Path], vocab_size: int, output: Path, text_key: str = "text") -> dict:
    """Train on `inputs` (paths, glob patterns or fsspec URLs, in order) and write `output/tokenizer.json`."""
    if vocab_size < len(SPECIAL_TOKENS) + BYTE_ALPHABET:
        raise UserError(f"--vocab-size must be at least {len(SPECIAL_TOKENS) + BYTE_ALPHABET} (the {BYTE_ALPHABET} "
                        f"byte symbols and {len(SPECIAL_TOKENS)} special tokens); got {vocab_size}.")
    sources = resolve_inputs(inputs)  # every input found before training starts
    report = SkipReport()
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=sys.stderr.isatty())
    start = time.perf_counter()
    counted = {"documents": 0}

    def texts() -> Iterator[str]:
        for text in iter_texts(sources, text_key, report):
            counted["documents"] += 1
            yield text

    tokenizer.train_from_iterator(texts(), trainer)
    if counted["documents"] == 0:
        raise no_usable_documents(report)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output / "tokenizer.json"))
    special = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (output / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (output / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
         "clean_up_tokenization_spaces": False, **special}, indent=2) + "\n")
    return {"documents": counted["documents"], "vocab_size": tokenizer.get_vocab_size(), "skipped": report,
            "seconds": time.perf_counter() - start}


if __name__ == "__main__":  # `python -m data_prep.train_tokenizer` is mbloom-train-tokenizer
    from megatron_bloom.cli.train_tokenizer import main

    main()
