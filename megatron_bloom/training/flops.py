"""Model FLOPs of a training iteration, by Megatron-LM's formula (Narayanan et al. 2021, eq. 3).

    FLOPs = 24 * c * B * s * L * h^2 * (1 + s / (6 h) + V / (16 L h))

B sequences of s tokens, L layers, hidden size h, vocabulary V (the last term is the LM head's logits: a
fine-tuning head's few outputs are left out, `lm_head=False`). A forward pass costs 1 unit and a backward
pass 2, so c = 3; full activation recomputation adds a second forward, c = 4. These are model FLOPs
(MFU counts the recomputation's extra work as overhead, not as useful FLOPs: pass recompute=False for MFU).
"""

from __future__ import annotations

from megatron_bloom.model import ModelConfig


def iteration_flops(model: ModelConfig, global_batch_size: int, seq_length: int, recompute: bool = False,
                    lm_head: bool = True) -> float:
    h, layers = model.hidden_size, model.num_layers
    vocab = model.padded_vocab_size() if lm_head else 0
    c = 4 if recompute else 3
    return 24.0 * c * global_batch_size * seq_length * layers * h * h * (
        1.0 + seq_length / (6.0 * h) + vocab / (16.0 * layers * h))
