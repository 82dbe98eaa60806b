"""Tensor parallelism against the single-process model, on real gloo processes: logits, loss, gradients."""

import pytest
import torch

from megatron_bloom.model import ModelConfig, TaskConfig, build_model
from megatron_bloom.model.alibi import alibi_slopes
from megatron_bloom.parallel import (
    ParallelState,
    sum_sequence_parallel_grads,
    build_parallel_model,
    merge_state_dicts,
    shard_state_dict,
    shard_tensor,
)
from megatron_bloom.parallel.cross_entropy import gather_vocab_logits
from megatron_bloom.parallel.state import dp_groups, pp_groups, tp_groups
from tests.distributed import run_distributed

TOLERANCE = 1e-5
SHAPES = [
    # 12 heads: 6 or 3 per rank (3 is not a power of two); vocabulary 1000 padded to 1024, so the last tp=4
    # rank holds 232 real rows and 24 padding rows.
    ModelConfig(num_layers=2, hidden_size=96, num_heads=12, vocab_size=1000, seq_length=16),
    # 4 heads of 32: one head per rank at tp = 4; vocabulary 700 padded to 1024, so the last tp=4 rank's
    # slice is padding only (its cross-entropy max is -inf, its sum of exponentials 0).
    ModelConfig(num_layers=3, hidden_size=128, num_heads=4, vocab_size=700, seq_length=16),
]


def inputs(config: ModelConfig):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, config.vocab_size, (2, 16), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0  # left padding
    input_ids[mask == 0] = config.pad_token_id
    labels = input_ids.masked_fill(mask == 0, -100)
    return input_ids, mask, labels


def compare_with_single_process(rank, world_size, tp, sequence_parallel):
    """Per shape: max |logits diff|, |loss diff| and max |grad diff| over all parameters (this rank)."""
    state = ParallelState.create(tp=tp)
    report = []
    for config in SHAPES:
        input_ids, mask, labels = inputs(config)
        reference = build_model(config, seed=42)
        expected = reference(input_ids, attention_mask=mask, labels=labels)
        expected.loss.backward()
        # The same seed, built directly in pieces: the init must not depend on the layout.
        model = build_parallel_model(config, state, seed=42, sequence_parallel=sequence_parallel)
        if sequence_parallel:
            sum_sequence_parallel_grads(model, state)  # hooks: the backward below sums them
        actual = model(input_ids, attention_mask=mask, labels=labels)
        actual.loss.backward()
        logits = gather_vocab_logits(actual.logits, state.tp_group, config.vocab_size)
        reference_grads = {name: p.grad for name, p in reference.named_parameters()}
        grad_error = max(
            (p.grad - shard_tensor(name, reference_grads[name], config, tp, state.tp_rank)).abs().max().item()
            for name, p in model.named_parameters()
        )
        report.append({
            "logits": (logits - expected.logits).abs().max().item(),
            "loss": abs(actual.loss.item() - expected.loss.item()),
            "grads": grad_error,
            "local_heads": model.transformer.h[0].self_attention.num_heads,
            "slopes": model.transformer.h[0].self_attention.alibi_slopes,
        })
    return report


@pytest.mark.parametrize("tp, sequence_parallel", [
    (1, False), (2, False), pytest.param(2, True, marks=pytest.mark.slow), pytest.param(4, False, marks=pytest.mark.slow),
    pytest.param(4, True, marks=pytest.mark.slow)], ids=["tp1", "tp2", "tp2-sp", "tp4", "tp4-sp"])
def test_tensor_parallel_matches_single_process(tp, sequence_parallel):
    reports = run_distributed(compare_with_single_process, tp, tp, sequence_parallel)
    for rank, report in enumerate(reports):
        for config, errors in zip(SHAPES, report):
            local = config.num_heads // tp
            assert errors["local_heads"] == local
            # each rank uses the ALiBi slopes of its own heads (Megatron-DeepSpeed once gave all ranks the first)
            assert torch.equal(errors["slopes"], alibi_slopes(config.num_heads)[rank * local: (rank + 1) * local])
            assert errors["logits"] <= TOLERANCE, (rank, config, errors)
            assert errors["loss"] <= TOLERANCE, (rank, config, errors)
            assert errors["grads"] <= TOLERANCE, (rank, config, errors)


def task_heads_under_tp(rank, world_size):
    state = ParallelState.create(tp=2, dp=2)
    config = SHAPES[0]
    input_ids, mask, _ = inputs(config)
    errors = {}
    for task, kwargs in ((TaskConfig(name="sequence_classification", num_labels=3), {"labels": torch.tensor([0, 2])}),
                         (TaskConfig(name="token_classification", num_labels=5), {}),
                         (TaskConfig(name="question_answering"), {})):
        reference = build_model(config, task, seed=3).eval()
        expected = reference(input_ids, attention_mask=mask, **kwargs)
        for sp in (False, True):
            model = build_parallel_model(config, state, task, seed=3, sequence_parallel=sp).eval()
            actual = model(input_ids, attention_mask=mask, **kwargs)
            field = "start_logits" if task.name == "question_answering" else "logits"
            errors[(task.name, sp)] = (getattr(actual, field) - getattr(expected, field)).abs().max().item()
    return state.tp_rank, state.dp_rank, errors


@pytest.mark.slow
def test_task_heads_and_groups_with_data_parallel_replicas():
    results = run_distributed(task_heads_under_tp, 4)
    assert [(tp_rank, dp_rank) for tp_rank, dp_rank, _ in results] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    for _, _, errors in results:
        assert max(errors.values()) <= TOLERANCE, errors


def test_rank_layout_is_tp_fastest_then_dp_then_pp():
    assert tp_groups(2, 2, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dp_groups(2, 2, 2) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert pp_groups(2, 2, 2) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    state = ParallelState(tp=2, pp=2, dp=2, rank=6)
    assert (state.tp_rank, state.dp_rank, state.pp_rank) == (0, 1, 1)


@pytest.mark.parametrize("tp", [2, 4])
def test_shard_and_merge_round_trip(tp):
    config = SHAPES[0]
    full = build_model(config, seed=1).state_dict()
    shards = [shard_state_dict(full, config, tp, rank) for rank in range(tp)]
    assert shards[0]["transformer.h.0.self_attention.query_key_value.weight"].shape == (3 * 96 // tp, 96)
    assert shards[0]["transformer.h.0.self_attention.dense.weight"].shape == (96, 96 // tp)
    assert shards[0]["transformer.word_embeddings.weight"].shape == (config.padded_vocab_size(tp) // tp, 96)
    merged = merge_state_dicts(shards, config)
    assert merged.keys() == full.keys()
    for name, tensor in full.items():
        assert torch.equal(merged[name], tensor), name
    shards[1]["transformer.ln_f.weight"] = shards[1]["transformer.ln_f.weight"] + 1
    with pytest.raises(ValueError, match="replicated tensor transformer.ln_f.weight differs"):
        merge_state_dicts(shards, config)
