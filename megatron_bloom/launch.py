"""`python -m megatron_bloom.launch`, kept for scripts that start the command by this name: it is
`mbloom-launch` (`megatron_bloom/cli/launch.py`)."""

from megatron_bloom.cli.launch import main

if __name__ == "__main__":
    main()
