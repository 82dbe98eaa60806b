"""GPT-style training samples: `seq_length + 1` consecutive tokens of a shuffled stream of documents.

As in Megatron-LM's GPTDataset, documents are concatenated across their boundaries (each one ends with the
end-of-document token when preprocessed with `--append-eod`), and consecutive samples share one token:
sample s covers stream positions [s * L, s * L + L] inclusive, so its inputs are tokens[:-1] and its
labels tokens[1:]. Three index arrays define the dataset, built once and cached:

    document_order  the split's documents, shuffled anew for each epoch, for as many epochs as needed
    sample_starts   (position in document_order, token offset) where each sample starts, plus one end row
    sample_order    a shuffled permutation of the samples
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from megatron_bloom.data.index_cache import cached_arrays, describe_file
from megatron_bloom.data.indexed_dataset import IndexedDataset
from megatron_bloom.errors import UserError


def locate(cumulative: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(document slot, offset) of stream positions, given the cumulative document lengths (first entry 0).

    Empty documents are skipped: a position at a boundary belongs to the next non-empty document.
    """
    slots = np.searchsorted(cumulative, positions, side="right") - 1
    return np.stack([slots, positions - cumulative[slots]], axis=1).astype(np.int64)


def build_indices(lengths: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int,
                  seed: int) -> Dict[str, np.ndarray]:
    tokens_per_epoch = int(lengths[documents].sum())
    needed = num_samples * seq_length + 1  # the last sample's extra (label) token
    if tokens_per_epoch == 0:
        raise UserError("a data split has no tokens; check data.split and the data prefixes.")
    epochs = -(-needed // tokens_per_epoch)
    rng = np.random.RandomState(seed)
    document_order = np.concatenate([rng.permutation(documents) for _ in range(epochs)]).astype(np.int64)
    cumulative = np.zeros(document_order.size + 1, dtype=np.int64)
    np.cumsum(lengths[document_order], out=cumulative[1:])
    sample_starts = locate(cumulative, np.arange(num_samples + 1, dtype=np.int64) * seq_length)
    sample_order = np.random.RandomState(seed + 1).permutation(num_samples).astype(np.int64)
    return {"document_order": document_order, "sample_starts": sample_starts, "sample_order": sample_order}


class GPTDataset:
    """`num_samples` samples of `seq_length + 1` tokens (int64) from the documents `documents` of a shard."""

    def __init__(self, indexed: IndexedDataset, documents: np.ndarray, num_samples: int, seq_length: int,
                 seed: int, cache_dir: Path, name: str) -> None:
        self.indexed, self.seq_length, self.num_samples = indexed, seq_length, num_samples
        description = {
            "kind": "gpt", "bin": describe_file(indexed.bin_path), "idx": describe_file(indexed.idx_path),
            "documents": [int(documents[0]), int(documents[-1]) + 1] if documents.size else [0, 0],
            "num_samples": num_samples, "seq_length": seq_length, "seed": seed,
        }
        arrays, self.built_index = cached_arrays(
            cache_dir, name, description, ("document_order", "sample_starts", "sample_order"),
            lambda: build_indices(indexed.lengths, documents, num_samples, seq_length, seed))
        self.document_order = arrays["document_order"]
        self.sample_starts = arrays["sample_starts"]
        self.sample_order = arrays["sample_order"]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> np.ndarray:
        sample = int(self.sample_order[index])
        return self.unshuffled(sample)

    def unshuffled(self, sample: int) -> np.ndarray:
        """Sample number `sample` of the stream, before the sample shuffle."""
        first_slot, first_offset = (int(v) for v in self.sample_starts[sample])
        last_slot, last_offset = (int(v) for v in self.sample_starts[sample + 1])
        if first_slot == last_slot:
            tokens = self.indexed.get(int(self.document_order[first_slot]), first_offset,
                                      last_offset - first_offset + 1)
        else:
            pieces = [self.indexed.get(int(self.document_order[first_slot]), first_offset)]
            pieces += [self.indexed.get(int(self.document_order[slot])) for slot in range(first_slot + 1, last_slot)]
            pieces.append(self.indexed.get(int(self.document_order[last_slot]), 0, last_offset + 1))
            tokens = np.concatenate(pieces)
        return tokens.astype(np.int64)
