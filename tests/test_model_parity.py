"""Our BLOOM against transformers' on the same random weights: logits, losses and gradients."""

import dataclasses
import math

import pytest
import torch

from megatron_bloom.model import ModelConfig, TaskConfig, build_model
from megatron_bloom.model.heads import last_token_index
from tests.conftest import hf_model, load_hf_weights_into, small_config

# "eager" is transformers' computation step by step, in the same order: its logits, losses and gradients
# must be transformers' to the bit, in fp32 and in bf16. "sdpa" is the fused attention runs use, which
# sums in another order: equal within rounding.
IMPLS = ["eager", "sdpa"]
TOLERANCE = {("eager", torch.float32): 0.0, ("sdpa", torch.float32): 1e-5}
FP32_TOLERANCE = TOLERANCE["sdpa", torch.float32]
# bf16 logits: eager to the bit; sdpa within this many bf16 ulps at the logits' scale (measured: 0.5 ulp, on
# logits up to ~2, over the three shapes, padded or not). A wrong bias or mask moves them by many ulps.
BF16_ULPS = {"eager": 0, "sdpa": 2}


def bf16_ulp(magnitude: float) -> float:
    """The spacing of bf16 values at `magnitude` (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(magnitude)) - 7)

SHAPES = {
    "4-heads": small_config(vocab_size=1000),  # vocabulary not a multiple of 128: padding is exercised
    "6-heads": small_config(hidden_size=96, num_heads=6, num_layers=3, vocab_size=1000),  # not a power of 2
    "5-heads": small_config(hidden_size=80, num_heads=5, num_layers=2, vocab_size=640),
}


def batch(config: ModelConfig, seed: int = 0):
    """Three rows: left-padded, right-padded and unpadded; padding uses the pad token id."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, config.vocab_size, (3, 17), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[0, :5] = 0
    mask[1, 12:] = 0
    input_ids[mask == 0] = config.pad_token_id
    return input_ids, mask


def pair(config: ModelConfig, task: TaskConfig = TaskConfig(), dtype=torch.float32, attention_impl="eager"):
    reference = hf_model(config, task)
    ours = build_model(dataclasses.replace(config, attention_impl=attention_impl), task).eval()
    load_hf_weights_into(ours, reference)
    return ours.to(dtype), reference.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padded"])
@pytest.mark.parametrize("attention_impl", IMPLS)
def test_causal_lm_logits_and_loss_fp32(shape, masked, attention_impl):
    config = SHAPES[shape]
    ours, reference = pair(config, attention_impl=attention_impl)
    input_ids, mask = batch(config)
    mask = mask if masked else None
    labels = input_ids.masked_fill(mask == 0, -100) if masked else input_ids
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=mask, labels=labels)
        actual = ours(input_ids, attention_mask=mask, labels=labels)
    tolerance = TOLERANCE[attention_impl, torch.float32]
    assert actual.logits.shape == expected.logits.shape == (3, 17, config.vocab_size)
    assert (actual.logits - expected.logits).abs().max().item() <= tolerance
    assert abs(actual.loss.item() - expected.loss.item()) <= tolerance


@pytest.mark.parametrize("shape", ["4-heads", "6-heads"])
@pytest.mark.parametrize("attention_impl", IMPLS)
def test_causal_lm_gradients_fp32(shape, attention_impl):
    config = SHAPES[shape]
    ours, reference = pair(config, attention_impl=attention_impl)
    input_ids, mask = batch(config, seed=1)
    labels = input_ids.masked_fill(mask == 0, -100)
    if attention_impl == "sdpa":
        # A left-padding position sees no key; its (arbitrary) output is the same in both, but the fused
        # kernel back-propagates through such a row differently. Only a label predicted from it (the first
        # real token after left padding) exposes that, so it is not counted here.
        after_padding = torch.zeros_like(mask, dtype=torch.bool)
        after_padding[:, 1:] = mask[:, :-1] == 0
        labels = labels.masked_fill(after_padding, -100)
    reference(input_ids, attention_mask=mask, labels=labels).loss.backward()
    ours(input_ids, attention_mask=mask, labels=labels).loss.backward()
    expected = dict(reference.named_parameters())
    tolerance = TOLERANCE[attention_impl, torch.float32]
    for name, param in ours.named_parameters():
        grad = param.grad
        if name == "transformer.word_embeddings.weight":
            assert grad[config.vocab_size:].abs().max().item() == 0  # padding rows never receive gradient
            grad = grad[: config.vocab_size]
        assert (grad - expected[name].grad).abs().max().item() <= tolerance, name


