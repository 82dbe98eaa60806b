"""`mbloom-train-tokenizer`: a byte-level BPE tokenizer with BLOOM's special tokens, trained from corpora.

    mbloom-train-tokenizer --input PATH [PATH ...] --vocab-size N --output DIR [--text-key text]

Texts are streamed to the `tokenizers` trainer, so inputs larger than memory work (the trainer keeps only
its word counts). Writes DIR/tokenizer.json plus the files `transformers.AutoTokenizer` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

from data_prep.train_tokenizer import train_tokenizer
from megatron_bloom.cli.errors import exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbloom-train-tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="jsonl, jsonl.gz or parquet files, or saved `datasets` directories: paths, glob "
                             "patterns (matches sorted by name) or fsspec URLs")
    parser.add_argument("--vocab-size", required=True, type=int)
    parser.add_argument("--output", required=True, type=Path, help="directory for tokenizer.json and its config")
    parser.add_argument("--text-key", default="text")
    return parser


@exit_on_user_error("mbloom-train-tokenizer")
def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    result = train_tokenizer(args.input, args.vocab_size, args.output, args.text_key)
    print(f"trained a {result['vocab_size']}-token byte-level BPE on {result['documents']:,} documents in "
          f"{result['seconds']:.1f} s: {args.output / 'tokenizer.json'}")
    if result["skipped"].total:
        print(f"skipped {result['skipped'].total} records: {result['skipped'].summary()}")


if __name__ == "__main__":
    main()
