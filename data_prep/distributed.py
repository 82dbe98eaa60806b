"""`mbloom-preprocess --tasks N [--executor local|slurm] [--dedup exact|near]`: preprocessing as a job of tasks.

The inputs are cut into N consecutive parts by size (`sources.split_inputs`). Each task tokenizes its part into
a part shard (`task_steps.TokenizeParts`), after the deduplication stages when asked (`dedup`). The stages run
on datatrove's executors, here or as SLURM job arrays (`executors`). The command then merges the part shards in
task order (`merge.merge_shards`): the same `PREFIX.bin/.idx`, byte for byte, that one process reading the
inputs in order writes, and `PREFIX.stats.json` sums the tasks' counts.

The run's state lives in `PREFIX.tasks/`, removed when the run ends well:
    run.json            the inputs (names and sizes) and options: a rerun of the same run resumes it, where
                        finished tasks are not run again; another run starts over
    lock                held by the command while it runs (one run per prefix at a time)
    stages/NAME/        each stage's datatrove folder: finished markers, task logs, SLURM logs
    dedup/              what the deduplication stages found
    parts/NNNNN[_LANG]  each task's shard(s), and NNNNN.json its counts
    errors/NNNNN.json   a mistake a task met in its data; the first in input order is reported
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Sequence

from data_prep.dedup import MAX_EXACT_TASKS, dedup_stages
from data_prep.encoding import EncoderSettings
from data_prep.executors import LocalStages, SlurmStages, Stage, forget_tasks, tasks_named
from data_prep.merge import merge_shards
from data_prep.options import PreprocessOptions
from data_prep.shards import language_prefix
from data_prep.sources import Source, input_bytes, split_inputs
from data_prep.task_steps import TaskSettings, TokenizeParts
from megatron_bloom.data.documents import SkipReport
from megatron_bloom.errors import UserError


@dataclass
class JobResult:
    documents: int
    tokens: int
    report: SkipReport
    outputs: Dict[str, dict]  # by language ("all" without --split-by-lang): prefix, documents, tokens, removed
    task_seconds: List[float]


def check_job_options(options: PreprocessOptions) -> None:
    if options.tasks < 1:
        raise UserError(f"--tasks must be at least 1, got {options.tasks}.")
    if options.dedup == "exact" and options.tasks > MAX_EXACT_TASKS:
        raise UserError(f"--dedup exact orders documents by task with 2-byte priorities: at most "
                        f"{MAX_EXACT_TASKS} tasks, got --tasks {options.tasks}.")
    if options.executor == "local" and (options.slurm_partition or options.slurm_time):
        raise UserError("--slurm-partition and --slurm-time are for --executor slurm.")


def run_job(options: PreprocessOptions, sources: Sequence[Source], encoder: EncoderSettings) -> JobResult:
    """Run (or resume) the job's stages, then merge the tasks' part shards into the outputs."""
    work = Path(options.output_prefix + ".tasks")
    with locked(work):
        resume_or_start_over(work, run_record(options, sources, encoder))
        settings = TaskSettings(plan=split_inputs(sources, options.tasks), encoder=encoder, dtype=encoder.dtype,
                                split_by_lang=options.split_by_lang, strict=options.strict, work_dir=str(work))
        stages, dedup_filter = dedup_stages(options.dedup, settings, work / "dedup")
        stages.append(Stage("tokenize", options.tasks, [TokenizeParts(settings, dedup_filter)]))
        runner = (LocalStages(options.workers) if options.executor == "local"
                  else SlurmStages(options.slurm_partition, options.slurm_time))
        for stage in stages:
            folder = work / "stages" / stage.name
            unfinished = runner.run(stage, folder)
            if unfinished:
                raise UserError(unfinished_message(stage, folder, unfinished, runner.executor))
        first_mistake(work, work / "stages" / "tokenize")
        result = merge_tasks(work, options)
        shutil.rmtree(work)
    return result


@contextlib.contextmanager
def locked(work: Path) -> Iterator[None]:
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another mbloom-preprocess is writing to the same --output-prefix (it holds "
                            f"{work / 'lock'}). Wait for it to end, or choose another prefix.") from None
        yield


def run_record(options: PreprocessOptions, sources: Sequence[Source], encoder: EncoderSettings) -> dict:
    """What makes a rerun the same run: the inputs as they are now, the tokenizer's content, and the options
    that change what the tasks write (not where they run)."""
    return {"inputs": [[source.name, input_bytes(source)] for source in sources],
            "tokenizer_sha256": hashlib.sha256(Path(encoder.tokenizer).read_bytes()).hexdigest(),
            "text_key": encoder.text_key, "lang_key": encoder.lang_key, "eod_id": encoder.eod_id,
            "split_by_lang": options.split_by_lang, "strict": options.strict, "tasks": options.tasks,
            "dedup": options.dedup}


def resume_or_start_over(work: Path, record: dict) -> None:
    recorded = work / "run.json"
    if recorded.is_file():
        if json.loads(recorded.read_text()) == record:
            return
        print(f"{work} holds the work of a run with other inputs or options; starting over.", file=sys.stderr)
        for entry in work.iterdir():
            if entry.name != "lock":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    recorded.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def unfinished_message(stage: Stage, folder: Path, unfinished: Sequence[int], executor: str) -> str:
    where = f"{folder / 'logs'}" + (f" and {folder / 'slurm_logs'}" if executor == "slurm" else "")
    return (f"{tasks_named(unfinished, stage.tasks)} of the {stage.name} stage did not finish (cancelled, failed "
            f"or out of time); their logs are in {where}. Rerun the same command to resume: the finished tasks "
            "are not run again.")


def first_mistake(work: Path, tokenize_folder: Path) -> None:
    """The first mistake in the data, in input order, that a task met (each task stops at its first). The
    tasks that met one will run again on a rerun."""
    errors = sorted((work / "errors").glob("*.json")) if (work / "errors").is_dir() else []
    if errors:
        forget_tasks(tokenize_folder, [int(path.stem) for path in errors])
        raise UserError(json.loads(errors[0].read_text())["message"])


def merge_tasks(work: Path, options: PreprocessOptions) -> JobResult:
    """Sum the tasks' counts, and merge their part shards, language by language, in task order."""
    report = SkipReport()
    parts: Dict[str, List[str]] = {}  # by language, in order of first appearance: as one process meets them
    outputs: Dict[str, dict] = {}
    task_seconds = []
    for task in range(options.tasks):
        counts = json.loads((work / "parts" / f"{task:05d}.json").read_text())
        task_seconds.append(counts["seconds"])
        for reason, entry in counts["skipped"].items():
            report.add(reason, entry["count"], entry["first_lines"])
        for language, output in counts["outputs"].items():
            parts.setdefault(language, []).append(output["prefix"])
        for language, removed in counts["duplicates_removed"].items():
            outputs.setdefault(language, {"duplicates_removed": 0})["duplicates_removed"] += removed
    documents = tokens = 0
    for language, prefixes in parts.items():
        prefix = language_prefix(options.output_prefix, language if options.split_by_lang else None)
        merged = merge_shards(prefixes, prefix)
        outputs[language] = {"prefix": prefix, "documents": merged["documents"], "tokens": merged["tokens"],
                             **outputs.get(language, {"duplicates_removed": 0})}
        documents += merged["documents"]
        tokens += merged["tokens"]
    return JobResult(documents=documents, tokens=tokens, report=report,
                     outputs={language: outputs[language] for language in parts}, task_seconds=task_seconds)
