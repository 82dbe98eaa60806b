"""Decoding with a KV cache, the whole model on each rank (pp = 1; `pipelined_generation.py` runs pp > 1).

Prompts are left-padded into a batch; the prompt runs once, then each new token costs one position (the
cache holds the keys and values of the earlier ones). A sequence stops at the model's EOS token or after
`generate.max_new_tokens`. Tensor-parallel ranks gather the full vocabulary's logits and take the same
token. On CPUs in bf16 the linear layers and the LM head are packed once for fast decoding
(`prepare_for_inference`). `text_generation.py` is the command around it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, TextIO

import torch
import torch.distributed as dist

from megatron_bloom.config.schema import GenerateConfig
from megatron_bloom.data.padding import padded_batch
from megatron_bloom.errors import UserError
from megatron_bloom.inference.sampling import choose_tokens
from megatron_bloom.model import KVCache, ModelConfig, cpu_kernels
from megatron_bloom.model.attention import BloomAttention, decode_kernel_chosen
from megatron_bloom.model.heads import TiedLMHead
from megatron_bloom.model.inference_linear import pack_linears, packing_available
from megatron_bloom.parallel import ParallelState
from megatron_bloom.parallel.cross_entropy import gather_vocab_logits


@dataclass
class GenerationTimes:
    """Where generation's time went, summed over batches: the prompts' steps (each batch's first token)
    and the one-token steps after them."""

    batches: int = 0
    first_token_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0  # tokens of the one-token steps, over the batch rows still generating

    def summary(self) -> str:
        rate = self.decode_tokens / self.decode_s if self.decode_s else float("nan")
        return (f"time to first token {self.first_token_s / max(self.batches, 1) * 1000:.0f} ms per batch, "
                f"then {rate:,.1f} tokens/s")


class TextStream:
    """Prints each row's completion while it grows: after every step, one JSON line `{"index": i, "text":
    piece}` per row whose decoded text grew. A byte-level token can end inside a UTF-8 character; such a
    row's text waits for the token that completes it, so the pieces of a row join into its completion."""

    def __init__(self, tokenizer, first_index: int, rows: int, out: TextIO = sys.stdout) -> None:
        self.tokenizer, self.first_index, self.out = tokenizer, first_index, out
        self.tokens: List[List[int]] = [[] for _ in range(rows)]
        self.shown = [""] * rows

    def __call__(self, tokens: torch.Tensor, running: torch.Tensor, rows: Optional[range] = None) -> None:
        """One step's tokens of the batch's `rows` (default: all of them)."""
        rows = rows if rows is not None else range(len(self.tokens))
        for row, token, active in zip(rows, tokens.tolist(), running.tolist()):
            if active:
                self.tokens[row].append(token)
                self._show(row, final=False)
        self.out.flush()

    def close(self) -> None:
        for row in range(len(self.tokens)):
            self._show(row, final=True)
        self.out.flush()

    def _show(self, row: int, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=False)
        if text.endswith("\ufffd") and not final:  # an unfinished character
            return
        if len(text) > len(self.shown[row]) and text.startswith(self.shown[row]):
            self.out.write(json.dumps({"index": self.first_index + row, "text": text[len(self.shown[row]):]},
                                      ensure_ascii=False) + "\n")
            self.shown[row] = text


# (new tokens so far [rows, steps], the rows' indices among the prompts) -> which rows are done
StopCheck = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


@torch.no_grad()
def generate_batch(model, prompts: Sequence[List[int]], model_config: ModelConfig, config: GenerateConfig,
                   state: ParallelState, generators: Sequence[torch.Generator],
                   times: Optional[GenerationTimes] = None,
                   on_step: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
                   decode_model=None, stopped: Optional[StopCheck] = None) -> List[List[int]]:
    """The new tokens of each prompt (up to and including EOS), the whole model on this rank (pp = 1;
    `pipelined_generation.py` is pp > 1's); `generators`: one per prompt; `times`, when given, is added to;
    `on_step(tokens, running)` sees each step's tokens and which rows were still generating them;
    `decode_model` (the same model, compiled) runs the one-token steps when given; `stopped(tokens, rows)`,
    given the new tokens so far `[rows, steps]`, says which rows are done (a stop sequence), besides EOS."""
    pad_id = model_config.pad_token_id if model_config.pad_token_id is not None else 0
    eos_id = model_config.eos_token_id
    input_ids, mask = padded_batch(prompts, pad_id, left=True)  # every prompt ends where generation starts
    input_ids, mask = input_ids.to(state.device), mask.to(state.device)
    cache = KVCache(model_config.num_layers, input_ids.shape[1] + config.max_new_tokens)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=state.device)
    generated = []
    step_input = input_ids
    started = time.perf_counter()
    for step in range(config.max_new_tokens):
        forward = decode_model if step > 0 and decode_model is not None else model
        logits = forward(step_input, attention_mask=mask, cache=cache, last_positions=1).logits[:, -1]
        tokens = next_tokens(logits, model_config, config, state, generators).masked_fill(finished, pad_id)
        if on_step is not None:
            on_step(tokens, ~finished)
        if times is not None:
            now = time.perf_counter()
            if step == 0:
                times.batches += 1
                times.first_token_s += now - started
            else:
                times.decode_s += now - started
                times.decode_tokens += int((~finished).sum())
            started = now
        generated.append(tokens)
        if eos_id is not None:
            finished |= tokens == eos_id
        if stopped is not None:
            finished |= stopped(torch.stack(generated, dim=1), range(len(prompts)))
        if bool(finished.all()):
            break
        step_input = tokens[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    columns = torch.stack(generated, dim=1).tolist()
    return [until_eos(row, eos_id) for row in columns]


def next_tokens(logits: torch.Tensor, model_config: ModelConfig, config: GenerateConfig, state: ParallelState,
                generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Each row's next token from its last position's logits (this tp rank's slice of the vocabulary): the
    same on every rank of the tensor-parallel group."""
    if state.tp > 1:  # each rank holds a slice of the vocabulary
        logits = gather_vocab_logits(logits, state.tp_group, model_config.vocab_size)
    tokens = choose_tokens(logits, config, generators)
    if state.tp > 1:  # one choice for the whole tensor-parallel group, whatever rounding did
        dist.broadcast(tokens, src=dist.get_global_rank(state.tp_group, 0), group=state.tp_group)
    return tokens


def until_eos(tokens: List[int], eos_id: Optional[int]) -> List[int]:
    return tokens[: tokens.index(eos_id) + 1] if eos_id is not None and eos_id in tokens else tokens


def prepare_for_inference(model, state: ParallelState, dtype: torch.dtype, batch_size: int,
                          quantize: Optional[str] = None, compile: bool = False):
    """Evaluation mode; on CPUs in bf16, the linear layers and the LM head packed (each decoding step reads
    every weight once for `batch_size` rows: see model/inference_linear.py) and, where the CPU has
    AVX512-BF16 and it is the faster there, single-query attention through our kernel (model/cpu_kernels.py,
    model/kernel_choice.py); or with `quantize="int8"` their weights in int8 (CPU, tp 1). Returns the model
    that runs the one-token steps: with `compile`, the (packed) model through `torch.compile` (see
    `compiled_decoding`), else None (the model itself)."""
    model.eval()
    if quantize is not None and (state.device.type != "cpu" or state.tp > 1):
        raise UserError(f"generate.quantize={quantize} runs on CPUs at parallel.tp=1 (this run: "
                        f"{state.device.type}, tp={state.tp}).")
    if compile and (state.tp > 1 or state.pp > 1 or quantize is not None):
        raise UserError("generate.compile=true runs at parallel.tp=1 and parallel.pp=1 without generate.quantize.")
    if state.device.type == "cpu" and dtype == torch.bfloat16 and cpu_kernels.kernels_available():
        for module in model.modules():
            if isinstance(module, BloomAttention):
                module.cpu_decode_kernel = (cpu_kernels.attention_fits(module.head_dim)
                                            and decode_kernel_chosen(module, batch_size, dtype))
    if quantize is not None or packing_available(state.device, dtype):
        # Packed before compiling too: the prompt's step runs eagerly, and is 6% faster with them.
        pack_linears(model, batch_size, quantize)
        # tp = 1 (a vocab-parallel head keeps its own matmul), and the stage holding the head
        if isinstance(model.lm_head, TiedLMHead) and model.transformer.word_embeddings is not None:
            model.lm_head.pack(model.transformer.word_embeddings.weight, batch_size, quantize)
    return compiled_decoding(model) if compile else None


def compiled_decoding(model) -> Callable:
    """`model` through `torch.compile`: shapes dynamic, so one compilation serves every cache length; weights
    frozen into the graph (inductor's freezing, which on CPUs packs any unpacked linear for oneDNN and fuses
    the small ops between the products). The option is read when compiling: `torch.compile(options=...)`
    does not pass it on, hence the patch around each call. The returned function serves `model` as it is
    now (evaluation mode, these weights)."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(model, dynamic=True)

    def decode(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return decode
