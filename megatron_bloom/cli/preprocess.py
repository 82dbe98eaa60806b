"""`mbloom-preprocess`: corpora -> token shards in Megatron's MMIDIDX format (`PREFIX.bin` + `PREFIX.idx`).

    mbloom-preprocess --input PATH [PATH ...] --tokenizer TOK --output-prefix PREFIX [--workers N]
        [--text-key text] [--lang-key lang] [--split-by-lang] [--append-eod] [--strict]

The main process reads the inputs in order and writes the shards; `--workers` processes parse and
tokenize chunks of records with the Rust batch encoder. Results are written in input order whatever the
number of workers. Bad records are skipped and counted by reason (`--strict`: the first one is an error).
Shards are written under temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import List, Optional

from data_prep.preprocess import EOD_TOKEN, PreprocessOptions, preprocess, print_summary
from megatron_bloom.cli.errors import exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbloom-preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="jsonl, jsonl.gz or parquet files, or saved `datasets` directories, in order: paths, "
                             "glob patterns (matches sorted by name) or fsspec URLs")
    parser.add_argument("--tokenizer", required=True, type=Path, help="a tokenizer.json or a directory holding one")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.stats.json")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--lang-key", default="lang")
    parser.add_argument("--split-by-lang", action="store_true", help="one PREFIX_<lang> shard per language")
    parser.add_argument("--append-eod", action="store_true", help=f"end every document with {EOD_TOKEN}")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    return parser


@exit_on_user_error("mbloom-preprocess")
def main(argv: Optional[List[str]] = None) -> None:
    print_summary(preprocess(PreprocessOptions(**vars(build_parser().parse_args(argv)))))


if __name__ == "__main__":
    main()
