"""Token shards in the MMIDIDX format of Megatron-LM / megatron-core's `IndexedDataset`.

`PREFIX.bin` holds the token ids of every sequence back to back. `PREFIX.idx` is, little-endian:

    b"MMIDIDX\\x00\\x00"            magic (9 bytes)
    u64  version = 1
    u8   dtype code                 (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    u64  sequence count S
    u64  document count D           (D = documents + 1)
    i32[S]  sequence lengths in tokens
    i64[S]  sequence byte offsets into .bin
    i64[D]  document indices: the first sequence of each document, then S

Tokens are uint16 when the vocabulary has fewer than 65500 ids, else int32 (megatron-core's rule). A shard
written by `mbloom-preprocess` has one sequence per document; a merged one keeps each input's document index
(Megatron's own tools can write documents of several sequences). Shards are read through `numpy.memmap`:
nothing is copied into memory.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO, List, Optional

import numpy as np

from megatron_bloom.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
               np.uint16: 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")


def token_dtype(vocab_size: int) -> type:
    """uint16 below 65500 ids (megatron-core's `DType.optimal_dtype`), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def data_paths(prefix: str | Path) -> tuple[Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def prefix_of(path: str | Path) -> Optional[str]:
    """The shard prefix a path names by one of its files (`x.bin` or `x.idx`: `x`); None for a prefix."""
    path = str(path)
    return path[:-4] if path.endswith((".bin", ".idx")) else None


def sequence_pointers(lengths: np.ndarray, itemsize: int) -> np.ndarray:
    """The byte offset of each sequence in the .bin when they lie back to back."""
    pointers = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    return pointers


class IndexedDatasetWriter:
    """Appends documents (or whole shards) to `PREFIX.bin`/`.idx` under temporary names; `finalize` renames them
    into place.

    The .bin is renamed before the .idx, so a pair whose .idx exists is complete; a crash leaves only
    `*.tmp-<pid>` files behind.
    """

    COPY_TOKENS = 16 << 20  # a shard is appended in chunks of this many tokens

    def __init__(self, prefix: str | Path, dtype: type) -> None:
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self.bin_path, self.idx_path = data_paths(prefix)
        suffix = f".tmp-{os.getpid()}"
        self._bin_tmp = self.bin_path.with_name(self.bin_path.name + suffix)
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + suffix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin: Optional[BinaryIO] = open(self._bin_tmp, "wb")
        self.lengths: List[np.ndarray] = []
        self.document_starts: List[np.ndarray] = []  # the first sequence of each document
        self.sequences = 0
        self.tokens = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as their concatenated tokens and the length of each (a sequence each)."""
        lengths = np.asarray(lengths, dtype=np.int32)
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._append_index(lengths, np.arange(lengths.size, dtype=np.int64))
        self.tokens += int(tokens.size)

    def add_shard(self, shard: "IndexedDataset") -> None:
        """Every sequence of `shard`, its document boundaries kept; tokens converted to this writer's dtype
        (which must hold them). Its sequences must lie back to back in its .bin, as every writer stores them
        (`check_contiguous`)."""
        total = shard.num_tokens
        for start in range(0, total, self.COPY_TOKENS):
            self._bin.write(np.ascontiguousarray(shard.tokens[start:start + self.COPY_TOKENS], dtype=self.dtype))
        self._append_index(np.asarray(shard.lengths, dtype=np.int32), np.asarray(shard.document_index[:-1]))
        self.tokens += total

    def _append_index(self, lengths: np.ndarray, document_starts: np.ndarray) -> None:
        self.lengths.append(lengths)
        self.document_starts.append(document_starts.astype(np.int64) + self.sequences)
        self.sequences += int(lengths.size)

    @property
    def documents(self) -> int:
        return sum(int(part.size) for part in self.document_starts)

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        self._bin = None
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int32)
        pointers = sequence_pointers(lengths, self.dtype.itemsize)
        document_index = np.concatenate(self.document_starts + [np.array([lengths.size], dtype=np.int64)])
        with open(self._idx_tmp, "wb") as idx:
            idx.write(_HEADER.pack(MAGIC, VERSION, DTYPE_CODES[self.dtype.type], lengths.size, document_index.size))
            idx.write(lengths.tobytes())
            idx.write(pointers.tobytes())
            idx.write(document_index.tobytes())
            idx.flush()
            os.fsync(idx.fileno())
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        """Remove the temporary files (after an error)."""
        if self._bin is not None:
            self._bin.close()
            self._bin = None
        for path in (self._bin_tmp, self._idx_tmp):
            path.unlink(missing_ok=True)


class IndexedDataset:
    """Read-only, memory-mapped view of a `PREFIX.bin`/`.idx` pair (ours or Megatron's own tools')."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = data_paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise UserError(f"data file {path} does not exist (data prefix {self.prefix}).")
        with open(self.idx_path, "rb") as idx:
            header = idx.read(_HEADER.size)
        if len(header) < _HEADER.size or header[:9] != MAGIC:
            raise UserError(f"{self.idx_path} is not an MMIDIDX index (bad magic).")
        _, version, code, sequences, documents = _HEADER.unpack(header)
        if version != VERSION or code not in CODE_DTYPES:
            raise UserError(f"{self.idx_path}: unsupported index version {version} or dtype code {code}.")
        self.dtype = np.dtype(CODE_DTYPES[code])
        expected = _HEADER.size + sequences * (4 + 8) + documents * 8
        if self.idx_path.stat().st_size < expected:
            raise UserError(f"{self.idx_path} is truncated: {self.idx_path.stat().st_size} bytes, "
                            f"expected at least {expected}.")
        index = np.memmap(self.idx_path, mode="r", dtype=np.uint8)
        offset = _HEADER.size
        self.lengths = np.frombuffer(index, dtype=np.int32, count=sequences, offset=offset)
        offset += self.lengths.nbytes
        self.pointers = np.frombuffer(index, dtype=np.int64, count=sequences, offset=offset)
        offset += self.pointers.nbytes
        self.document_index = np.frombuffer(index, dtype=np.int64, count=documents, offset=offset)
        total = int(self.pointers[-1]) + int(self.lengths[-1]) * self.dtype.itemsize if sequences else 0
        if self.bin_path.stat().st_size < total:
            raise UserError(f"{self.bin_path} is truncated: {self.bin_path.stat().st_size} bytes, the index "
                            f"describes {total}.")
        self.tokens = (np.memmap(self.bin_path, mode="r", dtype=self.dtype) if total
                       else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return int(self.lengths.size)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)

    def get(self, index: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens of sequence `index` from `offset` (all of them, or `length`), as a view into the map."""
        start = int(self.pointers[index]) // self.dtype.itemsize + offset
        stop = start - offset + int(self.lengths[index]) if length is None else start + length
        return self.tokens[start:stop]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    def check_contiguous(self) -> None:
        """Raise a `UserError` unless the index is one `IndexedDatasetWriter` (or Megatron's builder) would write:
        sequences back to back from the start of the .bin, and a document index that runs from 0 to the last
        sequence, never backwards."""
        lengths, pointers, documents = self.lengths, self.pointers, self.document_index
        expected = sequence_pointers(lengths, self.dtype.itemsize)
        if (lengths < 0).any() or not np.array_equal(pointers, expected):
            first = int(np.flatnonzero((lengths < 0) | (pointers != expected))[0])
            raise UserError(f"{self.idx_path} is damaged or not a plain shard: sequence {first} has length "
                            f"{int(lengths[first])} at byte {int(pointers[first])} of {self.bin_path}, where sequences "
                            f"back to back would put it at byte {int(expected[first])}.")
        if documents.size == 0 or documents[0] != 0 or documents[-1] != lengths.size or (np.diff(documents) < 0).any():
            raise UserError(f"{self.idx_path} is damaged: its document index must run from 0 to its "
                            f"{lengths.size} sequences without going back, and it does not.")
