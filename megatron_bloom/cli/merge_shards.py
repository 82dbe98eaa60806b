"""`mbloom-merge-shards`: MMIDIDX pairs (`PREFIX.bin` + `PREFIX.idx`) concatenated into one, in the order given.

    mbloom-merge-shards --output-prefix OUT PREFIX [PREFIX ...]

Each input's documents are kept as they are; token dtypes that differ widen to one that holds them all
(uint16 and int32 give int32). Inputs are checked first (complete, not truncated, sequences back to back);
the output is written under temporary names and renamed when complete. megatron-core reads it as it reads
any shard.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from data_prep.merge import merge_shards, print_summary
from megatron_bloom.cli.errors import exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbloom-merge-shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-prefix", required=True, help="writes OUT.bin and OUT.idx")
    parser.add_argument("prefixes", nargs="+", metavar="PREFIX", help="the shards to concatenate, in order")
    return parser


@exit_on_user_error("mbloom-merge-shards")
def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    print_summary(merge_shards(args.prefixes, args.output_prefix))


if __name__ == "__main__":
    main()
