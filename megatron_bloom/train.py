"""`python -m megatron_bloom.train`, kept for scripts that start the command by this name: it is
`mbloom-train` (`megatron_bloom/cli/train.py`)."""

from megatron_bloom.cli.train import main

if __name__ == "__main__":
    main()
