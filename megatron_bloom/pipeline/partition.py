"""Which of `layer_specs` each pipeline stage holds.

The specs are: the embedding, its LayerNorm, the L transformer blocks, the final LayerNorm, then the head
(the tied LM head, or a fine-tuning task's). Every stage holds at least one block.

* `flops` (the default) balances the stages' training FLOPs. The LM head costs 6 h V a token, against
  72 h^2 (1 + s / 6h) for a block (`model/flops.py`). For a small model that head outweighs several
  blocks. Splitting by blocks alone would leave the last stage the slowest, and 1F1B runs every stage at
  the pace of the slowest. Megatron-LM handles this with `--account-for-loss-in-pipeline-split`, and
  BLOOM's Megatron-DeepSpeed with `type:transformer|embedding`. Here the head's real cost is counted.
  A fine-tuning head and the embedding lookup are counted as free; the LayerNorms too.
* `blocks` balances the number of transformer blocks, as DeepSpeed's `type:BlockPipe` method does. This
  is the split of checkpoints whose `mbloom.json` names no partition.

The split depends only on the model config (with its `seq_length`), the task and pp. A checkpoint records
the method, so its per-stage optimizer files can be read back in any later run.
"""

from __future__ import annotations

from typing import List

from megatron_bloom.fence.deepspeed import partition_balanced
from megatron_bloom.model import ModelConfig
from megatron_bloom.model.flops import layer_flops_per_token, lm_head_flops_per_token


def stage_layers(model: ModelConfig, pp: int, task_name: str = "causal_lm", method: str = "flops") -> List[range]:
    """The `layer_specs` indices of each of the `pp` stages, computed without building the module."""
    blocks = model.num_layers
    if method == "blocks":
        is_block = [0, 0] + [1] * blocks + [0, 0]
        bounds = partition_balanced(is_block, pp)  # DeepSpeed's own balancing
        return [range(bounds[stage], bounds[stage + 1]) for stage in range(pp)]
    if method != "flops":
        raise ValueError(f"unknown pipeline partition {method!r}")
    # Balance the blocks, the last block carrying the head's cost; then give the first stage the
    # embedding and its norm, and the last stage the final norm and the head.
    costs = [layer_flops_per_token(model, model.seq_length)] * blocks
    if task_name == "causal_lm":
        costs[-1] += lm_head_flops_per_token(model)
    block_bounds = partition_balanced(costs, pp)
    bounds = [0] + [2 + bound for bound in block_bounds[1:-1]] + [blocks + 4]
    return [range(bounds[stage], bounds[stage + 1]) for stage in range(pp)]
