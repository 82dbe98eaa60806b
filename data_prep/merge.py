"""Concatenating MMIDIDX pairs: `mbloom-merge-shards`, and the last step of a preprocessing run split into tasks.

The output holds every input's sequences in the order the inputs are given, each input's document index
kept, so that merging the shards of consecutive parts of a corpus gives, byte for byte, the shard of the
whole. A shard has one token dtype: inputs that differ widen to the smallest that holds them all (uint16 and
int32 give int32, as megatron-core's builder requires of the shards it merges). Tokens are copied in chunks,
never held in memory, and written under temporary names renamed when complete (.bin before .idx).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy as np

from megatron_bloom.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetWriter,
    data_paths,
    prefix_of,
)
from megatron_bloom.errors import UserError


def widest_dtype(dtypes: Sequence[np.dtype]) -> np.dtype:
    """The smallest token dtype of the format that holds every value of each of `dtypes`."""
    widest = np.result_type(*dtypes)
    if widest.type not in DTYPE_CODES:
        raise UserError(f"the shards' token dtypes ({', '.join(sorted({d.name for d in dtypes}))}) have no common "
                        f"dtype in the MMIDIDX format ({widest.name}).")
    return widest


def open_inputs(prefixes: Sequence[str | Path], output_prefix: str | Path) -> List[IndexedDataset]:
    """Every input, read and checked (`IndexedDataset.check_contiguous`), none of them the output."""
    if not prefixes:
        raise UserError("no shards to merge: give at least one PREFIX.")
    outputs = {path.resolve() for path in data_paths(output_prefix)}
    shards = []
    for prefix in prefixes:
        if prefix_of(prefix) is not None:
            raise UserError(f"shards are named by prefix, without .bin or .idx: {prefix} should be "
                            f"{prefix_of(prefix)}.")
        if outputs & {path.resolve() for path in data_paths(prefix)}:
            raise UserError(f"the output prefix {output_prefix} is also an input; merging into an input would "
                            "overwrite it while it is read. Choose another --output-prefix.")
        shard = IndexedDataset(prefix)
        shard.check_contiguous()
        shards.append(shard)
    return shards


def merge_shards(prefixes: Sequence[str | Path], output_prefix: str | Path) -> dict:
    """Write `output_prefix.bin/.idx`: the shards of `prefixes` one after another. Returns a summary."""
    shards = open_inputs(prefixes, output_prefix)
    dtype = widest_dtype([shard.dtype for shard in shards])
    writer = IndexedDatasetWriter(output_prefix, dtype)
    try:
        for shard in shards:
            writer.add_shard(shard)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    return {"output": str(output_prefix), "inputs": [str(prefix) for prefix in prefixes],
            "documents": writer.documents, "sequences": writer.sequences, "tokens": writer.tokens,
            "dtype": dtype.name, "input_dtypes": sorted({shard.dtype.name for shard in shards})}


def print_summary(summary: dict) -> None:
    widened = (f" (widened from {', '.join(summary['input_dtypes'])})"
               if summary["input_dtypes"] != [summary["dtype"]] else "")
    print(f"merged {len(summary['inputs'])} shards into {summary['output']}.bin/.idx: {summary['documents']:,} "
          f"documents, {summary['tokens']:,} tokens, {summary['dtype']}{widened}")


if __name__ == "__main__":  # `python -m data_prep.merge` is mbloom-merge-shards
    from megatron_bloom.cli.merge_shards import main

    main()
