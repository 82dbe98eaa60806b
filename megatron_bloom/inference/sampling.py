"""Choosing the next token from the logits: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_bloom.config.schema import GenerateConfig


def choose_tokens(logits: torch.Tensor, config: GenerateConfig, generators: Sequence[torch.Generator]
                  ) -> torch.Tensor:
    """The next token of each row of `logits` [batch, vocab]: the most likely one (greedy), or a draw
    from the softmax at `temperature` over the `top_k` most likely tokens and the smallest set whose
    probability reaches `top_p` (nucleus sampling, Holtzman et al. 2020). Row i draws from `generators[i]`
    (one per prompt), so a prompt's tokens do not depend on the prompts it is batched with."""
    logits = logits.float()  # also for greedy: torch's argmax over bf16 is 4x slower than widening first
    if not config.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    if 0 < config.top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if config.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the better tokens: the best one always stays
        ordered = ordered.masked_fill(before >= config.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
    probs = logits.softmax(dim=-1).cpu()
    draws = [torch.multinomial(row[None], 1, generator=generator) for row, generator in zip(probs, generators)]
    return torch.cat(draws).squeeze(-1).to(logits.device)
