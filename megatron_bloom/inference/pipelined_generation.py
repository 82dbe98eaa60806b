"""Generation at pp > 1: pipelined decoding over a ring of stages.

A batch of prompts is split into micro-batches (`generate.micro_batches`, default pp), each with its own
KV cache on every stage (for that stage's blocks alone). Every stage walks the same (step, micro-batch)
order. The first stage embeds the micro-batch's tokens and sends its hidden states on; the last runs the
head, picks the next tokens (`next_tokens`: one choice for its tensor-parallel group) and sends them round
to the first stage, which starts that micro-batch's next step. While micro-batch m's tokens travel back,
the stages work on the other micro-batches: with pp micro-batches every stage is busy at once, as in the
pipelined inference of DeepSpeed-Inference and Megatron-LM's server, instead of one stage at a time.

With the tokens goes a flag, "this micro-batch goes on"; the first stage passes both down to the stages
before the last, so every stage knows when a micro-batch has ended (all its rows at EOS) without waiting
for the others. Messages between stages: the hidden states `[rows, positions, hidden]` (each tp rank sends
its own copy to its peer; sequence parallelism does not apply to one position at a time), and the
`[1 + rows]` flag-and-tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from megatron_bloom.config.schema import GenerateConfig
from megatron_bloom.data.padding import padded_batch
from megatron_bloom.inference.generation import GenerationTimes, StopCheck, next_tokens, until_eos
from megatron_bloom.model import KVCache, ModelConfig
from megatron_bloom.parallel import ParallelState
from megatron_bloom.parallel.p2p import StageLinks


@dataclass
class MicroBatchFlow:
    """One micro-batch's decoding state on this stage."""

    rows: range  # its rows of the batch
    step_input: torch.Tensor  # the token ids of its next forward: the prompts, then the last new tokens
    attention_mask: torch.Tensor  # over all its positions so far
    cache: KVCache
    finished: torch.Tensor
    tokens: List[torch.Tensor] = field(default_factory=list)  # the new tokens of each step (last stage)
    running: bool = True


def micro_batch_rows(rows: int, micro_batches: int) -> List[range]:
    """`rows` split into at most `micro_batches` contiguous, nearly equal parts."""
    parts = min(rows, micro_batches)
    bounds = [rows * part // parts for part in range(parts + 1)]
    return [range(bounds[part], bounds[part + 1]) for part in range(parts)]


@torch.no_grad()
def generate_batch_pipelined(stage, prompts: Sequence[List[int]], model_config: ModelConfig,
                             config: GenerateConfig, state: ParallelState, generators: Sequence[torch.Generator],
                             times: Optional[GenerationTimes] = None,
                             on_step: Optional[Callable[[torch.Tensor, torch.Tensor, range], None]] = None,
                             stopped: Optional[StopCheck] = None) -> Optional[List[List[int]]]:
    """The new tokens of each prompt (up to and including EOS) on the last stage, None on the others.
    `on_step(tokens, running, rows)` sees each micro-batch's tokens on the last stage; `stopped` (as for
    `generate_batch`) ends rows there besides EOS."""
    links = StageLinks(state)
    pad_id = model_config.pad_token_id if model_config.pad_token_id is not None else 0
    eos_id, steps = model_config.eos_token_id, config.max_new_tokens
    dtype = next(stage.parameters()).dtype
    flows = []
    for rows in micro_batch_rows(len(prompts), config.micro_batches or state.pp):
        input_ids, mask = padded_batch([prompts[row] for row in rows], pad_id, left=True)
        flows.append(MicroBatchFlow(rows, input_ids.to(state.device), mask.to(state.device),
                                    stage.new_cache(input_ids.shape[1] + steps),
                                    torch.zeros(len(rows), dtype=torch.bool, device=state.device)))
    started = prompt_done = time.perf_counter()
    for step in range(steps):
        for flow in flows:
            if not flow.running:
                continue
            size = len(flow.rows)
            if step > 0 and not links.is_last:  # does it go on, and with which tokens
                control = links.receive((1 + size,), torch.long, links.last_rank if links.is_first
                                        else links.previous_rank)
                if links.stage + 1 < links.stages - 1:  # pass it on, up to the stage before the last
                    links.send(control, links.next_rank)
                if not bool(control[0]):
                    flow.running = False
                    continue
                _advance(flow, control[1:])
            inputs = flow.step_input if links.is_first else links.receive(
                stage.hidden_shape(size, flow.step_input.shape[1]), dtype, links.previous_rank)
            if not links.is_last:
                links.send(stage(inputs, flow.step_input, flow.attention_mask, cache=flow.cache), links.next_rank)
                continue
            output = stage(inputs, flow.step_input, flow.attention_mask, cache=flow.cache, last_positions=1)
            row_generators = [generators[row] for row in flow.rows] if config.do_sample else ()
            tokens = next_tokens(output.logits[:, -1], model_config, config, state, row_generators)
            tokens = tokens.masked_fill(flow.finished, pad_id)
            if on_step is not None:
                on_step(tokens, ~flow.finished, flow.rows)
            if times is not None and step > 0:
                times.decode_tokens += int((~flow.finished).sum())
            flow.tokens.append(tokens)
            if eos_id is not None:
                flow.finished |= tokens == eos_id
            if stopped is not None:
                flow.finished |= stopped(torch.stack(flow.tokens, dim=1), flow.rows)
            goes_on = step + 1 < steps and not bool(flow.finished.all())
            if step + 1 < steps:  # the ring: back to the first stage
                links.send(torch.cat([tokens.new_tensor([int(goes_on)]), tokens]), links.first_rank)
            flow.running = goes_on
            _advance(flow, tokens)
        if step == 0:
            prompt_done = time.perf_counter()
    links.flush()
    if not links.is_last:
        return None
    if times is not None:
        times.batches += 1
        times.first_token_s += prompt_done - started
        times.decode_s += time.perf_counter() - prompt_done
    completions: List[List[int]] = [[] for _ in prompts]
    for flow in flows:
        for row, tokens in zip(flow.rows, torch.stack(flow.tokens, dim=1).tolist()):
            completions[row] = until_eos(tokens, eos_id)
    return completions


def _advance(flow: MicroBatchFlow, tokens: torch.Tensor) -> None:
    """The micro-batch's next forward takes `tokens`, one more position."""
    flow.step_input = tokens[:, None]
    flow.attention_mask = torch.cat([flow.attention_mask, torch.ones_like(flow.attention_mask[:, :1])], dim=1)
