"""megatron_bloom: train BLOOM models with tensor, pipeline and ZeRO data parallelism.

Install torch first (`pip install torch==2.13.0` on a CPU machine) so that no dependency pulls a CUDA build.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def config_files():
    """configs/ and the lm-eval tasks (tasks/) are installed under share/megatron_bloom for non-editable
    installs."""
    by_dir = {}
    for path in sorted([*(ROOT / "configs").rglob("*.yaml"), *(ROOT / "tasks").glob("*.*")]):
        relative = path.relative_to(ROOT)
        by_dir.setdefault(str(Path("share/megatron_bloom") / relative.parent), []).append(str(relative))
    return sorted(by_dir.items())


setup(
    name="megatron_bloom",
    version="0.1.0",
    description="Train BLOOM language models with tensor, pipeline and ZeRO data parallelism",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_bloom", "megatron_bloom.*", "data_prep", "data_prep.*"]),
    package_data={"data_prep": ["sample_corpus.jsonl"], "megatron_bloom.launcher": ["train.sbatch"],
                  # C++ sources compiled at first use (model/cpu_kernels.py, parallel/host_group.py)
                  "megatron_bloom.model": ["csrc/*.cpp", "csrc/*.h"], "megatron_bloom.parallel": ["csrc/*.cpp"]},
    data_files=config_files(),
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.19,<0.20",  # the tested range (megatron_bloom/fence/deepspeed.py, TESTED_DEEPSPEED)
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "datasets>=2.19",
        "tokenizers>=0.19",
        "wandb>=0.17",
        "tensorboard>=2.14",
        "safetensors>=0.4",
        "numpy>=1.24",
        "ninja>=1.11",  # torch.utils.cpp_extension builds the CPU decoding kernel with it
        # mbloom-preprocess --tasks/--dedup: executors (here, SLURM) and deduplication stages
        "datatrove>=0.10.1,<0.11",  # the tested range: data_prep/executors.py and data_prep/dedup.py
        "xxhash>=3,<4",  # datatrove's hash for deduplication
        "regex>=2023.0",  # datatrove's text simplification (MinHash), and our script-aware words
        # mbloom-eval eval.harness.tasks: the tested range (megatron_bloom/inference/harness.py)
        "lm-eval>=0.4.13,<0.5",
    ],
    extras_require={
        # transformers is only the reference that parity tests compare against; training never needs it
        # (lm-eval's `hf` model, the harness tests' reference, runs it with accelerate).
        # megatron-core reads our token shards back in the tests, to prove the format is Megatron's own.
        # filelock: the tests' session fixtures are built once across pytest-xdist's workers.
        "test": ["pytest>=7.4", "pytest-xdist>=3.7", "filelock>=3.12", "transformers>=4.44", "megatron-core>=0.12",
                 "accelerate>=1.0"],  # lm-eval's `hf` model, the reference of tests/test_harness.py
    },
    entry_points={
        "console_scripts": [
            "mbloom-convert=megatron_bloom.cli.convert:main",
            "mbloom-eval=megatron_bloom.cli.eval:run",
            "mbloom-generate=megatron_bloom.cli.generate:run",
            "mbloom-launch=megatron_bloom.cli.launch:main",
            "mbloom-plan=megatron_bloom.cli.plan:main",
            "mbloom-train=megatron_bloom.cli.train:run",
            "mbloom-preprocess=megatron_bloom.cli.preprocess:main",
            "mbloom-merge-shards=megatron_bloom.cli.merge_shards:main",
            "mbloom-train-tokenizer=megatron_bloom.cli.train_tokenizer:main",
        ],
    },
)
