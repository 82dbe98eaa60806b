"""The console commands (`mbloom-*`). Each parses its arguments and calls the library; each also runs as
`python -m megatron_bloom.cli.<command>`."""
