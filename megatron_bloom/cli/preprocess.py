"""`mbloom-preprocess`: corpora -> token shards in Megatron's MMIDIDX format (`PREFIX.bin` + `PREFIX.idx`).

    mbloom-preprocess --input PATH [PATH ...] --tokenizer TOK --output-prefix PREFIX [--workers N]
        [--text-key text] [--lang-key lang] [--split-by-lang] [--append-eod] [--strict]
        [--tasks N [--executor local|slurm] [--slurm-partition P] [--slurm-time T]] [--dedup none|exact|near]

With one task, the main process reads the inputs in order and writes the shards; `--workers` processes
parse and tokenize chunks of records with the Rust batch encoder. With `--tasks N` the inputs are cut into N
consecutive parts, each tokenized by a task (here: `--workers` at once; on SLURM: one job array, submitted
and waited for), and the parts are merged into the same shards, byte for byte. An interrupted run resumes
when rerun: finished tasks are not run again. `--dedup` drops duplicate documents first, keeping the first
in input order. Bad records are skipped and counted by reason (`--strict`: the first one is an error).
Shards are written under temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import List, Optional

from data_prep.options import DEDUP_MODES, EOD_TOKEN, EXECUTORS, PreprocessOptions
from data_prep.preprocess import preprocess, print_summary
from megatron_bloom.cli.errors import exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbloom-preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="jsonl, jsonl.gz or parquet files, or saved `datasets` directories, in order: paths, "
                             "glob patterns (matches sorted by name) or fsspec URLs")
    parser.add_argument("--tokenizer", required=True, type=Path, help="a tokenizer.json or a directory holding one")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.stats.json")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizing processes (with --tasks: tasks run at once on this machine)")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--lang-key", default="lang")
    parser.add_argument("--split-by-lang", action="store_true", help="one PREFIX_<lang> shard per language")
    parser.add_argument("--append-eod", action="store_true", help=f"end every document with {EOD_TOKEN}")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    parser.add_argument("--tasks", type=int, default=1, help="tasks, each tokenizing a consecutive part of the inputs")
    parser.add_argument("--executor", choices=EXECUTORS, default="local", help="where the tasks run")
    parser.add_argument("--slurm-partition", help="--executor slurm: the partition (default: the cluster's)")
    parser.add_argument("--slurm-time", help="--executor slurm: each task's time limit, e.g. 4:00:00")
    parser.add_argument("--dedup", choices=DEDUP_MODES, default="none",
                        help="drop documents with the same normalized text (exact) or MinHash near-duplicates "
                             "(near), keeping the first in input order")
    return parser


@exit_on_user_error("mbloom-preprocess")
def main(argv: Optional[List[str]] = None) -> None:
    print_summary(preprocess(PreprocessOptions(**vars(build_parser().parse_args(argv)))))


if __name__ == "__main__":
    main()
