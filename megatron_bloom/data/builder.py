"""From the `data` config to the train / validation / test datasets that training reads."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_bloom.config.schema import DataConfig
from megatron_bloom.data.blending import BlendedDataset, normalize, temperature_weights
from megatron_bloom.data.gpt_dataset import GPTDataset
from megatron_bloom.data.index_cache import describe_file
from megatron_bloom.data.indexed_dataset import IndexedDataset, data_paths, prefix_of
from megatron_bloom.errors import ConfigError

SPLITS = ("train", "valid", "test")


def parse_blend(paths: Sequence, temperature: Optional[float] = None) -> Tuple[List[str], List[float]]:
    """`data.paths` as (prefixes, weights): `[w1, p1, w2, p2, ...]`, or prefixes alone (equal weights, or
    weights from `data.temperature`, computed later from the shards' sizes)."""
    paths = list(paths)
    if not paths:
        raise ConfigError("data.paths is empty: give a data prefix, e.g. data.paths=[data/corpus_text_document], "
                          "or a blend [0.7, prefix1, 0.3, prefix2].")
    if all(isinstance(p, str) for p in paths):
        return paths, [1.0] * len(paths)
    weights, prefixes = paths[0::2], paths[1::2]
    if len(paths) % 2 or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights) \
            or not all(isinstance(p, str) for p in prefixes):
        raise ConfigError(f"data.paths must be [weight1, prefix1, weight2, prefix2, ...] or a list of prefixes; "
                          f"got {paths}.")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"data.paths weights must be non-negative with a positive sum; got {weights}.")
    if temperature is not None:
        raise ConfigError("data.temperature computes the blend weights from the shards' sizes: give data.paths as a "
                          "list of prefixes without weights.")
    return list(prefixes), [float(w) for w in weights]


def check_prefixes(prefixes: Sequence[str]) -> None:
    missing = [str(path) for prefix in prefixes for path in data_paths(prefix) if not path.is_file()]
    if missing:
        with_suffix = [prefix for prefix in prefixes if prefix_of(prefix) is not None]
        hint = (f" data.paths takes prefixes, without .bin or .idx: {with_suffix[0]} should be "
                f"{prefix_of(with_suffix[0])}." if with_suffix else "")
        raise ConfigError(f"data.paths names files that do not exist: {', '.join(missing)}.{hint}")


def split_ranges(num_documents: int, split: str) -> List[Tuple[int, int]]:
    """Contiguous document ranges for train, validation and test from weights such as "969,30,1"."""
    weights = [float(w) for w in str(split).split(",")] + [0.0] * (3 - len(str(split).split(",")))
    fractions = normalize(weights)
    bounds = [0] + [int(round(f * num_documents)) for f in np.cumsum(fractions)]
    bounds[-1] = num_documents
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def build_datasets(data: DataConfig, seq_length: int, seed: int, num_samples: Sequence[int]) -> List[Optional[object]]:
    """The train, validation and test datasets (None where 0 samples are asked for)."""
    prefixes, weights = parse_blend(data.paths, data.temperature)
    check_prefixes(prefixes)
    shards = [IndexedDataset(prefix) for prefix in prefixes]
    if data.temperature is not None:
        weights = temperature_weights([shard.num_tokens for shard in shards], data.temperature).tolist()
    cache_dir = Path(data.cache_dir) if data.cache_dir else Path(prefixes[0]).resolve().parent / "index-cache"
    ranges = [split_ranges(len(shard), data.split) for shard in shards]
    datasets: List[Optional[object]] = []
    for split_number, (split, samples) in enumerate(zip(SPLITS, num_samples)):
        if samples <= 0:
            datasets.append(None)
            continue

        def component(d: int, count: int, split_number: int = split_number, split: str = split) -> GPTDataset:
            start, stop = ranges[d][split_number]
            if stop <= start:
                raise ConfigError(f"data.split={data.split!r} leaves no {split} documents in {prefixes[d]} "
                                  f"({len(shards[d])} documents).")
            return GPTDataset(shards[d], np.arange(start, stop), count, seq_length, seed + split_number,
                              cache_dir, f"{Path(prefixes[d]).name}_{split}")

        if len(shards) == 1:
            datasets.append(component(0, samples))
        else:
            description = {"split": split, "seed": seed, "seq_length": seq_length, "split_weights": data.split,
                           "shards": [describe_file(shard.idx_path) for shard in shards]}
            datasets.append(BlendedDataset(component, weights, samples, cache_dir, f"blend_{split}", description))
    return datasets
