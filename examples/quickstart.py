"""Quickstart: build bloom-tiny, import a Hugging Face checkpoint, check parity, export it back.

    python examples/quickstart.py [--workdir DIR] [--model bloom-tiny]

No network: the "downloaded" Hugging Face checkpoint is a randomly initialized `transformers` BLOOM of the
preset's shape, saved with `save_pretrained` exactly as a hub checkpoint is. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from megatron_bloom.checkpoint.layout import load_model_state_dict
from megatron_bloom.config import load_config
from megatron_bloom.model import build_model


def convert(*args: str) -> None:
    command = shutil.which("mbloom-convert")
    argv = [command] if command else [sys.executable, "-m", "megatron_bloom.convert"]
    print("$ mbloom-convert " + " ".join(args))
    subprocess.run(argv + list(args), check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temporary dir)")
    parser.add_argument("--model", default="bloom-tiny", help="model preset (default bloom-tiny)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mbloom-quickstart-"))

    config = load_config([f"model={args.model}"]).model
    ours = build_model(config, seed=1234)
    built = sum(p.numel() for p in ours.parameters())
    print(f"{args.model}: {config.num_layers} layers, hidden {config.hidden_size}, {config.num_heads} heads, "
          f"vocabulary {config.vocab_size}: {config.num_parameters():,} parameters (built model: {built:,})")

    import transformers  # only the reference side needs it

    torch.manual_seed(0)
    reference = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, n_layer=config.num_layers,
        n_head=config.num_heads, layer_norm_epsilon=config.layer_norm_epsilon, pad_token_id=3)).eval()
    reference.save_pretrained(workdir / "hf-source")
    convert("from-hf", "--hf", str(workdir / "hf-source"), "--output", str(workdir / "checkpoint"))
    _, state_dict = load_model_state_dict(workdir / "checkpoint")
    ours.load_state_dict(state_dict)
    ours.eval()

    input_ids = torch.randint(0, config.vocab_size, (2, min(64, config.seq_length)),
                              generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    mask[0, :8] = 0  # one left-padded row
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=mask, labels=input_ids)
        actual = ours(input_ids, attention_mask=mask, labels=input_ids)
    logits_error = (expected.logits - actual.logits).abs().max().item()
    loss_error = abs(expected.loss.item() - actual.loss.item())
    print(f"parity with transformers (fp32): max |logits diff| = {logits_error:.2e}, "
          f"|loss diff| = {loss_error:.2e} (loss {actual.loss.item():.6f})")

    convert("to-hf", "--checkpoint", str(workdir / "checkpoint"), "--output", str(workdir / "hf-export"))
    source = load_file(str(workdir / "hf-source" / "model.safetensors"))
    exported = load_file(str(workdir / "hf-export" / "model.safetensors"))
    round_trip_exact = source.keys() == exported.keys() and all(torch.equal(source[k], exported[k]) for k in source)
    print(f"round trip HF -> megatron_bloom -> HF bit-exact: {round_trip_exact}")
    print(f"files in {workdir}")

    ok = logits_error <= 1e-5 and loss_error <= 1e-5 and round_trip_exact and built == config.num_parameters()
    print("quickstart: OK" if ok else "quickstart: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
