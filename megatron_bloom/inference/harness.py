"""EleutherAI's lm-evaluation-harness on our model, at any tp x pp x dp layout, with no conversion.

`HarnessModel` is an lm-eval language model (`lm_eval.api.model.TemplateLM`, registered as
`megatron_bloom`): lm-eval builds each task's requests and computes its metrics; we answer the requests.

- `loglikelihood` (lm-eval tokenizes: context and continuation encoded together, then split) and
  `loglikelihood_rolling` (lm-eval's disjoint windows of at most `max_length` tokens, the first after the
  prefix token) run in batches sorted longest first, as lm-eval's `hf` model does. A request longer than
  `max_length + 1` tokens loses its oldest context tokens (left truncation). Each continuation token's
  log-probability is computed from the vocabulary-parallel logits without gathering them
  (`vocab_parallel_log_probs`).
- `generate_until` runs our KV-cache generation (greedy unless the task samples), contexts left-truncated
  to `max_length - max_gen_toks`; a row stops generating once its text holds a stop sequence (or at the
  end-of-text token), and each completion is cut at the first stop sequence, as in lm-eval's `hf` model.
- The end-of-text token is the model's EOS (`</s>`); an empty context is conditioned on the prefix token,
  BLOOM's BOS `<s>` where the tokenizer has it (as the `hf` model does), else EOS.
- Data-parallel replicas are lm-eval's ranks: lm-eval splits the requests among them and gathers the
  results; within a replica every tp and pp rank answers the same requests in the same order, and the
  results, which the last pipeline stage holds, are shared with the other stages.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from megatron_bloom.checkpoint.layout import (
    PRECISION_DTYPES,
    checkpoint_tokenizer,
    read_metadata,
    resolve_checkpoint,
)
from megatron_bloom.checkpoint.weights import load_model
from megatron_bloom.config.schema import GenerateConfig
from megatron_bloom.data.padding import padded_batch
from megatron_bloom.data.tokenizer import load_tokenizer
from megatron_bloom.errors import UserError
from megatron_bloom.inference.generation import generate_batch
from megatron_bloom.inference.pipeline import MicroBatch, from_last_stage, has_outputs, run_micro_batches
from megatron_bloom.inference.pipelined_generation import generate_batch_pipelined
from megatron_bloom.model import ModelConfig
from megatron_bloom.parallel import ParallelState
from megatron_bloom.parallel.cross_entropy import vocab_parallel_log_probs
from megatron_bloom.parallel.parallelize import vocab_slice

# lm-eval fills its registry of built-in models (`hf`, ...) only while the registry is empty: before ours.
importlib.import_module("lm_eval.models")

Request = Tuple[Any, List[int], List[int]]  # (lm-eval's request key, context tokens, continuation tokens)


@register_model("megatron_bloom")
class HarnessModel(TemplateLM):
    """Our model (any layout, already loaded and in evaluation mode) behind lm-eval's model interface."""

    def __init__(self, model, state: ParallelState, tokenizer, model_config: ModelConfig, max_length: int,
                 batch_size: int = 8, max_gen_toks: int = 256) -> None:
        super().__init__()
        self.model, self.state, self.tokenizer_, self.config = model, state, tokenizer, model_config
        self.max_length, self.batch_size, self.max_gen_toks = max_length, batch_size, max_gen_toks
        self._rank, self._world_size, self._device = state.dp_rank, state.dp, state.device
        self.pad_id = model_config.pad_token_id if model_config.pad_token_id is not None else 0
        self.vocab_start, self.real_columns = vocab_slice(model_config, state)
        eos = model_config.eos_token_id
        self._eot = eos if eos is not None else tokenizer.token_to_id("</s>")
        bos = tokenizer.token_to_id("<s>")
        self._prefix = bos if bos is not None else self._eot

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "HarnessModel":
        """For lm-eval's own command line, in one process: `lm_eval --model megatron_bloom --model_args
        checkpoint=DIR[,tokenizer=TOK][,precision=fp32|bf16][,max_length=N] --batch_size N --tasks ...`
        (at tp x pp x dp layouts, `mbloom-eval eval.harness.tasks=[...]`)."""
        arguments = lm_eval_utils.simple_parse_args_string(arg_string)
        arguments.update({key: value for key, value in (additional_config or {}).items() if value is not None})
        if "checkpoint" not in arguments:
            raise UserError("--model megatron_bloom needs --model_args checkpoint=DIR (a checkpoint of ours).")
        directory = resolve_checkpoint(Path(arguments["checkpoint"]))
        metadata = read_metadata(directory)
        tokenizer_path = arguments.get("tokenizer") or checkpoint_tokenizer(directory, metadata)
        if tokenizer_path is None:
            raise UserError(f"{directory} keeps no tokenizer: give --model_args checkpoint=...,tokenizer=TOK.")
        state = ParallelState.single()
        dtype = PRECISION_DTYPES[str(arguments.get("precision", "fp32"))]
        model, metadata = load_model(directory, state, dtype)
        batch_size = arguments.get("batch_size")
        return cls(model.eval(), state, load_tokenizer(tokenizer_path), metadata.model,
                   max_length=int(arguments.get("max_length") or metadata.model.seq_length),
                   batch_size=int(batch_size) if str(batch_size or "").isdigit() else 16)

    # --- tokens ----------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def tokenizer_name(self) -> str:
        return "megatron_bloom"

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> List[int]:
        ids = self.tokenizer_.encode(string, add_special_tokens=False).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer_.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # --- scoring -----------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: List[Request], disable_tqdm: bool = False, **kwargs
                              ) -> List[Tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per request.
        Requests whose model input is the same (a context whose continuations differ only in their last
        token: lm-eval's `hf` model caches those logits too) share one row of a batch."""
        rows: Dict[Tuple[int, ...], List[int]] = {}  # each model input, and the requests it serves
        for index in sorted(range(len(requests)), key=lambda i: (-len(requests[i][1]) - len(requests[i][2]),
                                                                 tuple(requests[i][1] + requests[i][2]))):
            context, continuation = requests[index][1], requests[index][2]
            rows.setdefault(tuple((context + continuation)[-(self.max_length + 1):][:-1]), []).append(index)
        inputs = list(rows)
        batches = [inputs[start: start + self.batch_size] for start in range(0, len(inputs), self.batch_size)]
        micro_batches = (MicroBatch(*padded_batch(batch, self.pad_id)) for batch in batches)
        results: Dict[int, Tuple[float, bool]] = {}
        with torch.no_grad():  # outputs come on the last stage, in order; the other stages yield none
            for batch, (_, output) in zip(batches, run_micro_batches(self.model, self.state, micro_batches)):
                results.update(self._scores(requests, [(len(row), rows[row]) for row in batch], output.logits))
        results = from_last_stage(results if has_outputs(self.state) else None, self.state)
        return [results[index] for index in range(len(requests))]

    def _scores(self, requests: List[Request], rows: List[Tuple[int, List[int]]], logits: torch.Tensor
                ) -> Dict[int, Tuple[float, bool]]:
        """The continuation tokens' log-probabilities from the logits of their positions: the last
        `len(continuation)` positions of a (right-padded) row of that length predict them. `rows`: each row's
        length and the requests it serves."""
        positions, targets, owners = [], [], []
        for row, (length, served) in enumerate(rows):
            for index in served:
                continuation = requests[index][2]
                positions += [(row, column) for column in range(length - len(continuation), length)]
                targets += continuation
                owners += [index] * len(continuation)
        scores = {index: (0.0, True) for _, served in rows for index in served}  # nothing to score: 0
        if not positions:
            return scores
        row_numbers, columns = zip(*positions)
        selected = logits[torch.tensor(row_numbers), torch.tensor(columns)]
        log_probs, greedy = vocab_parallel_log_probs(selected, torch.tensor(targets, device=selected.device),
                                                     self.vocab_start, self.real_columns, self.state.tp_comm)
        for index, log_prob, is_greedy in zip(owners, log_probs.tolist(), greedy.tolist()):
            total, all_greedy = scores[index]
            scores[index] = (total + log_prob, all_greedy and is_greedy)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            rolling = lm_eval_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                              prefix_token=self.prefix_token_id,
                                                              max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_eval_utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    # --- generation --------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Each request's completion: batches of requests with the same generation arguments, longest
        context first."""
        groups: Dict[str, List[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        completions: Dict[int, str] = {}
        for indices in groups.values():
            arguments = dict(requests[indices[0]].args[1])
            until = arguments.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen_toks = int(arguments.pop("max_gen_toks", self.max_gen_toks))
            config = GenerateConfig(max_new_tokens=max_gen_toks, do_sample=bool(arguments.get("do_sample", False)),
                                    temperature=float(arguments.get("temperature", 1.0) or 1.0),
                                    top_k=int(arguments.get("top_k", 0) or 0),
                                    top_p=float(arguments.get("top_p", 1.0) or 1.0))
            contexts = {index: self.tok_encode(requests[index].args[0],
                                               left_truncate_len=self.max_length - max_gen_toks) for index in indices}
            ordered = sorted(indices, key=lambda index: -len(contexts[index]))
            for start in range(0, len(ordered), self.batch_size):
                batch = ordered[start: start + self.batch_size]
                generated = self._generate([contexts[index] for index in batch], config, until)
                for index, tokens in zip(batch, generated):
                    completions[index] = cut_at_stops(self.tok_decode(tokens), until)
        for index, request in enumerate(requests):
            self.cache_hook.add_partial("generate_until", request.args, completions[index])
        return [completions[index] for index in range(len(requests))]

    def _generate(self, prompts: List[List[int]], config: GenerateConfig, until: List[str]) -> List[List[int]]:
        """The new tokens of each prompt; a row ends at EOS or once its text holds a stop sequence."""
        generators = [torch.Generator().manual_seed(config.seed + offset) for offset in range(len(prompts))]
        stops = [stop for stop in until if stop]

        def stopped(tokens: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
            texts = [self.tok_decode(row) for row in tokens.tolist()]
            return torch.tensor([any(stop in text for stop in stops) for text in texts], device=tokens.device)

        with torch.no_grad():
            if self.state.pp > 1:
                tokens = generate_batch_pipelined(self.model, prompts, self.config, config, self.state, generators,
                                                  stopped=stopped if stops else None)
            else:
                tokens = generate_batch(self.model, prompts, self.config, config, self.state, generators,
                                        stopped=stopped if stops else None)
        return from_last_stage(tokens if has_outputs(self.state) else None, self.state)

    # --- data parallelism: lm-eval's ranks are the data-parallel replicas ----------------------------------

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.state.dp == 1:
            return tensor
        gathered = [torch.empty_like(tensor) for _ in range(self.state.dp)]
        dist.all_gather(gathered, tensor, group=self.state.dp_group)
        return torch.stack(gathered) if tensor.dim() == 0 else torch.cat(gathered)

    def gather_object(self, obj, dst: int = 0):
        if self.state.dp == 1:
            return [obj]
        gathered = [None] * self.state.dp
        dist.all_gather_object(gathered, obj, group=self.state.dp_group)
        return gathered if self.state.dp_rank == dst else None

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first of each stop sequence, in turn (as lm-eval's `hf` model cuts)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text
