"""Blending several datasets by weight (Megatron-LM's `data.paths` blends), and BLOOM-style temperatures.

The blend is a fixed, deterministic interleaving: the k-th sample of dataset d is due at time
(k + 1/2) / w_d, and samples are taken in order of due time. Every prefix of the blend then holds each
dataset within one sample of its exact share (the property Megatron's greedy blending index has), and
the index is built with one sort instead of a Python loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from megatron_bloom.data.index_cache import cached_arrays


def normalize(weights: Sequence[float]) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    return weights / weights.sum()


def temperature_weights(sizes: Sequence[int], temperature: float) -> np.ndarray:
    """Sampling probabilities proportional to size^(1/T): T = 1 samples by size, larger T flattens towards
    uniform (up-sampling small languages), as used to balance BLOOM's languages."""
    return normalize(np.asarray(sizes, dtype=np.float64) ** (1.0 / temperature))


def build_blend(weights: np.ndarray, num_samples: int) -> dict:
    """`dataset_index[i]`, `dataset_sample_index[i]`: which dataset serves blend sample i, and its sample."""
    due_times, dataset_ids, ranks = [], [], []
    for dataset, weight in enumerate(weights):
        if weight <= 0:
            continue
        count = int(np.ceil(num_samples * weight)) + 1
        ks = np.arange(count, dtype=np.int64)
        due_times.append((ks + 0.5) / weight)
        dataset_ids.append(np.full(count, dataset, dtype=np.int64))
        ranks.append(ks)
    order = np.lexsort((np.concatenate(dataset_ids), np.concatenate(due_times)))[:num_samples]
    return {"dataset_index": np.concatenate(dataset_ids)[order].astype(np.int16),
            "dataset_sample_index": np.concatenate(ranks)[order]}


class BlendedDataset:
    """`num_samples` samples drawn from several datasets in the proportions `weights` (normalized).

    The blend index is built (or loaded) first; `build_component(d, n)` is then asked for dataset d with
    exactly the n samples the blend takes from it.
    """

    def __init__(self, build_component: Callable[[int, int], object], weights: Sequence[float],
                 num_samples: int, cache_dir: Path, name: str, description: dict) -> None:
        self.weights = normalize(weights)
        self.num_samples = num_samples
        arrays, self.built_index = cached_arrays(
            cache_dir, name, {"kind": "blend", "weights": self.weights.tolist(), "num_samples": num_samples,
                              **description},
            ("dataset_index", "dataset_sample_index"), lambda: build_blend(self.weights, num_samples))
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        counts = np.bincount(np.asarray(self.dataset_index, dtype=np.int64), minlength=len(self.weights))
        self.datasets = [build_component(d, int(count)) if count else None for d, count in enumerate(counts)]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> np.ndarray:
        dataset = int(self.dataset_index[index])
        return self.datasets[dataset][int(self.dataset_sample_index[index])]
