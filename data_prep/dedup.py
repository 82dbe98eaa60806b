"""Deduplication before tokenizing (`--dedup exact|near`), on datatrove's deduplication stages.

Both keep the first occurrence in input order and drop the others, so the output does not depend on how the
inputs are split into tasks. A task's documents are numbered in input order, and the tasks cover the inputs
in order, so (task, number) orders every document of the run.

- **exact**: documents whose normalized text is the same (`normalized_text`: Unicode NFKC, case-folded,
  every run of whitespace one space, no leading or trailing space). datatrove's three exact stages hash
  (64-bit xxhash), find the repeated hashes and drop them. Of equal hashes datatrove keeps the highest
  priority, then the lowest number within a task: the priority is the earlier task (`earlier_task_first`).
- **near**: MinHash (Broder 1997) with locality-sensitive hashing, datatrove's stages with its defaults (as
  FineWeb's): shingles of 5 words of the simplified text, 14 bands of 8 hashes. Two documents whose shingles'
  Jaccard similarity is s share a band with probability 1 - (1 - s^8)^14: 0.99 at s = 0.85, 0.92 at
  s = 0.8, 0.50 at s = 0.685, 0.05 at s = 0.5. Documents linked by shared bands form clusters; each cluster
  keeps its first document (`KeepFirstCluster`, in place of datatrove's clustering, which keeps the root of
  a union by size, not the first). Words are what datatrove's simplification leaves between spaces, and each
  character of a script written without spaces (Chinese, Japanese, Thai, ...): `ScriptWords`.
"""

from __future__ import annotations

import re
import struct
import unicodedata
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import regex
from datatrove.data import Document
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.utils.word_tokenizers import WordTokenizer, simple_span_tokenize

from data_prep.executors import Stage
from data_prep.task_steps import ReadDocuments, TaskSettings

# datatrove's priorities are 2-byte, from 1: one per task, the earlier task the higher.
MAX_PRIORITY = 65535
MAX_EXACT_TASKS = MAX_PRIORITY
FINDER_TASKS = 16  # exact: the signatures are split by hash range among at most this many finder tasks

NEAR_CONFIG = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1)

_WHITESPACE = re.compile(r"\s+")
_NO_SPACE_SCRIPTS = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\p{Tibetan}"
_WORDS = regex.compile(rf"[{_NO_SPACE_SCRIPTS}]|[^\s{_NO_SPACE_SCRIPTS}]+")
_SENTENCE_ENDS = regex.compile(r"(?<=[.!?।。！？])\s*")


def normalized_text(document: Document) -> str:
    """What exact deduplication compares: the text in NFKC, case-folded, its whitespace runs single spaces."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", document.text).casefold()).strip()


def earlier_task_first(document: Document) -> int:
    return MAX_PRIORITY - document.metadata["task"]


EXACT_CONFIG = ExactDedupConfig(content_getter=normalized_text, document_priority=earlier_task_first)


class ScriptWords(WordTokenizer):
    """Words for MinHash shingles in any language: runs of characters between spaces, and each character of
    the scripts written without spaces (so that Chinese text has shingles too)."""

    def word_tokenize(self, text: str) -> List[str]:
        return _WORDS.findall(text)

    def sent_tokenize(self, text: str) -> List[str]:
        return [sentence for sentence in _SENTENCE_ENDS.split(text) if sentence.strip()]

    def span_tokenize(self, text: str) -> List[Tuple[int, int]]:
        return list(simple_span_tokenize(text, self.sent_tokenize(text)))


class KeepFirstCluster(PipelineStep):
    """MinHash's third stage: the duplicate pairs datatrove's bucket stage found (`*.dups`: records of 4
    little-endian uint32, task and number of each document) joined into clusters; every document of a cluster
    but its first in input order is written to `NNNNNN.remove` of its task (sorted uint32 numbers), the file
    datatrove's filter stage reads."""

    name = "cluster near-duplicates, keep the first"
    type = "mbloom"

    def __init__(self, input_folder: str, output_folder: str) -> None:
        super().__init__()
        self.input_folder, self.output_folder = get_datafolder(input_folder), get_datafolder(output_folder)

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> None:
        parent: Dict[int, int] = {}

        def root(node: int) -> int:
            top = node
            while parent.get(top, top) != top:
                top = parent[top]
            while node != top:  # path compression
                parent[node], node = top, parent.get(node, top)
            return top

        for name in self.input_folder.list_files(glob_pattern="*.dups"):
            with self.input_folder.open(name, "rb") as handle:
                pairs = np.frombuffer(handle.read(), dtype="<u4").reshape(-1, 4).astype(np.int64)
            keys = (pairs[:, 0::2] << 32) | pairs[:, 1::2]  # (task, number) in input order
            for first, second in keys.tolist():
                a, b = root(first), root(second)
                if a != b:
                    parent[max(a, b)] = min(a, b)  # the earlier document stays the root
        removed: Dict[int, List[int]] = {}
        for node in sorted(parent):
            if root(node) != node:
                removed.setdefault(node >> 32, []).append(node & 0xFFFFFFFF)
        for task, numbers in removed.items():
            with self.output_folder.open(f"{task:06d}.remove", "wb") as handle:
                handle.write(struct.pack(f"<{len(numbers)}I", *numbers))
        self.stat_update("to_remove", value=sum(map(len, removed.values())))


def dedup_stages(mode: str, settings: TaskSettings, folder: Path) -> Tuple[List[Stage], Optional[PipelineStep]]:
    """The stages that find the duplicates (`mode` none, exact or near), and the filter that drops them as the
    tokenizing stage reads (None: nothing to drop)."""
    tasks = len(settings.plan)
    signatures, found = str(folder / "signatures"), str(folder / "duplicates")
    if mode == "none":
        return [], None
    if mode == "exact":
        finders = min(tasks, FINDER_TASKS)
        hashes = ExactDedupSignature(signatures, EXACT_CONFIG, finder_workers=finders)
        return ([Stage("exact-signatures", tasks, [ReadDocuments(settings), hashes]),
                 Stage("exact-duplicates", finders, [ExactFindDedups(signatures, found, EXACT_CONFIG)])],
                ExactDedupFilter(found, EXACT_CONFIG))
    buckets = str(folder / "buckets")
    minhashes = MinhashDedupSignature(signatures, NEAR_CONFIG, language=ScriptWords())
    return ([Stage("near-signatures", tasks, [ReadDocuments(settings), minhashes]),
             Stage("near-buckets", NEAR_CONFIG.num_buckets, [MinhashDedupBuckets(signatures, buckets,
                                                                                 config=NEAR_CONFIG)]),
             Stage("near-clusters", 1, [KeepFirstCluster(buckets, found)])],
            MinhashDedupFilter(found))
