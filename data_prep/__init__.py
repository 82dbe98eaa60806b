"""Offline data preparation: corpora -> trained tokenizer -> memory-mapped token shards (MMIDIDX format).

The library of `mbloom-train-tokenizer`, `mbloom-preprocess` and `mbloom-merge-shards`, whose command lines are
in `megatron_bloom/cli/`; each also runs as `python -m data_prep.<tool>`.
"""
