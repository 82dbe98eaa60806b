"""The keys and values of earlier positions, kept so that each generated token costs one position's work.

Each layer's buffers are allocated once, for the whole generation (`max_length` positions), when the first
keys arrive: with the number of heads this rank computes (tensor parallelism narrows it), so the same cache
serves any layout. Appending writes in place instead of concatenating a growing tensor every step.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch


class LayerKVCache:
    """One attention layer's keys and values, `[batch, heads, positions, head_dim]`."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.length = 0
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None

    def append(self, key: torch.Tensor, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' keys and values; returns all of them so far (views of the buffers)."""
        batch_size, heads, new, head_dim = key.shape
        if self.keys is None:
            shape = (batch_size, heads, self.max_length, head_dim)
            self.keys = key.new_zeros(shape)  # zeros, not garbage: decoding may read the unused positions
            self.values = value.new_zeros(shape)
        end = self.length + new
        if end > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} positions; {end} were asked for")
        self.keys[:, :, self.length:end] = key
        self.values[:, :, self.length:end] = value
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """The caches of all layers of a model, and how many positions they hold."""

    def __init__(self, num_layers: int, max_length: int) -> None:
        self.layers: List[LayerKVCache] = [LayerKVCache(max_length) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length
