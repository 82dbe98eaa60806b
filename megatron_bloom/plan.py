"""`python -m megatron_bloom.plan`, kept for scripts that start the command by this name: it is
`mbloom-plan` (`megatron_bloom/cli/plan.py`)."""

from megatron_bloom.cli.plan import main

if __name__ == "__main__":
    main()
