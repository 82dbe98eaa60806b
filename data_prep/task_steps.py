"""The work of one task of a preprocessing job, as datatrove pipeline steps (run by datatrove's executors).

`ReadDocuments` yields a task's documents as datatrove `Document`s, for the deduplication stages that read
them (signatures, then the filter). `TokenizeParts` tokenizes a task's parts into its own MMIDIDX part shard
(`parts/NNNNN`, or `parts/NNNNN_<lang>` with --split-by-lang) and writes what it did to `parts/NNNNN.json`:
documents, tokens, skipped records, duplicates removed. The job's last step merges the parts in task order.

A task's documents are numbered the same way in every stage (its good records, in input order), which is
what datatrove's deduplication filters rely on to find the documents their earlier stages chose.

A mistake in the data (`--strict`, a parquet file without the text column) does not fail the task: the task
records it in `errors/NNNNN.json` and ends, so that every task ends and the job reports the mistake that comes
first in input order, as one process reading the inputs in order would.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from data_prep.encoding import EncoderSettings, encode_chunk, encode_texts
from data_prep.shards import ShardSet, language_key, write_json
from data_prep.sources import CHUNK_RECORDS, Part, checked_records, iter_part_chunks
from megatron_bloom.data.documents import SkipReport
from megatron_bloom.errors import UserError


@dataclass(frozen=True)
class TaskSettings:
    """What every task of a job is given: its parts (by task), how to read and tokenize, and where to write."""

    plan: Sequence[Sequence[Part]]  # the parts of each task, in input order
    encoder: EncoderSettings
    dtype: str
    split_by_lang: bool
    strict: bool
    work_dir: str  # PREFIX.tasks

    def part_prefix(self, rank: int) -> str:
        return f"{self.work_dir}/parts/{rank:05d}"

    def error_path(self, rank: int) -> Path:
        return Path(self.work_dir) / "errors" / f"{rank:05d}.json"


def task_documents(settings: TaskSettings, rank: int, report: SkipReport, read: Counter) -> Iterator[Document]:
    """The task's good records as `Document`s, in input order (id: "file:line"; metadata: the task, and the
    language with --split-by-lang, else None). Bad records go to `report` (a strict one raises a `UserError` at
    the first); `read` counts the documents yielded, by language."""
    for chunk in iter_part_chunks(settings.plan[rank], settings.encoder.text_key, settings.encoder.lang_key):
        for where, text, language, reason in checked_records(chunk, settings.encoder.text_key,
                                                              settings.encoder.lang_key):
            if reason:
                report.skip(reason, where)  # --strict: a UserError
                continue
            read[language] += 1
            yield Document(text=text, id=where, metadata={"task": rank, "lang": language})


class ReadDocuments(PipelineStep):
    """The first step of a deduplication stage that reads the inputs: the task's documents."""

    name = "read the task's parts"
    type = "mbloom"

    def __init__(self, settings: TaskSettings) -> None:
        super().__init__()
        self.settings = settings

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        try:
            yield from task_documents(self.settings, rank, SkipReport(strict=self.settings.strict), Counter())
        except UserError:
            return  # the tokenizing stage meets the same mistake, records it, and the job reports it


class TokenizeParts(PipelineStep):
    """Tokenize the task's parts into its part shard(s), after `dedup_filter` (a datatrove filter step that
    drops the duplicates found by the earlier stages) when one is given."""

    name = "tokenize the task's parts"
    type = "mbloom"

    def __init__(self, settings: TaskSettings, dedup_filter: Optional[PipelineStep] = None) -> None:
        super().__init__()
        self.settings, self.dedup_filter = settings, dedup_filter

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> None:
        settings = self.settings
        error_path = settings.error_path(rank)
        error_path.unlink(missing_ok=True)
        start = time.perf_counter()
        shards = ShardSet(settings.part_prefix(rank), settings.dtype, settings.split_by_lang)
        report, read, kept = SkipReport(strict=settings.strict), Counter(), Counter()
        try:
            if self.dedup_filter is None:
                self._tokenize_chunks(rank, shards, report, read)
                kept = read
            else:
                self._tokenize_kept(rank, shards, report, read, kept)
            shards.finalize()
        except UserError as error:
            shards.abort()
            write_json(error_path, {"message": str(error)})
            return
        except BaseException:
            shards.abort()
            raise
        write_json(Path(settings.part_prefix(rank) + ".json"), {
            "documents": sum(kept.values()), "tokens": sum(writer.tokens for writer in shards.writers.values()),
            "skipped": report.as_dict(), "seconds": round(time.perf_counter() - start, 3),
            "duplicates_removed": {language_key(language): read[language] - kept[language] for language in read},
            "outputs": {language_key(language): {"prefix": writer.prefix, "documents": writer.documents,
                                                 "tokens": writer.tokens}
                        for language, writer in shards.writers.items()},
        })

    def _tokenize_chunks(self, rank: int, shards: ShardSet, report: SkipReport, read: Counter) -> None:
        """Without deduplication: chunks of raw records, parsed and tokenized as one process's workers do."""
        settings = self.settings
        for chunk in iter_part_chunks(settings.plan[rank], settings.encoder.text_key, settings.encoder.lang_key):
            result = encode_chunk(chunk, settings.encoder)
            for reason, where in result.skipped:
                report.skip(reason, where)
            shards.add(result)
            read.update(result.languages if result.languages is not None else [None] * len(result.lengths))

    def _tokenize_kept(self, rank: int, shards: ShardSet, report: SkipReport, read: Counter,
                       kept: Counter) -> None:
        documents = task_documents(self.settings, rank, report, read)
        texts: List[str] = []
        languages: List[Optional[str]] = []
        for document in self.dedup_filter.run(documents, rank, len(self.settings.plan)):
            texts.append(document.text)
            languages.append(document.metadata.get("lang"))
            if len(texts) == CHUNK_RECORDS:
                self._add(shards, texts, languages, kept)
                texts, languages = [], []
        if texts:
            self._add(shards, texts, languages, kept)

    def _add(self, shards: ShardSet, texts: List[str], languages: List[Optional[str]], kept: Counter) -> None:
        shards.add(encode_texts(texts, languages, [], self.settings.encoder))
        kept.update(languages)
