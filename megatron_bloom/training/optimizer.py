"""AdamW with decoupled weight decay (biases and LayerNorm weights excluded) and Megatron's LR schedule."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from megatron_bloom.config.schema import OptimConfig, SchedConfig
from megatron_bloom.parallel import ParallelState


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that skips the whole update when a gradient is not finite on any rank.

    DeepSpeed (every engine, every ZeRO stage) ends an iteration in this `step`, after clipping: a NaN or
    inf loss or gradient anywhere makes the clipped gradients non-finite, every rank sees the same
    all-reduced flag, and every rank skips together, so the weights stay consistent. `skipped` tells the
    trainer what happened.
    """

    skipped = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        # A NaN or inf anywhere makes a norm non-finite: one fused pass, no per-element boolean tensors.
        norms = torch._foreach_norm(grads) if grads else [torch.zeros(())]
        finite = torch.isfinite(torch.stack(norms).float()).all().float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        self.skipped = not bool(finite.item())
        if self.skipped:
            return None
        return super().step(closure)


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float, state: ParallelState) -> torch.Tensor:
    """Scale the gradients so that their global L2 norm is at most `max_norm`; returns the norm before.

    The norm covers the whole model replica: every pipeline stage and every tensor-parallel slice, each
    parameter counted once (a replicated one on tp rank 0 only, the tied embedding's copy on the last
    stage not at all); gradients are already equal across data-parallel replicas. (DeepSpeed's own fp32
    clipping without ZeRO sums over the tp group alone, so in a pipeline each stage clipped by its own norm.)
    """
    grads, squares = [], torch.zeros((), dtype=torch.float32, device=state.device)
    for param in parameters:
        if param.grad is None:
            continue
        grads.append(param.grad)
        counted = state.tp_rank == 0 or getattr(param, "tensor_model_parallel", False)
        if counted and not getattr(param, "ds_pipe_replicated", False):
            squares += param.grad.detach().float().square().sum()
    for size, group in ((state.tp, state.tp_group), (state.pp, state.pp_group)):
        if size > 1:
            dist.all_reduce(squares, group=group)
    norm = squares.sqrt()
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # DeepSpeed's and Megatron's coefficient
    if grads:
        torch._foreach_mul_(grads, scale)
    return norm


def build_optimizer(model: nn.Module, optim: OptimConfig) -> SkippingAdamW:
    """AdamW (Loshchilov & Hutter 2019). One-dimensional parameters (biases, LayerNorm gains and biases)
    are not decayed, as in Megatron-LM."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return SkippingAdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=True)


def learning_rate(iteration: int, optim: OptimConfig, sched: SchedConfig, train_iters: int) -> float:
    """Linear warmup to `optim.lr`, then cosine / linear decay to `optim.min_lr` over the decay iterations
    (Megatron-LM's schedule), or constant."""
    if sched.warmup_iters and iteration < sched.warmup_iters:
        return optim.lr * (iteration + 1) / sched.warmup_iters
    if sched.decay_style == "constant":
        return optim.lr
    decay_iters = sched.decay_iters or train_iters
    span = max(1, decay_iters - sched.warmup_iters)
    ratio = min(1.0, max(0.0, (iteration - sched.warmup_iters) / span))
    if sched.decay_style == "linear":
        return optim.lr - (optim.lr - optim.min_lr) * ratio
    return optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, sched: SchedConfig,
                    train_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda iteration: learning_rate(iteration, optim, sched, train_iters) / optim.lr)
