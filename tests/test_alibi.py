"""ALiBi slopes for any head count, checked against the paper's closed form and against transformers."""

import math

import pytest
import torch

from megatron_bloom.model.alibi import alibi_bias, alibi_positions, alibi_slopes


def paper_slopes(n: int) -> list:
    """Press et al. 2022, reference code: geometric 2^(-8/n)... with the non-power-of-two interleave."""
    def power_of_2(k):
        start = 2 ** (-(2 ** -(math.log2(k) - 3)))
        return [start * start**i for i in range(k)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 96, 112, 128])
def test_slopes_match_paper(num_heads):
    ours = alibi_slopes(num_heads)
    assert ours.dtype == torch.float32 and ours.shape == (num_heads,)
    torch.testing.assert_close(ours, torch.tensor(paper_slopes(num_heads)), rtol=1e-6, atol=0)


def test_slopes_equal_transformers_for_every_head_count_up_to_130():
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    for num_heads in range(1, 131):
        assert torch.equal(alibi_slopes(num_heads), _get_alibi_slopes(num_heads, torch.device("cpu"))), num_heads


def test_slopes_of_176b_heads():
    slopes = alibi_slopes(112)
    assert slopes[0].item() == pytest.approx(2 ** -0.125) and slopes[63].item() == pytest.approx(2 ** -8)
    assert slopes[64].item() == pytest.approx(2 ** (-8 / 128))  # then odd powers of n = 128's base
    assert slopes[65].item() == pytest.approx(2 ** (-8 * 3 / 128))


def test_positions_count_only_attended_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    positions = alibi_positions(mask, 2, 5, torch.device("cpu"))
    assert positions.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 0, 0]]
    assert alibi_positions(None, 2, 3, torch.device("cpu")).tolist() == [[0, 1, 2], [0, 1, 2]]


def test_bias_equals_transformers_build_alibi_tensor():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    for dtype in (torch.float32, torch.bfloat16):
        ours = alibi_bias(alibi_slopes(6), alibi_positions(mask, 3, 6, torch.device("cpu")), dtype)
        assert torch.equal(ours, build_alibi_tensor(mask, 6, dtype))
