"""Memory and communication of evaluation and generation at the config's tp x pp layout (`mbloom-eval`,
`mbloom-generate`), per rank of each stage: no gradients or optimizer state, only the weights, the KV
cache and the activations of one forward.

    weights      the stage's parameters per tp rank (`stage_parameters`) x w
    KV cache     generation: 2 (keys, values) x blocks x b x S x h / t x w, for `generate.batch_size`
                 sequences of S = model.seq_length positions, prompt and new tokens together
    activations  evaluation: one micro-batch of `eval.micro_batch_size` x S in flight per stage at a time;
                 the block's widest tensors (the 4h MLP input and output, q/k/v, the scores
                 a S^2 / t per sequence) and, on the last stage, the vocab-parallel logits and their float32
                 log-probabilities, S b V / t (w + 4)
Communication per generated token, per rank: each stage boundary carries b h w of hidden states and
(1 + b) 8 bytes of tokens and flag; each block all-reduces twice b h w over tp, and the last stage
gathers b V / t float32 logits (generation.py, pipelined_generation.py).
"""

from __future__ import annotations

from typing import List

from megatron_bloom.config import TrainConfig
from megatron_bloom.planner.communication import all_reduce, gather
from megatron_bloom.planner.memory import GB, WEIGHT_BYTES, stage_parameters


def inference_plan(config: TrainConfig) -> List[dict]:
    """Per stage: GB per rank for evaluation and generation, and bytes sent per generated token."""
    model, t, pp = config.model, config.parallel.tp, config.parallel.pp
    w = WEIGHT_BYTES[config.precision]
    h, s, a = model.hidden_size, model.seq_length, model.num_heads
    vocab = model.padded_vocab_size(t) / t
    eval_rows, generate_rows = config.eval.micro_batch_size, config.generate.batch_size
    plans = []
    for stage in stage_parameters(config):
        last = stage.stage == pp - 1
        weights = stage.params_per_rank * w
        block_peak = eval_rows * s * (h * (3 + 4 + 4) / t * w + a * s / t * 4)  # q/k/v, 4h in and out, scores
        logits = eval_rows * s * vocab * (w + 4) if last else 0.0
        kv_cache = 2 * stage.blocks * generate_rows * s * h / t * w
        per_token = generate_rows * h * w
        sent = (0 if last else per_token) + (0 if pp == 1 or stage.stage == pp - 2 else (1 + generate_rows) * 8)
        sent += stage.blocks * 2 * all_reduce(per_token, t) + (gather(generate_rows * vocab * t * 4, t) if last else 0)
        plans.append({"stage": stage.stage, "blocks": stage.blocks,
                      "eval_gb": round((weights + eval_rows * s * h * w * 2 + block_peak + logits) / GB, 3),
                      "generate_gb": round((weights + kv_cache) / GB, 3),
                      "kv_cache_gb": round(kv_cache / GB, 3),
                      "bytes_per_generated_token": int(sent)})
    return plans
