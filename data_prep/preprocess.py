"""Corpora -> token shards in Megatron's MMIDIDX format (`PREFIX.bin` + `PREFIX.idx`): `mbloom-preprocess`.

With one task (the default), the main process reads the inputs in order and writes the shards; `--workers`
processes parse and tokenize chunks of records with the Rust batch encoder. Results are written in input
order whatever the number of workers. With `--tasks N`, `--executor slurm` or `--dedup`, the work is a job of
tasks on datatrove's executors (`distributed`) that writes the same shards. Bad records are skipped and
counted by reason (`--strict`: the first one is an error). Shards are written under temporary names and
renamed when complete.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections import deque
from pathlib import Path
from typing import List

import numpy as np

from data_prep.encoding import EncodedChunk, EncoderSettings, encode_chunk
from data_prep.options import EOD_TOKEN, PreprocessOptions
from data_prep.shards import ShardSet, language_key, write_json
from data_prep.sources import Source, iter_chunks, resolve_inputs
from megatron_bloom.data.documents import SkipReport, no_usable_documents
from megatron_bloom.data.indexed_dataset import token_dtype
from megatron_bloom.data.progress import Progress
from megatron_bloom.data.tokenizer import load_tokenizer, tokenizer_file
from megatron_bloom.errors import UserError

def preprocess(options: PreprocessOptions) -> dict:
    """Tokenize the inputs into shards; returns the summary also written to PREFIX.stats.json."""
    from data_prep.distributed import check_job_options, run_job

    if options.workers < 1:
        raise UserError(f"--workers must be at least 1, got {options.workers}.")
    check_job_options(options)
    sources = resolve_inputs(options.input)
    encoder = encoder_settings(options)
    start = time.perf_counter()
    if options.as_job:
        result = run_job(options, sources, encoder)
        documents, tokens, report, outputs = result.documents, result.tokens, result.report, result.outputs
        details = {"tasks": options.tasks, "executor": options.executor, "task_seconds": result.task_seconds}
    else:
        documents, tokens, report, outputs = tokenize_in_order(options, sources, encoder)
        details = {"tasks": 1, "workers": options.workers}
    if documents == 0:
        raise no_usable_documents(report)
    seconds = time.perf_counter() - start
    stats = {
        "documents": documents, "tokens": tokens, "skipped_total": report.total, "skipped": report.as_dict(),
        "seconds": round(seconds, 3), "documents_per_s": round(documents / seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1), "dtype": encoder.dtype, **details, "dedup": options.dedup,
        "duplicates_removed": sum(output["duplicates_removed"] for output in outputs.values()),
        "append_eod": bool(options.append_eod), "inputs": [source.name for source in sources],
        "tokenizer": encoder.tokenizer, "outputs": outputs,
    }
    write_json(Path(options.output_prefix + ".stats.json"), stats)
    return stats


def encoder_settings(options: PreprocessOptions) -> EncoderSettings:
    tokenizer = load_tokenizer(options.tokenizer)
    eod_id = tokenizer.token_to_id(EOD_TOKEN) if options.append_eod else None
    if options.append_eod and eod_id is None:
        raise UserError(f"--append-eod: the tokenizer {options.tokenizer} has no {EOD_TOKEN} token.")
    return EncoderSettings(tokenizer=str(tokenizer_file(options.tokenizer)), text_key=options.text_key,
                           lang_key=options.lang_key if options.split_by_lang else None, eod_id=eod_id,
                           dtype=np.dtype(token_dtype(tokenizer.get_vocab_size())).name)


def tokenize_in_order(options: PreprocessOptions, sources: List[Source], settings: EncoderSettings):
    """One process reads the inputs in order and writes the shards; `options.workers` processes tokenize."""
    shards = ShardSet(options.output_prefix, settings.dtype, options.split_by_lang)
    report = SkipReport(strict=options.strict)
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
                    report.skip(reason, where)
                shards.add(result)
                documents += int(result.lengths.size)
                tokens += int(result.lengths.sum())
                progress.update(documents, tokens)
        shards.finalize() if documents else shards.abort()  # no documents: an error, below
    except BaseException:
        shards.abort()
        raise
    outputs = {language_key(language): {
        "prefix": writer.prefix, "documents": writer.documents, "tokens": writer.tokens, "duplicates_removed": 0}
        for language, writer in shards.writers.items()}
    return documents, tokens, report, outputs


def print_summary(stats: dict) -> None:
    print(f"documents: {stats['documents']:,}  tokens: {stats['tokens']:,}  seconds: {stats['seconds']:.2f}  "
          f"tokens/s: {stats['tokens_per_s']:,.0f}  documents/s: {stats['documents_per_s']:,.0f}")
    for reason, entry in stats["skipped"].items():
        print(f"skipped {entry['count']:,} ({reason}), first at {', '.join(entry['first_lines'])}")
    if stats["dedup"] != "none":
        print(f"removed {stats['duplicates_removed']:,} duplicates ({stats['dedup']})")
    for name, output in stats["outputs"].items():
        print(f"wrote {output['prefix']}.bin/.idx: {output['documents']:,} documents, {output['tokens']:,} tokens")


if __name__ == "__main__":  # `python -m data_prep.preprocess` is mbloom-preprocess
    from megatron_bloom.cli.preprocess import main

    main()
