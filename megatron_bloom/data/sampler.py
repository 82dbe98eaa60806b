"""Which samples each data-parallel rank reads, resumable from the number of samples already consumed."""

from __future__ import annotations

from typing import Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from megatron_bloom.data.skips import SkippedSamples


class PretrainingSampler:
    """Micro-batches of sample indices for one data-parallel rank, in global order from `consumed_samples`.

    Global step t reads samples [c + t*B, c + (t+1)*B) with B = micro_batch_size * dp; rank r takes its
    contiguous micro-batch of them (Megatron-LM's pretraining sampler). The whole state is
    `consumed_samples`, which checkpoints save, so a resumed run reads exactly the next batch.

    With `skipped` ranges (data/skips.py) a step reads the next B positions outside them instead; positions
    past the dataset's end (the samples that replace skipped ones, at the very end of a run) wrap to its
    start.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, skipped: Optional[SkippedSamples] = None) -> None:
        if not 0 <= dp_rank < dp_size or micro_batch_size < 1:
            raise ValueError(f"bad sampler layout: dp_rank {dp_rank} of {dp_size}, micro batch {micro_batch_size}")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.skipped = skipped or SkippedSamples()

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch_size * self.dp_size
        if not self.skipped:
            for start in range(self.consumed_samples, self.total_samples - step + 1, step):
                first = start + self.dp_rank * self.micro_batch_size
                yield list(range(first, first + self.micro_batch_size))
            return
        position = self.consumed_samples
        while True:
            positions, position = self.skipped.take(position, step)
            first = self.dp_rank * self.micro_batch_size
            yield [index % self.total_samples for index in positions[first:first + self.micro_batch_size]]

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}


def collate_tokens(samples: List[np.ndarray]) -> torch.Tensor:
    """Samples of seq_length + 1 tokens -> one int64 tensor [batch, seq_length + 1]."""
    return torch.from_numpy(np.stack(samples))


def build_data_loader(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                      num_workers: int = 2, skipped: Optional[SkippedSamples] = None) -> DataLoader:
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size, skipped)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_tokens,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
