"""Pipelined decoding at pp 2 against running the stages one after another, in one invocation.

    python benchmarks/pipelined_generation.py [--model bloom-small] [--batch 8] [--new-tokens 64]
                                              [--dtype fp32] [--repeats 3]

Two ranks on gloo each hold one stage of the same random model (a `from-hf` checkpoint of a random
`transformers` BLOOM). Both decode the same left-padded batch of mixed-length prompts greedily for exactly
`--new-tokens` tokens (EOS off), as `mbloom-generate` does at parallel.pp=2: with generate.micro_batches=1
(the whole batch goes through stage 0, then stage 1: one stage works at a time) and with
generate.micro_batches=2 (two micro-batches take turns, so both stages work at once). The runs alternate;
the best of `--repeats` each is reported, with the ratio and whether the tokens are the same.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("fp32", "bf16")


def rank_main(rank: int, port: int, args, checkpoint: str, output: str) -> None:
    import dataclasses

    import torch.distributed as dist

    from megatron_bloom.checkpoint.layout import PRECISION_DTYPES
    from megatron_bloom.checkpoint.weights import load_model
    from megatron_bloom.config.schema import GenerateConfig
    from megatron_bloom.inference.pipelined_generation import generate_batch_pipelined
    from megatron_bloom.parallel import ParallelState

    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    state = ParallelState.create(tp=1, pp=2, dp=1)
    stage, metadata = load_model(Path(checkpoint), state, PRECISION_DTYPES[args.dtype])
    stage.eval()
    config = dataclasses.replace(metadata.model, eos_token_id=None)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.linspace(8, 64, args.batch).long().tolist()
    prompts = [torch.randint(4, config.vocab_size, (length,), generator=generator).tolist() for length in lengths]
    results = {}
    for micro_batches in (1, args.micro_batches) * (args.repeats + 1):  # the first of each warms up; then alternating
        settings = GenerateConfig(max_new_tokens=args.new_tokens, micro_batches=micro_batches)
        dist.barrier()
        started = time.perf_counter()
        tokens = generate_batch_pipelined(stage, prompts, config, settings, state, ())
        dist.barrier()
        elapsed = time.perf_counter() - started
        best = results.get(micro_batches, {}).get("seconds", float("inf"))
        results[micro_batches] = {"seconds": min(elapsed, best), "tokens": tokens}
    if rank == 1:  # the last stage holds the tokens
        Path(output).write_text(json.dumps({str(k): v for k, v in results.items()}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bloom-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batches", type=int, default=2, help="of the pipelined runs (generate.micro_batches)")
    args = parser.parse_args()
    import torch.multiprocessing as mp
    import transformers

    from megatron_bloom.config import load_config

    config = load_config([f"model={args.model}"]).model
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.BloomForCausalLM(transformers.BloomConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, n_layer=config.num_layers,
            n_head=config.num_heads)).save_pretrained(Path(tmp) / "hf")
        subprocess.run([sys.executable, "-m", "megatron_bloom.cli.convert", "from-hf", "--hf", str(Path(tmp) / "hf"),
                        "--output", str(Path(tmp) / "ckpt")], check=True, capture_output=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
        output = str(Path(tmp) / "result.json")
        import socket
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        mp.start_processes(rank_main, args=(port, args, str(Path(tmp) / "ckpt"), output), nprocs=2,
                           start_method="spawn")
        results = json.loads(Path(output).read_text())
    tokens = args.batch * args.new_tokens
    one, two = results["1"], results[str(args.micro_batches)]
    print(json.dumps({"model": args.model, "dtype": args.dtype, "pp": 2, "batch": args.batch,
                      "new_tokens": args.new_tokens, "micro_batches": args.micro_batches, "stages_in_turn_tokens_per_s": round(tokens / one["seconds"], 1),
                      "pipelined_tokens_per_s": round(tokens / two["seconds"], 1),
                      "pipelined_over_in_turn": round(one["seconds"] / two["seconds"], 3),
                      "same_tokens": one["tokens"] == two["tokens"]}))


if __name__ == "__main__":
    main()
