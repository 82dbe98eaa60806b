"""Shared helpers and fixtures: small random models on both sides (ours and transformers'), running console
scripts, and the data and trained checkpoints several test modules share (built once per test session)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

# One thread in each process of the suite (pytest's workers, and the commands and ranks they start), unless
# the environment says otherwise; set before torch is imported, which reads it. The README's command runs two
# workers on CI's 2 cores: two processes of 2 OpenMP threads each share a core, and their threads spin at every
# barrier waiting for one that is not running. Two bloom-tiny trainings side by side took 24 s each that way,
# 7 s with a thread each. torchrun gives several ranks the same default.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

from megatron_bloom.model import ModelConfig, TaskConfig  # noqa: E402
from tests.processes import run_module, run_module_ranks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


def small_config(**overrides) -> ModelConfig:
    """A BLOOM small enough for a test: 2 layers, hidden 64, 4 heads, vocabulary 1024."""
    fields = dict(num_layers=2, hidden_size=64, num_heads=4, vocab_size=1024, seq_length=64)
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_config(config: ModelConfig, task: TaskConfig | None = None):
    """The `transformers.BloomConfig` of the same shape (and head)."""
    from transformers import BloomConfig

    task = task or TaskConfig()
    return BloomConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, n_layer=config.num_layers,
        n_head=config.num_heads, layer_norm_epsilon=config.layer_norm_epsilon,
        initializer_range=config.init_std, hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, num_labels=task.num_labels,
    )


def hf_model(config: ModelConfig, task: TaskConfig | None = None, seed: int = 0):
    """A randomly initialized transformers BLOOM model for `task`, in eval mode.

    Biases and LayerNorm parameters are randomized too (transformers initializes them to 0/1), so that a
    parity test would notice a bias or a LayerNorm applied in the wrong place.
    """
    import transformers

    task = task or TaskConfig()
    from megatron_bloom.checkpoint.hf import ARCHITECTURES

    torch.manual_seed(seed)
    model = getattr(transformers, ARCHITECTURES[task.name])(hf_config(config, task))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "ln_f" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def load_hf_weights_into(ours: torch.nn.Module, hf) -> None:
    """Copy a transformers model's weights into ours (by name, through the converter)."""
    from megatron_bloom.checkpoint.hf import hf_to_state_dict

    state = hf_to_state_dict(hf.state_dict(), ours.config, _task_of(ours))
    ours.load_state_dict(state, strict=True)


def _task_of(model) -> TaskConfig:
    return TaskConfig(name=model.task, num_labels=getattr(model, "num_labels", 2))


