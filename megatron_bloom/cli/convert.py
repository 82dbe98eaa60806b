"""`mbloom-convert`: Hugging Face checkpoints to training checkpoints and back, and re-slicing a checkpoint.

    mbloom-convert from-hf --hf HF_DIR --output CKPT_DIR [--tp N] [--pp N]
    mbloom-convert to-hf --checkpoint CKPT_DIR --output HF_DIR
    mbloom-convert reshape --checkpoint CKPT_DIR --output CKPT_DIR2 --tp N --pp N
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import List, Optional

from megatron_bloom.checkpoint.hf import convert_from_hf, convert_to_hf
from megatron_bloom.checkpoint.layout import CheckpointMetadata
from megatron_bloom.checkpoint.reshape import reshape_checkpoint
from megatron_bloom.cli.errors import exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbloom-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    hf_in = commands.add_parser("from-hf", help="Hugging Face BLOOM directory -> training checkpoint")
    hf_in.add_argument("--hf", required=True, type=Path, help="directory with config.json and the weights")
    hf_in.add_argument("--output", required=True, type=Path, help="checkpoint directory to write")
    hf_in.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of the layout (default 1)")
    hf_in.add_argument("--pp", type=int, default=1, help="pipeline stages of the layout (default 1)")
    hf_out = commands.add_parser("to-hf", help="training checkpoint -> Hugging Face BLOOM directory")
    hf_out.add_argument("--checkpoint", required=True, type=Path,
                        help="a checkpoint.dir (its latest checkpoint) or one checkpoint's directory")
    hf_out.add_argument("--output", required=True, type=Path, help="directory to write")
    reshape = commands.add_parser("reshape", help="checkpoint -> the same checkpoint for another tp/pp layout, "
                                  "optimizer state included (any dp, ZeRO stage and precision loads it)")
    reshape.add_argument("--checkpoint", required=True, type=Path,
                         help="a checkpoint.dir (its latest checkpoint) or one checkpoint's directory")
    reshape.add_argument("--output", required=True, type=Path, help="checkpoint directory to write")
    reshape.add_argument("--tp", required=True, type=int, help="tensor-parallel ranks of the new layout")
    reshape.add_argument("--pp", required=True, type=int, help="pipeline stages of the new layout")
    return parser


@exit_on_user_error("mbloom-convert")
def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    if args.command in ("from-hf", "reshape"):
        if args.command == "from-hf":
            directory = convert_from_hf(args.hf, args.output, args.tp, args.pp)
        else:
            directory = reshape_checkpoint(args.checkpoint, args.output, args.tp, args.pp)
        metadata = CheckpointMetadata.from_json((directory / "mbloom.json").read_text(), directory)
        print(f"wrote {directory} ({metadata.task.name}, {metadata.model.num_parameters():,} parameters, "
              f"tp={metadata.tp} pp={metadata.pp}, {metadata.contents}) in {time.perf_counter() - start:.1f} s")
    else:
        written = convert_to_hf(args.checkpoint, args.output)
        print(f"wrote {args.output}: {', '.join(p.name for p in written)} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
