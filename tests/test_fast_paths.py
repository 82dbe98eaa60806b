"""The speed-ups runs use by default against the reference computations they replace: same results."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_bloom.model import build_model
from megatron_bloom.model.alibi import alibi_bias, alibi_positions
from megatron_bloom.model.attention import BloomAttention, causal_additive_mask
from megatron_bloom.model.causal_blocks import CAUSAL_BLOCK_ROWS
from megatron_bloom.model.block import bloom_gelu, fused_bloom_gelu
from megatron_bloom.parallel import cross_entropy
from megatron_bloom.parallel.cross_entropy import vocab_parallel_cross_entropy
from tests.conftest import hf_model, load_hf_weights_into, small_config


def test_fused_gelu_matches_bloom_formula_to_float32_rounding():
    x = torch.linspace(-8, 8, 100_001, dtype=torch.float64).float().requires_grad_()
    reference = bloom_gelu(x)
    fused = fused_bloom_gelu(x)
    # The kernel's sqrt(2/pi) differs from BLOOM's rounded constant by 8e-10 relative: a few float32 ulps.
    assert (fused - reference).abs().max().item() <= 1e-6
    (grad_reference,) = torch.autograd.grad(reference.sum(), x)
    (grad_fused,) = torch.autograd.grad(fused.sum(), x)
    assert (grad_fused - grad_reference).abs().max().item() <= 2e-6  # derivatives reach 1.13: ~10 ulps
    # In bf16 the kernel computes in float32 and rounds once, where the formula rounds after every op:
    # it is the correctly rounded value, and never further from the float32 result than the formula.
    xb = x.detach().bfloat16()
    exact = bloom_gelu(xb.float())
    fused_error = (fused_bloom_gelu(xb).float() - exact).abs()
    # (plus 1e-6 absolute: far in the negative tail 1 + tanh(u) cancels, in float32 too)
    assert (fused_error <= exact.abs() * 2 ** -8 + 1e-6).all()
    assert fused_error.max().item() <= (bloom_gelu(xb).float() - exact).abs().max().item()


@pytest.mark.parametrize("kernels", ["ours", "torch"])
def test_fast_model_matches_transformers_with_causal_attention_blocks(kernels, monkeypatch):
    """sdpa on a CPU, no padding: attention in causal blocks (two whole ones and a ragged third), or torch's
    kernel where that is the faster (MBLOOM_CPU_KERNELS forces each here), with the fused GeLU, gives
    transformers' logits, loss and gradients within float32 rounding."""
    monkeypatch.setenv("MBLOOM_CPU_KERNELS", kernels)
    config = small_config(vocab_size=1000, seq_length=2 * CAUSAL_BLOCK_ROWS + 44)
    reference = hf_model(config)
    ours = build_model(dataclasses.replace(config, attention_impl="sdpa", fused_kernels=True))
    load_hf_weights_into(ours, reference)
    input_ids = torch.randint(0, config.vocab_size, (2, config.seq_length), generator=torch.Generator().manual_seed(0))
    expected = reference(input_ids, labels=input_ids)
    actual = ours(input_ids, labels=input_ids)
    assert (actual.logits - expected.logits).abs().max().item() <= 1e-5
    assert abs(actual.loss.item() - expected.loss.item()) <= 1e-5
    expected.loss.backward()
    actual.loss.backward()
    reference_grads = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        grad = param.grad[: config.vocab_size] if name == "transformer.word_embeddings.weight" else param.grad
        assert (grad - reference_grads[name].grad).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("q_length, kv_length", [(300, 300), (100, 250)], ids=["prompt", "after-a-cache"])