def run_cli(args: Sequence[str], cwd: Path | None = None, check: bool = True, timeout: float = 300,
            fresh_interpreter: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m <module> args...` in a process of its own, as users do, and return the finished process
    (text output). The process is forked from a preloaded server (tests/processes.py); `fresh_interpreter`
    starts a new Python instead, import-time output included, as a user's shell does."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if fresh_interpreter:
        result = subprocess.run([sys.executable, "-m", *args], cwd=cwd or REPO, env=env, text=True,
                                capture_output=True, timeout=timeout)
    else:
        result = run_module(args[0], args[1:], cwd=cwd or REPO, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def torchrun_command(nproc: int, module: str, args: Sequence[str]) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
            module, *args]


def run_ranks(nproc: int, module: str, args: Sequence[str], cwd: Path | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc -m module args...` to the end, its ranks forked from the
    preloaded server with the environment torchrun gives them (tests/processes.py); fails the test if a rank
    fails. The launchers themselves are run for real in test_launch.py and by the quickstart."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = run_module_ranks(nproc, module, args, cwd=cwd or REPO, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user mistake: exit status 2, one `program: error:` paragraph naming the fragments, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert "error:" in result.stderr, result.stderr
    paragraph = " ".join(result.stderr.split())  # the message is wrapped for the terminal
    for fragment in fragments:
        assert fragment in paragraph, (fragment, result.stderr)


def assert_user_error_in_process(main: Callable, argv: Sequence[str], capsys, *fragments: str) -> None:
    """The same as `assert_user_error` for a command's `main` called in this process (no interpreter to
    start: for the mistakes a command refuses before it joins a process group or starts one)."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr
    assert "Traceback" not in stderr and "error:" in stderr, stderr
    paragraph = " ".join(stderr.split())
    for fragment in fragments:
        assert fragment in paragraph, (fragment, stderr)


# --- text and tokenizers made here (nothing is downloaded) -------------------------------------------

_SYLLABLES = ["ka", "lo", "mi", "tu", "ré", "ça", "ün", "ø", "да", "ни", "ком", "你", "好", "世", "ب", "ال",
              "नम", "स्ते", "def", "return", "(x)", "{", "}", ";", " ", "  "]


def sample_texts(count: int, seed: int = 0, max_words: int = 60) -> list:
    """Deterministic pseudo-multilingual documents of 1 to `max_words` words."""
    import random

    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(1, max_words))]
        texts.append(" ".join(words))
    return texts


def train_test_tokenizer(directory: Path, texts: Sequence[str], vocab_size: int = 500) -> Path:
    """A byte-level BPE tokenizer with BLOOM's special tokens, saved as `directory/tokenizer.json`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


CORPUS = REPO / "data_prep" / "sample_corpus.jsonl"


def corpus_shards(root: Path, vocab_size: int, *preprocess_args: str) -> Path:
    """A tokenizer (`root/tok`) and token shards (`root/<prefix>`) of the shipped sample corpus, made with
    the real commands; `preprocess_args` adds flags such as --split-by-lang."""
    run_cli(["megatron_bloom.cli.train_tokenizer", "--input", str(CORPUS), "--vocab-size", str(vocab_size), "--output",
             str(root / "tok")])
    prefix = "ml" if "--split-by-lang" in preprocess_args else "corpus"
    run_cli(["megatron_bloom.cli.preprocess", "--input", str(CORPUS), "--tokenizer", str(root / "tok"), "--output-prefix",
             str(root / prefix), *preprocess_args])
    return root


# --- the shipped fine-tuning data (data_prep/tasks) -----------------------------------------------

TASK_DATA = REPO / "data_prep" / "tasks"
TASK_FILES = {"sequence_classification": "sentiment", "token_classification": "entities",
              "question_answering": "questions"}


def task_tokenizer(directory: Path) -> Path:
    """A tokenizer trained on the shipped tasks' training files."""
    texts = [line for path in sorted(TASK_DATA.glob("*.train.jsonl")) for line in path.read_text().splitlines()]
    return train_test_tokenizer(directory, texts, vocab_size=500)


def exported_task_model(root: Path, task_name: str, config: ModelConfig, seed: int):
    """A random transformers model of `task_name` (a classification head gets the sorted labels of the
    shipped training file as `id2label`), saved in `root/hf` and converted with `mbloom-convert from-hf`
    into `root/ckpt`. Returns the model and its labels (None when it has none)."""
    from megatron_bloom.tasks.formats import LabelMap, read_task_file

    labels = None
    if task_name in ("sequence_classification", "token_classification"):
        examples = read_task_file(TASK_DATA / f"{TASK_FILES[task_name]}.train.jsonl", task_name).examples
        labels = LabelMap.from_examples(examples).names
    reference = hf_model(config, TaskConfig(name=task_name, num_labels=len(labels) if labels else 2), seed=seed)
    if labels:
        reference.config.id2label = dict(enumerate(labels))
        reference.config.label2id = {name: index for index, name in enumerate(labels)}
    reference.save_pretrained(root / "hf")
    run_cli(["megatron_bloom.cli.convert", "from-hf", "--hf", str(root / "hf"), "--output", str(root / "ckpt")])
    return reference, labels


def overrides(shard, run_dir, tp, pp, dp, zero=1, iters=20, precision="fp32"):
    """A bloom-tiny training run on `shard` (the `shard` fixture): global batch 8 of micro-batches of 2, every
    iteration logged."""
    return ["model=bloom-tiny", f"data.paths=[{shard / 'corpus'}]", f"data.cache_dir={shard / 'cache'}",
            "data.num_workers=0", f"precision={precision}", f"train.iters={iters}", "train.global_batch_size=8",
            "train.micro_batch_size=2", "optim.lr=1e-3", "sched.warmup_iters=2", f"zero.stage={zero}",
            f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}", f"run.dir={run_dir}",
            "logging.interval=1"]


