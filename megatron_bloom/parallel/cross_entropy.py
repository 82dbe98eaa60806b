"""The LM head and its loss when the vocabulary is split across tensor-parallel ranks.

The logits are never gathered: each rank holds `[batch, seq, padded_vocab / tp]`, and the cross-entropy
needs only three all-reduces of `[batch, seq]` tensors (the row max, the target's logit and the sum of
exponentials; Megatron-LM's vocab-parallel cross-entropy). Vocabulary padding columns are left out of
the max and the sum, so they are never predicted and receive no gradient, exactly as in the
single-process model.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_bloom.model import cpu_kernels, kernel_choice
from megatron_bloom.model.heads import IGNORE_INDEX
from megatron_bloom.parallel.mappings import (
    all_reduce_,
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    group_size,
)


# Logits handled at a time in float32. On a CPU a chunk's temporaries should stay in a core's L2 cache
# (measured on 2 cores: 0.5 M elements, 2 MB, run the passes 1.5x faster than 2 M); on a GPU the chunks
# only bound the float32 temporaries (128 MB) while keeping the kernel launches few.
_CHUNK_ELEMENTS = {"cpu": 512 * 1024, "cuda": 32 * 1024 * 1024}


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy that keeps no float32 copy of the logits.

    The forward computes each row's log-sum-exp (global over the tp ranks) in float32, chunk by chunk; the
    backward recomputes the softmax from the saved logits and that log-sum-exp, again by chunks, and writes
    the gradient in the logits' dtype. Memory: the logits themselves plus `[tokens]` vectors, where a
    float32 softmax would be twice the bf16 logits again (514 MB per rank for BLOOM-176B at tp 4).
    """

    @staticmethod
    def forward(ctx, logits, target, vocab_start, real_columns, group, fused):
        columns = logits.shape[-1]
        rows = logits.reshape(-1, columns)[:, :real_columns]  # padding columns never count
        ctx.path = _path(rows, fused)
        row_max, sum_exp = _local_max_and_sum_exp(rows, ctx.path)
        if group_size(group) > 1:
            # Each rank summed against its own max m; rescaled to the global max M, the sums add up:
            # sum_k e^(x_k - M) = e^(m - M) sum_k e^(x_k - m). (A slice of padding only has m = -inf, sum 0.)
            local_max = row_max.clone()
            all_reduce_(row_max, group, dist.ReduceOp.MAX)
            sum_exp.mul_(local_max.sub_(row_max).exp_())
            all_reduce_(sum_exp, group)
        log_sum_exp = sum_exp.log_().add_(row_max)
        local_target = target.reshape(-1) - vocab_start
        on_this_rank = (local_target >= 0) & (local_target < real_columns)
        local_target = local_target.masked_fill(~on_this_rank, 0)
        target_logit = torch.zeros_like(row_max)
        if real_columns:
            target_logit = rows.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).float()
            target_logit.masked_fill_(~on_this_rank, 0.0)
        all_reduce_(target_logit, group)
        ctx.real_columns = real_columns
        ctx.save_for_backward(logits, log_sum_exp, on_this_rank, local_target)
        return (log_sum_exp - target_logit).view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, log_sum_exp, on_this_rank, local_target = ctx.saved_tensors
        columns, real_columns = logits.shape[-1], ctx.real_columns
        rows = logits.reshape(-1, columns)
        grad_loss = grad_loss.reshape(-1).float()
        target_grad = -on_this_rank.float().mul_(grad_loss)
        if ctx.path == "cpu_kernel":
            grad = rows.new_empty(rows.shape)  # contiguous, as the kernel writes it
            cpu_kernels.cross_entropy_logits_grad(grad, rows, log_sum_exp, grad_loss, local_target, target_grad,
                                                  real_columns)
            return grad.view(logits.shape), None, None, None, None, None
        grad = torch.empty_like(rows)
        if ctx.path == "compiled":
            for chunk in _compiled_row_chunks(rows):
                _compiled(_write_logits_grad)(grad[chunk], rows[chunk], log_sum_exp[chunk], grad_loss[chunk],
                                              local_target[chunk], target_grad[chunk], real_columns)
            return grad.view(logits.shape), None, None, None, None, None
        _chunked_logits_grad(grad, rows, log_sum_exp, grad_loss, local_target, target_grad, real_columns)
        return grad.view(logits.shape), None, None, None, None, None


def _chunked_logits_grad(grad, rows, log_sum_exp, grad_loss, local_target, target_grad, real_columns) -> None:
    """`cpu_kernels.cross_entropy_logits_grad` through torch's ops, one float32 chunk at a time."""
    grad[:, real_columns:] = 0  # padding columns: never predicted, no gradient
    # d loss / d logit = (softmax - one_hot(target)) * grad_loss
    for chunk in _row_chunks(rows) if real_columns else ():
        probs = torch.sub(rows[chunk, :real_columns], log_sum_exp[chunk, None]).exp_()
        probs.mul_(grad_loss[chunk, None])
        probs.scatter_add_(-1, local_target[chunk, None], target_grad[chunk, None])
        grad[chunk, :real_columns] = probs


