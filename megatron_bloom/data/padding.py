"""Token id lists as one padded batch: right padding (evaluation, task inputs) or left padding (generation,
so that every prompt ends where the new tokens start)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch


def padded_batch(rows: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None,
                 left: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """`[len(rows), length]` token ids filled with `pad_id` around each row, and the 0/1 attention mask;
    `length` defaults to the longest row."""
    length = max(len(row) for row in rows) if length is None else length
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for index, row in enumerate(rows):
        columns = slice(length - len(row), length) if left else slice(0, len(row))
        input_ids[index, columns] = torch.tensor(row, dtype=torch.long)
        mask[index, columns] = 1
    return input_ids, mask