# --- built once per session, shared by the test modules (and by pytest-xdist's workers) -----------------

def session_temp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary directory of the whole session, which every pytest-xdist worker's own lies in."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`root/name`, made by `build(directory)` once per test session: pytest-xdist's workers share the
    session's base temporary directory, and the first worker to arrive builds while the others wait on a
    file lock (pytest-xdist's own recipe for session fixtures that must run once)."""
    base = session_temp(tmp_path_factory)
    directory, done = base / "shared" / name, base / "shared" / f"{name}.done"
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock"):
        if not done.exists():
            directory.mkdir(parents=True, exist_ok=True)
            build(directory)
            done.touch()
    return directory


@pytest.fixture(scope="session")
def shard(tmp_path_factory) -> Path:
    """A 1024-token tokenizer (`tok/`) and one shard (`corpus`) of the shipped sample corpus, documents
    ended with EOD: the data of the training, checkpoint, reshape and launch tests."""
    return built_once(tmp_path_factory, "corpus-1024",
                      lambda root: corpus_shards(root, 1024, "--append-eod", "--workers", "1"))


@pytest.fixture(scope="session")
def pipeline_run(shard, tmp_path_factory) -> Path:
    """A (tp 2, pp 2) fp32 run of 12 iterations with ZeRO 1 on `shard`: `run/` (its metrics.jsonl) and `ckpt/`
    (checkpoints after iterations 4, 8 and 12). The uninterrupted run the resume and restart tests compare
    against, and the checkpoint the reshape tests start from."""
    def build(root: Path) -> None:
        run_ranks(4, "megatron_bloom.cli.train", overrides(shard, root / "run", 2, 2, 1, iters=12) + [
            f"checkpoint.dir={root / 'ckpt'}", "checkpoint.save_interval=4"])

    return built_once(tmp_path_factory, "pipeline-run", build)


@pytest.fixture
def slurm(tmp_path, tmp_path_factory):
    """A one-node SLURM cluster on this machine (installed by .ci/run; skipped where it cannot be): the
    environment its commands need. One test at a time has it (its daemons hold fixed ports): pytest-xdist's
    other worker waits on a file lock."""
    script = REPO / "launch" / "slurm" / "local_cluster.sh"
    install = subprocess.run([str(script), "install"], capture_output=True, text=True, timeout=600)
    if install.returncode != 0:
        pytest.skip(f"SLURM cannot be installed here (apt-get as root is needed): {install.stderr.strip()[-300:]}")
    with FileLock(str(session_temp(tmp_path_factory) / "slurm.lock")):
        start = subprocess.run([str(script), "start", str(tmp_path / "slurm")], capture_output=True, text=True,
                               timeout=120)
        assert start.returncode == 0, start.stdout + start.stderr
        yield dict(os.environ, PYTHONPATH=str(REPO), SLURM_CONF=str(tmp_path / "slurm" / "slurm.conf"))
        subprocess.run([str(script), "stop", str(tmp_path / "slurm")], timeout=60)


# pytest-xdist hands whole modules to its workers (--dist loadscope) in the order collected
# (--no-loadscope-reorder). The longest (as measured on 2 cores) go first, so that none of them starts last
# and leaves one worker running alone at the end; the rest follow in file order.
LONGEST_MODULES_FIRST = ["test_training.py", "test_launch.py", "test_restarts.py", "test_plan.py",
                         "test_checkpoints.py", "test_quickstart.py", "test_reshape.py", "test_readme.py",
                         "test_generate.py", "test_harness.py", "test_fine_tuning.py", "test_preprocess.py",
                         "test_sequence_parallel.py", "test_config.py", "test_eval.py", "test_exit_status.py", "test_cpu_kernels.py",
                         "test_task_eval.py", "test_checkpoint_safety.py", "test_output.py"]


def pytest_collection_modifyitems(config, items):
    """The longest modules first; tests marked `gpu` need CUDA: without it they are skipped, saying so."""
    position = {name: index for index, name in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: position.get(item.path.name, len(position)))  # stable: file order otherwise
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (marked gpu); this machine has none"))