def _path(rows: torch.Tensor, fused: bool) -> str:
    """How the passes over the logits run: `model.fused_kernels` picks our CPU kernel for bf16 logits where
    the CPU has AVX512-BF16 and it is the faster there (kernel_choice.py), and compiled kernels on GPUs;
    otherwise torch's ops on chunks."""
    if fused and rows.shape[1] > 0:
        if (rows.device.type == "cpu" and rows.dtype == torch.bfloat16 and rows.stride(1) == 1
                and cpu_kernels.kernels_available()
                and (torch.compiler.is_compiling()  # tracing does not time: the kernel, as before the choice
                     or kernel_choice.choose("cross_entropy", f"{rows.shape[1]} columns",
                                             lambda: _cross_entropy_candidates(rows)) == "ours")):
            return "cpu_kernel"
        if rows.is_cuda and _compiled(_sum_exp) is not None:
            return "compiled"
    return "chunked"


def _cross_entropy_candidates(rows: torch.Tensor) -> dict:
    """Both passes over (a copy of at most 2048 of) these logits' rows, through our kernel and torch's ops."""
    rows = rows[:2048].clone()
    count = rows.shape[0]
    log_sum_exp = torch.full((count,), float(rows.float().amax()) + 10.0)
    grad_loss, target = torch.full((count,), 1.0 / count), torch.zeros(count, dtype=torch.long)
    target_grad, grad = -grad_loss, torch.empty_like(rows)

    def ours():
        cpu_kernels.cross_entropy_max_sum_exp(rows)
        cpu_kernels.cross_entropy_logits_grad(grad, rows, log_sum_exp, grad_loss, target, target_grad, rows.shape[1])

    def chunked():
        _local_max_and_sum_exp(rows, "chunked")
        _chunked_logits_grad(grad, rows, log_sum_exp, grad_loss, target, target_grad, rows.shape[1])
    return {"ours": ours, "torch": chunked}


def _local_max_and_sum_exp(rows: torch.Tensor, path: str) -> tuple:
    """Each row's max over this rank's columns and the sum of e^(x - max) there, both float32 `[rows]`."""
    if path == "cpu_kernel":
        return cpu_kernels.cross_entropy_max_sum_exp(rows)
    if rows.shape[1] == 0:  # a rank whose slice is all padding (a small vocabulary at a large tp)
        nothing = rows.new_zeros(rows.shape[:1], dtype=torch.float32)
        return nothing - float("inf"), nothing
    row_max = rows.amax(dim=-1).float()  # exact in the logits' own dtype
    sum_exp = torch.empty_like(row_max)
    if path == "compiled":
        for chunk in _compiled_row_chunks(rows):
            sum_exp[chunk] = _compiled(_sum_exp)(rows[chunk], row_max[chunk])
        return row_max, sum_exp
    for chunk in _row_chunks(rows):
        # bf16 - fp32 promotes to one fresh float32 chunk: no in-place update of the caller's logits
        sum_exp[chunk] = torch.sub(rows[chunk], row_max[chunk, None]).exp_().sum(dim=-1)
    return row_max, sum_exp


# The same two computations as whole-tensor functions, for torch.compile: on a GPU each becomes one
# kernel that reads the logits once (and writes the gradient once), with no float32 temporaries at all.
# They run on row chunks of fewer than 2^31 elements, so that the kernels index in 32 bits: a row and a
# column come from each element's index by a division, which in 64 bits is a slow software routine (the
# whole [16384, 250880] gradient of bloom-1b1 at micro-batch 8 took 3x the time its memory traffic needs).
_INT32_ELEMENTS = 2**31 - 1