def test_causal_blocks_give_the_eager_attention_in_bf16(q_length, kv_length, monkeypatch):
    """The CPU's causal blocks against the eager (transformers) computation in bf16: the same scores and
    probabilities, so outputs equal but for a rare last-bit difference of a longer or shorter sum; gradients
    within bf16 rounding (the blocks' softmax backward reads its bf16 output, the eager one float32)."""
    monkeypatch.setenv("MBLOOM_CPU_KERNELS", "ours")  # the blocks, whichever is the faster here
    config = small_config(num_heads=4, hidden_size=128)
    attention = BloomAttention(dataclasses.replace(config, attention_impl="sdpa")).bfloat16()
    generator = torch.Generator().manual_seed(q_length)
    query = torch.randn(2, 4, q_length, 32, generator=generator).bfloat16().requires_grad_()
    key, value = (torch.randn(2, 4, kv_length, 32, generator=generator).bfloat16().requires_grad_() for _ in range(2))
    positions = alibi_positions(None, 2, kv_length, query.device)
    bias = alibi_bias(attention.alibi_slopes, positions, torch.bfloat16)
    mask = causal_additive_mask(None, 2, q_length, kv_length, torch.bfloat16, query.device)
    grad_output = torch.randn(2, 4, q_length, 32, generator=generator).bfloat16()
    results = []
    for attend in (attention._eager_attention, attention._fused_attention):
        output = attend(query, key, value, bias, mask)
        results.append((output, *torch.autograd.grad(output, (query, key, value), grad_output)))
    for expected, actual in zip(*results):
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=2 ** -6 * scale)
    assert (results[1][0] != results[0][0]).float().mean().item() < 0.001


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_torch(dtype, monkeypatch):
    # Small chunks so that the 300 rows take several, the last one partial.
    monkeypatch.setitem(cross_entropy._CHUNK_ELEMENTS, "cpu", 64 * 1000)
    generator = torch.Generator().manual_seed(0)
    real_columns, padded_columns = 1000, 1024
    logits = (torch.randn(3, 100, padded_columns, generator=generator) * 4).to(dtype).requires_grad_()
    target = torch.randint(0, real_columns, (3, 100), generator=generator)
    target[0, :7] = -100
    weights = torch.rand(3, 100, generator=generator) * (target != -100)

    per_token = vocab_parallel_cross_entropy(logits, target, 0, real_columns, None)
    (grad,) = torch.autograd.grad((per_token * weights).sum(), logits)

    real = logits.detach().float()[..., :real_columns].requires_grad_()
    expected = F.cross_entropy(real.reshape(-1, real_columns), target.reshape(-1), reduction="none").view(3, 100)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), real)
    counted = target != -100
    assert (per_token - expected)[counted].abs().max().item() <= 1e-5
    assert grad.dtype == dtype
    grad_tolerance = 1e-6 if dtype == torch.float32 else 2 ** -9  # bf16: one rounding of values below 1
    assert (grad[..., :real_columns].float() - expected_grad).abs().max().item() <= grad_tolerance
    assert grad[..., real_columns:].abs().max().item() == 0  # padding columns get no gradient
    assert grad[0, :7].abs().max().item() == 0  # nor do ignored tokens


RSS_AFTER_FREE = """
import sys, psutil, torch
from megatron_bloom.training.host_memory import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
rss = lambda: psutil.Process().memory_info().rss
before = rss()
block = torch.ones(64 * 1024 * 1024)  # 256 MB, touched
del block
print((rss() - before) // 2**20)
"""


@pytest.mark.parametrize("mode", ["keep", "default"])
def test_freed_host_memory_stays_for_reuse_only_when_asked(mode):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", RSS_AFTER_FREE, mode], capture_output=True, text=True, check=True)
    kept_mb = int(result.stdout.split()[-1])
    if mode == "keep":
        assert kept_mb >= 250  # the freed 256 MB is still the process's, ready for the next step
    else:
        assert kept_mb <= 16  # glibc's default returns it to the system at once


