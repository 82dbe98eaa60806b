"""`python -m megatron_bloom.generate`, kept for scripts that start the command by this name: it is
`mbloom-generate` (`megatron_bloom/cli/generate.py`)."""

from megatron_bloom.cli.generate import main

if __name__ == "__main__":
    main()
