"""Corpora -> token shards in Megatron's MMIDIDX format (`PREFIX.bin` + `PREFIX.idx`): `mbloom-preprocess`.

The main process reads the inputs in order and writes the shards; `--workers` processes parse and
tokenize chunks of records with the Rust batch encoder. Results are written in input order whatever the
number of workers. Bad records are skipped and counted by reason (`--strict`: the first one is an error).
Shards are written under temporary names and renamed when complete.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from data_prep.encoding import EncodedChunk, EncoderSettings, encode_chunk, split_by_language
from megatron_bloom.data.progress import Progress
from data_prep.sources import iter_chunks, resolve_inputs
from megatron_bloom.data.documents import SkipReport
from megatron_bloom.data.indexed_dataset import IndexedDatasetWriter, token_dtype
from megatron_bloom.data.tokenizer import load_tokenizer, tokenizer_file
from megatron_bloom.errors import UserError

EOD_TOKEN = "</s>"


@dataclass
class PreprocessOptions:
    """What `mbloom-preprocess` is asked to do (its flags)."""

    input: List[str]  # jsonl, jsonl.gz or parquet files, or saved `datasets` dirs, in order: paths, globs, URLs
    tokenizer: Path  # a tokenizer.json or a directory holding one
    output_prefix: str  # writes PREFIX.bin, PREFIX.idx, PREFIX.stats.json
    workers: int = 1
    text_key: str = "text"
    lang_key: str = "lang"
    split_by_lang: bool = False  # one PREFIX_<lang> shard per language
    append_eod: bool = False  # end every document with EOD_TOKEN
    strict: bool = False  # stop at the first bad record


class ShardSet:
    """The writers of one run: a single shard, or one per language (created as languages appear)."""

    def __init__(self, prefix: str, dtype, split_by_lang: bool) -> None:
        self.prefix, self.dtype, self.split_by_lang = prefix, dtype, split_by_lang
        self.writers: Dict[Optional[str], IndexedDatasetWriter] = {}

    def add(self, chunk: EncodedChunk) -> None:
        groups = split_by_language(chunk) if self.split_by_lang else {None: (chunk.tokens, chunk.lengths)}
        for language, (tokens, lengths) in groups.items():
            self._writer(language).add_documents(tokens, lengths)

    def _writer(self, language: Optional[str]) -> IndexedDatasetWriter:
        if language not in self.writers:
            prefix = self.prefix if language is None else f"{self.prefix}_{safe_name(language)}"
            self.writers[language] = IndexedDatasetWriter(prefix, self.dtype)
        return self.writers[language]

    def finalize(self) -> None:
        for writer in self.writers.values():
            writer.finalize()

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


def safe_name(language: str) -> str:
    """A language code usable in a file name (other characters become '_')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", language)


def preprocess(options: PreprocessOptions) -> dict:
    """Tokenize the inputs into shards; returns the summary also written to PREFIX.stats.json."""
    if options.workers < 1:
        raise UserError(f"--workers must be at least 1, got {options.workers}.")
    sources = resolve_inputs(options.input)
    tokenizer = load_tokenizer(options.tokenizer)
    eod_id = tokenizer.token_to_id(EOD_TOKEN) if options.append_eod else None
    if options.append_eod and eod_id is None:
        raise UserError(f"--append-eod: the tokenizer {options.tokenizer} has no {EOD_TOKEN} token.")
    dtype = token_dtype(tokenizer.get_vocab_size())
    settings = EncoderSettings(tokenizer=str(tokenizer_file(options.tokenizer)), text_key=options.text_key,
                               lang_key=options.lang_key if options.split_by_lang else None, eod_id=eod_id,
                               dtype=dtype.__name__)
    shards = ShardSet(options.output_prefix, dtype, options.split_by_lang)
    report = SkipReport()
    start = time.perf_counter()
    documents = tokens = 0
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    try:
        with context.Pool(options.workers) as pool, Progress() as progress:
            in_flight: deque = deque()
            chunks = iter_chunks(sources, options.text_key, settings.lang_key)
            while True:
                # Keep a few chunks per worker queued: enough to stay busy, bounded for inputs larger than memory.
                while len(in_flight) < 3 * options.workers:
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
                    in_flight.append(pool.apply_async(encode_chunk, (chunk, settings)))
                if not in_flight:
                    break
                result: EncodedChunk = in_flight.popleft().get()
                for reason, where in result.skipped:
                    if options.strict:
                        raise UserError(f"{where}: {reason} (--strict stops at the first bad record).")
                    report.skip(reason, where)
                shards.add(result)
                documents += int(result.lengths.size)
                tokens += int(result.lengths.sum())
                progress.update(documents, tokens)
        if documents == 0:
            raise UserError("no usable documents in the input" + (f"; skipped {report.summary()}" if report.total
                                                                   else "") + ".")
        shards.finalize()
    except BaseException:
        shards.abort()
        raise
    seconds = time.perf_counter() - start
    stats = {
        "documents": documents, "tokens": tokens, "skipped_total": report.total, "skipped": report.as_dict(),
        "seconds": round(seconds, 3), "documents_per_s": round(documents / seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1), "dtype": dtype.__name__, "workers": options.workers,
        "append_eod": bool(options.append_eod), "inputs": [source.name for source in sources],
        "tokenizer": settings.tokenizer,
        "outputs": {(language or "all"): {"prefix": writer.prefix, "documents": writer.documents,
                                          "tokens": writer.tokens}
                    for language, writer in shards.writers.items()},
    }
    stats_path = Path(options.output_prefix + ".stats.json")
    temporary = stats_path.with_name(stats_path.name + ".tmp")
    temporary.write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    os.replace(temporary, stats_path)
    return stats


def print_summary(stats: dict) -> None:
    print(f"documents: {stats['documents']:,}  tokens: {stats['tokens']:,}  seconds: {stats['seconds']:.2f}  "
          f"tokens/s: {stats['tokens_per_s']:,.0f}  documents/s: {stats['documents_per_s']:,.0f}")
    for reason, entry in stats["skipped"].items():
        print(f"skipped {entry['count']:,} ({reason}), first at {', '.join(entry['first_lines'])}")
    for name, output in stats["outputs"].items():
        print(f"wrote {output['prefix']}.bin/.idx: {output['documents']:,} documents, {output['tokens']:,} tokens")


if __name__ == "__main__":  # `python -m data_prep.preprocess` is mbloom-preprocess
    from megatron_bloom.cli.preprocess import main

    main()