def _sum_exp(rows: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    return torch.exp(rows.float() - row_max[:, None]).sum(dim=-1)


def _logits_grad(rows: torch.Tensor, log_sum_exp: torch.Tensor, grad_loss: torch.Tensor, local_target: torch.Tensor,
                 target_grad: torch.Tensor, real_columns: int) -> torch.Tensor:
    columns = torch.arange(rows.shape[1], device=rows.device)
    probs = torch.exp(rows.float() - log_sum_exp[:, None]) * grad_loss[:, None]
    probs = probs + torch.where(columns == local_target[:, None], target_grad[:, None], 0.0)
    return torch.where(columns < real_columns, probs, 0.0).to(rows.dtype)


def _write_logits_grad(out: torch.Tensor, *args) -> None:
    """`_logits_grad` written into `out` (a chunk of the whole gradient): compiled, the kernel stores its
    result there directly."""
    out.copy_(_logits_grad(*args))


@functools.cache
def _compiled(function):
    """`function` through torch.compile, or None (after one warning) where it cannot be compiled here: the
    chunked eager computation is then used."""
    if importlib.util.find_spec("triton") is None:  # what torch.compile generates GPU kernels with
        warnings.warn("model.fused_kernels: triton is not installed, so the cross-entropy runs unfused.")
        return None
    # Static shapes: the column count is then a constant of the kernel (a division by a constant is a
    # multiplication); the equal row chunks make one compilation per vocabulary-slice width, plus one for
    # a last chunk of another size.
    return torch.compile(function, dynamic=False)


def _row_slices(num_rows: int, step: int) -> Iterator[slice]:
    return (slice(start, min(start + step, num_rows)) for start in range(0, num_rows, step))


def _row_chunks(rows: torch.Tensor) -> Iterator[slice]:
    num_rows, columns = rows.shape
    return _row_slices(num_rows, max(1, _CHUNK_ELEMENTS.get(rows.device.type, _CHUNK_ELEMENTS["cuda"])
                                     // max(columns, 1)))


def _compiled_row_chunks(rows: torch.Tensor) -> Iterator[slice]:
    """Equal row chunks of fewer than 2^31 elements each (the last one may be shorter)."""
    num_rows, columns = rows.shape
    pieces = max(1, -(-num_rows * columns // _INT32_ELEMENTS))
    return _row_slices(num_rows, max(1, min(-(-num_rows // pieces), _INT32_ELEMENTS // max(columns, 1))))


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                                 real_columns: int, group, fused: bool = False) -> torch.Tensor:
    """Per-token cross-entropy `[batch, seq]` from this rank's logits `[batch, seq, vocab_slice]`.

    `vocab_start` is the first vocabulary id of this rank's slice; its first `real_columns` columns are
    real tokens, the rest padding. Targets outside every slice (e.g. -100) give an arbitrary value that
    the caller masks out. `fused` (model.fused_kernels): on a GPU, compile the passes over the logits into
    one kernel each way.
    """
    # Also at tp = 1: chunked float32 passes over the bf16 logits are about twice as fast as
    # `F.cross_entropy(logits.float())`, which keeps a float32 copy and the log-softmax both.
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, real_columns, group, fused)


class VocabParallelLMHead(nn.Module):
    """Logits of this rank's vocabulary slice from its slice of the (tied) embedding matrix."""

    def __init__(self, group, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, hidden_states: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            hidden_states = gather_from_sequence_region(hidden_states, self.group)
        else:
            hidden_states = copy_to_tp_region(hidden_states, self.group)
        return F.linear(hidden_states, embedding_weight)


class VocabParallelCausalLMLoss(nn.Module):
    """Mean next-token cross-entropy over the labels that are not -100, from vocab-parallel logits."""

    def __init__(self, group, vocab_start: int, real_columns: int, fused: bool = False) -> None:
        super().__init__()
        self.group, self.vocab_start, self.real_columns, self.fused = group, vocab_start, real_columns, fused

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        per_token = vocab_parallel_cross_entropy(logits, shifted, self.vocab_start, self.real_columns, self.group,
                                                 self.fused)
        counted = shifted != IGNORE_INDEX
        return (per_token * counted).sum() / counted.sum()


def vocab_parallel_log_probs(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, real_columns: int,
                             group) -> tuple:
    """log p(target) and whether the target is the most likely token, float32 and bool `[rows]`, from this
    rank's slice `[rows, vocab_slice]` of the logits (no gradient): what evaluation scores a continuation by,
    with no rank ever holding the whole vocabulary's logits."""
    rows = logits.reshape(-1, logits.shape[-1])[:, :real_columns]
    row_max, sum_exp = _local_max_and_sum_exp(rows, "chunked")
    if group_size(group) > 1:
        local_max = row_max.clone()
        all_reduce_(row_max, group, dist.ReduceOp.MAX)
        sum_exp.mul_(local_max.sub_(row_max).exp_())
        all_reduce_(sum_exp, group)
    local_target = target.reshape(-1) - vocab_start
    on_this_rank = (local_target >= 0) & (local_target < real_columns)
    target_logit = torch.zeros_like(row_max)
    if real_columns:
        picked = rows.gather(-1, local_target.masked_fill(~on_this_rank, 0).unsqueeze(-1)).squeeze(-1).float()
        target_logit = picked.masked_fill_(~on_this_rank, 0.0)
    if group_size(group) > 1:
        all_reduce_(target_logit, group)
    return target_logit - (sum_exp.log_() + row_max), target_logit >= row_max


def gather_vocab_logits(logits: torch.Tensor, group, vocab_size: int) -> torch.Tensor:
    """The full `[batch, seq, vocab_size]` logits from the ranks' slices (for generation and inspection)."""
    return gather_from_tp_region(logits, group)[..., :vocab_size]
