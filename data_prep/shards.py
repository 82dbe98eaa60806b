"""What one pass of tokenizing writes: a single `PREFIX.bin/.idx`, or with --split-by-lang one `PREFIX_<lang>`
pair per language, created as languages appear; and its summary, a JSON file written whole or not at all."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, Optional

from data_prep.encoding import EncodedChunk, split_by_language
from megatron_bloom.data.indexed_dataset import IndexedDatasetWriter


def safe_name(language: str) -> str:
    """A language code usable in a file name (other characters become '_')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", language)


def language_key(language: Optional[str]) -> str:
    """How summaries name a language's output: the language, or "all" without --split-by-lang."""
    return "all" if language is None else language


def language_prefix(prefix: str, language: Optional[str]) -> str:
    """The shard of `language` (None: the single shard without --split-by-lang)."""
    return prefix if language is None else f"{prefix}_{safe_name(language)}"


class ShardSet:
    """The writers of one pass: a single shard, or one per language (created as languages appear)."""

    def __init__(self, prefix: str, dtype, split_by_lang: bool) -> None:
        self.prefix, self.dtype, self.split_by_lang = prefix, dtype, split_by_lang
        self.writers: Dict[Optional[str], IndexedDatasetWriter] = {}

    def add(self, chunk: EncodedChunk) -> None:
        groups = split_by_language(chunk) if self.split_by_lang else {None: (chunk.tokens, chunk.lengths)}
        for language, (tokens, lengths) in groups.items():
            self._writer(language).add_documents(tokens, lengths)

    def _writer(self, language: Optional[str]) -> IndexedDatasetWriter:
        if language not in self.writers:
            self.writers[language] = IndexedDatasetWriter(language_prefix(self.prefix, language), self.dtype)
        return self.writers[language]

    def finalize(self) -> None:
        for writer in self.writers.values():
            writer.finalize()

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


def write_json(path: Path, content: dict) -> None:
    """Write `content` to `path` whole or not at all (a process killed mid-write leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    os.replace(temporary, path)
