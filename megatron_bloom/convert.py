"""`python -m megatron_bloom.convert`, kept for scripts that start the command by this name: it is
`mbloom-convert` (`megatron_bloom/cli/convert.py`)."""

from megatron_bloom.cli.convert import main

if __name__ == "__main__":
    main()