def test_whole_tensor_cross_entropy_functions_match_the_chunked_passes():
    """The functions `model.fused_kernels` compiles on GPUs compute what the chunked passes do (run eagerly
    here; the compiled kernels themselves are checked on a GPU by benchmarks/gpu_train.py)."""
    generator = torch.Generator().manual_seed(1)
    real_columns = 1000
    rows = (torch.randn(300, 1024, generator=generator) * 4).bfloat16()
    target = torch.randint(-5, real_columns, (300,), generator=generator)  # some ids on another rank's slice
    row_max = rows[:, :real_columns].amax(-1).float()
    sum_exp = cross_entropy._sum_exp(rows[:, :real_columns], row_max)
    expected_sum_exp = torch.exp(rows[:, :real_columns].double() - row_max[:, None].double()).sum(-1)
    assert torch.allclose(sum_exp.double(), expected_sum_exp, rtol=1e-6)

    log_sum_exp = sum_exp.log() + row_max
    grad_loss = torch.rand(300, generator=generator)
    on_this_rank = target >= 0
    local_target = target.clamp(min=0)
    target_grad = -on_this_rank.float() * grad_loss
    grad = torch.full_like(rows, float("nan"))
    for chunk in (slice(0, 150), slice(150, 300)):  # written chunk by chunk, as on a GPU
        cross_entropy._write_logits_grad(grad[chunk], rows[chunk], log_sum_exp[chunk], grad_loss[chunk],
                                         local_target[chunk], target_grad[chunk], real_columns)
    probs = torch.softmax(rows[:, :real_columns].float(), -1)
    one_hot = F.one_hot(local_target, real_columns).float() * on_this_rank[:, None]
    expected = ((probs - one_hot) * grad_loss[:, None])
    assert grad.dtype == torch.bfloat16
    assert (grad[:, :real_columns].float() - expected).abs().max().item() <= 2 ** -9
    assert grad[:, real_columns:].abs().max().item() == 0


@pytest.mark.parametrize("rows, columns", [(16384, 250880), (8, 250880), (4096, 524288), (7, 2**31 - 1)])
def test_compiled_cross_entropy_chunks_index_in_32_bits(rows, columns):
    """Row chunks for the compiled kernels: fewer than 2^31 elements each, covering every row once."""
    chunks = list(cross_entropy._compiled_row_chunks(torch.empty(rows, columns, device="meta")))
    assert all((chunk.stop - chunk.start) * columns < 2**31 for chunk in chunks)
    assert [chunk.start for chunk in chunks] == [0] + [chunk.stop for chunk in chunks[:-1]]
    assert chunks[-1].stop == rows
    assert len({chunk.stop - chunk.start for chunk in chunks[:-1]}) <= 1  # equal sizes: one compilation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alibi_folded_into_query_key_gives_the_biased_causal_attention(dtype):
    """What the CUDA path runs (ALiBi as four extra q.k dimensions, causal kernel, no mask) against float64
    attention with the bias added: within the dtype's rounding, and in bf16 closer than the bf16 bias
    tensor the masked path adds."""
    from megatron_bloom.model.alibi import alibi_slopes, fold_alibi_into_query_key

    generator = torch.Generator().manual_seed(2)
    batch, heads, length, head_dim = 2, 6, 700, 32
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype) for _ in range(3))
    slopes, scale = alibi_slopes(heads), head_dim ** -0.5
    positions = torch.arange(length, dtype=torch.float64)
    bias = slopes.double()[:, None] * positions  # [heads, kv]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale + bias[None, :, None, :]
    exact = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v.double()

    folded_q, folded_k = fold_alibi_into_query_key(q, k, slopes, scale)
    assert folded_q.shape[-1] % 8 == 0 and folded_q.shape[-1] >= head_dim + 4
    folded = F.scaled_dot_product_attention(folded_q, folded_k, F.pad(v, (0, folded_q.shape[-1] - head_dim)),
                                            is_causal=True, scale=scale)[..., :head_dim]
    folded_error = (folded.double() - exact).abs().max().item()
    if dtype == torch.float32:
        assert folded_error <= 1e-4
    else:
        mask = torch.where(causal, 0.0, torch.finfo(dtype).min).to(dtype)
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(dtype)[None, :, None, :] + mask, scale=scale)
        assert folded_error <= 0.05
        assert folded_error < (masked.double() - exact).abs().max().item()


def test_decoding_one_token_with_the_cache_matches_the_full_forward_without_a_mask():
    """The single-query decode attention (sdpa runs) with a batch and no attention mask (a mask of batch 1)."""
    from megatron_bloom.model import KVCache

    config = small_config(attention_impl="sdpa", fused_kernels=True)
    model = build_model(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(input_ids).logits
        cache = KVCache(config.num_layers, 12)
        model(input_ids[:, :11], cache=cache)
        last = model(input_ids[:, 11:], cache=cache, last_positions=1).logits
    assert last.shape == (3, 1, config.vocab_size)
    assert (last[:, 0] - full[:, -1]).abs().max().item() <= 1e-5
