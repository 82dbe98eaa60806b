"""`python -m megatron_bloom.eval`, kept for scripts that start the command by this name: it is
`mbloom-eval` (`megatron_bloom/cli/eval.py`)."""

from megatron_bloom.cli.eval import main

if __name__ == "__main__":
    main()
