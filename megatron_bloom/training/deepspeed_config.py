"""The DeepSpeed JSON config, derived from the one `TrainConfig` (batch sizes are defined once, there)."""

from __future__ import annotations

from megatron_bloom.config import TrainConfig
from megatron_bloom.parallel import ParallelState


def gradient_accumulation_steps(config: TrainConfig, dp: int) -> int:
    return config.train.global_batch_size // (config.train.micro_batch_size * dp)


def deepspeed_config(config: TrainConfig, state: ParallelState) -> dict:
    return {
        "train_batch_size": config.train.global_batch_size,
        "train_micro_batch_size_per_gpu": config.train.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(config, state.dp),
        "gradient_clipping": config.optim.clip_grad,
        "zero_optimization": {"stage": config.zero.stage},
        # No separate per-tensor inf/NaN pass of ZeRO 2 in bf16 (hundreds of small kernels and a host sync a
        # step): a non-finite gradient makes the global norm, so the clipped gradients, non-finite, and
        # SkippingAdamW skips that step on every rank (training/optimizer.py). At ZeRO 1 DeepSpeed's BF16
        # optimizer skips on a non-finite norm itself.
        # immediate_grad_update (GPUs): the BF16 optimizer (ZeRO 1) adds each bf16 gradient into its float32
        # sum as soon as backward makes it and drops it, instead of keeping it, zeroing it before the next
        # micro-batch and having autograd add into the zeros (bloom-1b1 on an H100: 1% faster micro-batches,
        # 2 GiB less at the peak). On CPUs the float32 copies it makes of each gradient during backward land
        # at the activation peak and malloc keeps them: 136 MB more resident memory at bloom-small.
        "bf16": {"enabled": config.precision == "bf16", "check_grad_overflow": False,
                 "immediate_grad_update": state.device.type == "cuda"},
        # Dynamic loss scaling for fp16 (Micikevicius et al. 2018): overflowing steps are skipped.
        "fp16": {"enabled": config.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # bf16 gradients are summed over the micro-batches and reduced over the data-parallel replicas in
        # float32, as Megatron-LM does for bf16 (a bf16 sum rounds at every micro-batch). DeepSpeed can do
        # it from ZeRO 1 on (at ZeRO 1 through its BF16 optimizer); without ZeRO it has no such mode.
        **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
           if config.precision == "bf16" and config.zero.stage >= 1 else {}),
        # Without sequence parallelism every tp rank of a stage holds the same activations, and DeepSpeed's
        # pipeline sends 1/tp of them from each and all-gathers them on the next stage. With it, each tp rank
        # holds its own 1/tp of the sequence and sends just that to its peer: DeepSpeed must not split it again.
        "pipeline": {"pipe_partitioned": not config.parallel.sequence_parallel,
                     "grad_partitioned": not config.parallel.sequence_parallel},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