@pytest.mark.parametrize("shape", ["4-heads", "6-heads"])
@pytest.mark.parametrize("attention_impl", IMPLS)
def test_causal_lm_bf16(shape, attention_impl):
    config = SHAPES[shape]
    ours, reference = pair(config, dtype=torch.bfloat16, attention_impl=attention_impl)
    input_ids, mask = batch(config, seed=2)
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=mask, labels=input_ids)
        actual = ours(input_ids, attention_mask=mask, labels=input_ids)
    assert actual.logits.dtype == torch.bfloat16
    logits_error = (actual.logits.float() - expected.logits.float()).abs().max().item()
    assert logits_error <= BF16_ULPS[attention_impl] * bf16_ulp(expected.logits.float().abs().max().item())
    # Both take the float32 cross-entropy of their logits, whose change is at most twice the largest change
    # of a logit (its gradient per row sums to at most 2 in absolute value).
    assert abs(actual.loss.item() - expected.loss.item()) <= 2 * logits_error + 1e-6


@pytest.mark.parametrize("problem", ["single_label", "regression", "multi_label"])
def test_sequence_classification(problem):
    config = SHAPES["6-heads"]
    num_labels = 1 if problem == "regression" else 3
    ours, reference = pair(config, TaskConfig(name="sequence_classification", num_labels=num_labels))
    input_ids, mask = batch(config, seed=3)
    labels = {
        "single_label": torch.tensor([0, 2, 1]),
        "regression": torch.tensor([0.5, -1.0, 2.0]),
        "multi_label": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]),
    }[problem]
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=mask, labels=labels)
        actual = ours(input_ids, attention_mask=mask, labels=labels)
    assert actual.logits.shape == (3, num_labels)
    assert (actual.logits - expected.logits).abs().max().item() <= FP32_TOLERANCE
    assert abs(actual.loss.item() - expected.loss.item()) <= FP32_TOLERANCE
    # the pooled token is the last non-padding one: 16 for left padding and no padding, 11 for right
    assert last_token_index(input_ids, config.pad_token_id).tolist() == [16, 11, 16]


def test_token_classification():
    config = SHAPES["4-heads"]
    ours, reference = pair(config, TaskConfig(name="token_classification", num_labels=5))
    input_ids, mask = batch(config, seed=4)
    labels = torch.randint(0, 5, input_ids.shape).masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=mask, labels=labels)
        actual = ours(input_ids, attention_mask=mask, labels=labels)
    assert actual.logits.shape == (3, 17, 5)
    assert (actual.logits - expected.logits).abs().max().item() <= FP32_TOLERANCE
    assert abs(actual.loss.item() - expected.loss.item()) <= FP32_TOLERANCE


def test_question_answering():
    config = SHAPES["5-heads"]
    ours, reference = pair(config, TaskConfig(name="question_answering"))
    input_ids, mask = batch(config, seed=5)
    start, end = torch.tensor([3, 6, 40]), torch.tensor([5, 9, 44])  # the last answer lies outside the input
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=mask, start_positions=start, end_positions=end)
        actual = ours(input_ids, attention_mask=mask, start_positions=start, end_positions=end)
    assert (actual.start_logits - expected.start_logits).abs().max().item() <= FP32_TOLERANCE
    assert (actual.end_logits - expected.end_logits).abs().max().item() <= FP32_TOLERANCE
    assert abs(actual.loss.item() - expected.loss.item()) <= FP32_TOLERANCE


def test_padding_does_not_change_the_real_tokens():
    """A left-padded row gives the same logits on its real tokens as the same row without padding."""
    config = SHAPES["4-heads"]
    model = build_model(config, seed=7).eval()
    input_ids, mask = batch(config, seed=6)
    with torch.no_grad():
        padded = model(input_ids[:1], attention_mask=mask[:1]).logits[0, 5:]
        alone = model(input_ids[:1, 5:]).logits[0]
    assert (padded - alone).abs().max().item() <= FP32_TOLERANCE


def test_gelu_backward_is_the_derivative_of_its_forward():
    from megatron_bloom.model.block import BloomGeLU

    x = torch.linspace(-6, 6, 97, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(BloomGeLU.apply, (x,))
