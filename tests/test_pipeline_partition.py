"""How pipeline stages split the layers: balanced by training FLOPs (the LM head counted) or by blocks, and
what a checkpoint records of it. (The split DeepSpeed's module really holds is checked by reading its
per-stage optimizer files back in tests/test_reshape.py, with both methods.)"""

import json

import pytest

from megatron_bloom.checkpoint.layout import CheckpointMetadata
from megatron_bloom.training.checkpointing import same_stages
from megatron_bloom.config import load_config
from megatron_bloom.errors import UserError
from megatron_bloom.pipeline.partition import stage_layers
from megatron_bloom.model.flops import layer_flops_per_token, lm_head_flops_per_token


def blocks_of(stages, num_layers):
    """Each stage's transformer blocks (layer_specs indices 2 .. L + 1)."""
    return [[i - 2 for i in stage if 2 <= i < num_layers + 2] for stage in stages]


def stage_costs(model, stages, lm_head=True):
    per_block = layer_flops_per_token(model, model.seq_length)
    last_spec = model.num_layers + 3
    return [len(blocks) * per_block + (lm_head_flops_per_token(model) if lm_head and last_spec in stage else 0.0)
            for blocks, stage in zip(blocks_of(stages, model.num_layers), stages)]


def test_the_lm_head_counts_in_the_split():
    """bloom-small's LM head (6 h V = 98 MFLOP a token) weighs 4.46 of its blocks (72 h^2 (1 + s/6h) = 22
    MFLOP): of 2 stages the first takes 6 blocks, the last 2 and the head (6.46 blocks' work). By blocks it
    would be 4 and 4, the last stage doing 2.1 times the first's work (8.46 blocks'); 1F1B runs at the
    slowest stage's pace, so the flops split's step is 0.76 of that."""
    model = load_config(["model=bloom-small"]).model
    by_flops, by_blocks = stage_layers(model, 2), stage_layers(model, 2, method="blocks")
    assert by_flops == [range(0, 8), range(8, 12)]
    assert by_blocks == [range(0, 6), range(6, 12)]
    slowest = max(stage_costs(model, by_flops)) / max(stage_costs(model, by_blocks))
    assert slowest == pytest.approx(6.464 / 8.464, abs=1e-3)
    # a fine-tuning head is counted as free: the blocks split evenly
    assert stage_layers(model, 2, "sequence_classification") == by_blocks


@pytest.mark.parametrize("preset", ["bloom-tiny", "bloom-small", "bloom-560m", "bloom-7b1", "bloom-176b"])
@pytest.mark.parametrize("pp", [2, 3, 4, 12])
def test_every_split_covers_the_layers_and_is_never_slower_than_by_blocks(preset, pp):
    model = load_config([f"model={preset}"]).model
    if pp > model.num_layers:
        pytest.skip("more stages than blocks")
    for method in ("flops", "blocks"):
        stages = stage_layers(model, pp, method=method)
        assert [i for stage in stages for i in stage] == list(range(model.num_layers + 4))  # in order, once
        assert all(blocks for blocks in blocks_of(stages, model.num_layers)), (method, stages)
    by_flops = stage_costs(model, stage_layers(model, pp))
    assert max(by_flops) <= max(stage_costs(model, stage_layers(model, pp, method="blocks")))


def test_a_checkpoint_records_its_split_and_older_ones_read_as_split_by_blocks(tmp_path):
    model = load_config(["model=bloom-small"]).model
    written = json.loads(CheckpointMetadata(model=model, pp=2, pipeline_partition="flops").to_json())
    assert written["pipeline_partition"] == "flops"
    del written["pipeline_partition"]  # what mbloom.json held before the choice existed
    assert CheckpointMetadata.from_json(json.dumps(written), tmp_path).pipeline_partition == "blocks"
    written["pipeline_partition"] = "by-hand"
    with pytest.raises(UserError, match="by-hand"):
        CheckpointMetadata.from_json(json.dumps(written), tmp_path)


def test_a_run_split_otherwise_does_not_load_the_per_stage_optimizer_files():
    """Resuming exactly needs the same layers on each stage: the same method, or methods that agree."""
    base = ["model=bloom-small", "parallel.pp=2"]
    by_flops, by_blocks = load_config(base), load_config(base + ["parallel.pipeline_partition=blocks"])
    saved = CheckpointMetadata(model=by_flops.model, pp=2, pipeline_partition="flops")
    assert same_stages(saved, by_flops) and not same_stages(saved, by_blocks)
    # a model whose head weighs less than a block splits the same either way
    tiny_vocab = ["model.vocab_size=512"]
    saved = CheckpointMetadata(model=load_config(base + tiny_vocab).model, pp=2, pipeline_partition="blocks")
    assert same_stages(saved, load_config(base + tiny_vocab))
