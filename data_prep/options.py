"""What `mbloom-preprocess` is asked to do: its flags as one dataclass, read by the one-process path
(`preprocess`) and by a job of tasks (`distributed`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

EOD_TOKEN = "</s>"
EXECUTORS = ("local", "slurm")
DEDUP_MODES = ("none", "exact", "near")


@dataclass
class PreprocessOptions:
    """What `mbloom-preprocess` is asked to do (its flags)."""

    input: List[str]  # jsonl, jsonl.gz or parquet files, or saved `datasets` dirs, in order: paths, globs, URLs
    tokenizer: Path  # a tokenizer.json or a directory holding one
    output_prefix: str  # writes PREFIX.bin, PREFIX.idx, PREFIX.stats.json
    workers: int = 1  # one task: tokenizing processes; several: tasks run at once here (--executor local)
    text_key: str = "text"
    lang_key: str = "lang"
    split_by_lang: bool = False  # one PREFIX_<lang> shard per language
    append_eod: bool = False  # end every document with EOD_TOKEN
    strict: bool = False  # stop at the first bad record
    tasks: int = 1  # a job of this many tasks, each tokenizing a consecutive part of the inputs
    executor: str = "local"  # where a job's tasks run: local | slurm
    slurm_partition: Optional[str] = None
    slurm_time: Optional[str] = None
    dedup: str = "none"  # none | exact | near: drop duplicate documents, keeping the first

    @property
    def as_job(self) -> bool:
        return self.tasks > 1 or self.executor != "local" or self.dedup != "none"
