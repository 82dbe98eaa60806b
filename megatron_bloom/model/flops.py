"""Model FLOPs of a training iteration, as Megatron-LM counts them (Narayanan et al. 2021, appendix).

    FLOPs = 24 * c * B * s * L * h^2 * (1 + s / (6 h))  +  6 * B * s * h * V

B sequences of s tokens, L layers, hidden size h, vocabulary V. Per layer and token a forward pass costs
24 h^2 in its GEMMs and 4 s h in attention's two s x s products (counted whole, causal or not, as
Megatron-LM and torchtitan do); a backward pass costs twice a forward, so c = 3, and full activation
recomputation adds a second forward of the layers, c = 4. The LM head's logits, 2 h V a token forward, are
never recomputed: they count 3 times in either case. (The paper's eq. 3, 24 c ... (1 + s/6h + V/16Lh), has
the head folded in for c = 4 only; with c = 3 it would count the head at 3/4.) A fine-tuning head's few
outputs are left out (`lm_head=False`). These are model FLOPs: MFU counts the recomputation's extra work as
overhead, not as useful FLOPs, so pass recompute=False for MFU.
"""

from __future__ import annotations

from megatron_bloom.model.config import ModelConfig


def layer_flops_per_token(model: ModelConfig, seq_length: int, recompute: bool = False) -> float:
    """One transformer layer's FLOPs per token of an iteration: 24 c h^2 (1 + s / 6h)."""
    h = model.hidden_size
    return 24.0 * (4 if recompute else 3) * h * h * (1.0 + seq_length / (6.0 * h))


def lm_head_flops_per_token(model: ModelConfig) -> float:
    """The LM head's FLOPs per token of an iteration (forward and backward): 6 h V."""
    return 6.0 * model.hidden_size * model.padded_vocab_size()


def iteration_flops(model: ModelConfig, global_batch_size: int, seq_length: int, recompute: bool = False,
                    lm_head: bool = True) -> float:
    per_token = model.num_layers * layer_flops_per_token(model, seq_length, recompute)
    if lm_head:
        per_token += lm_head_flops_per_token(model)
    return global_batch_size * seq_length * per_token
