"""Offline data preparation: corpora -> trained tokenizer -> memory-mapped token shards (MMIDIDX format).

Importable as a package so that its tools run as `python -m data_prep.<tool>` and are tested like the
library. The tools (`mbloom-train-tokenizer`, `mbloom-preprocess`) land with the data-pipeline work.
"""
