"""lm-evaluation-harness through our adapter (`mbloom-eval eval.harness.tasks=[...]`) against lm-eval's own
`hf` model on the checkpoint's `to-hf` export: the same accuracies, log-likelihoods within 1e-4 and the same
greedy generations, at (1, 1), (2, 2) and dp 2, on the project's shipped offline tasks; and during training
(`train.eval_harness`), on the live model at tp 2 x pp 2."""

import json
import math

import pytest

from megatron_bloom.checkpoint.hf import write_tokenizer_config
from tests.conftest import assert_user_error, overrides, run_cli, run_ranks
from tests.test_checkpoints import losses_by_iteration

TASKS = ["mbloom_choice", "mbloom_cloze", "mbloom_perplexity", "mbloom_generate"]
LIMIT = 24  # examples of each task: every kind of request, in a few batches


@pytest.fixture(scope="module")
def reference(pipeline_run, shard, tmp_path_factory):
    """lm-eval's `hf` model on the (tp 2, pp 2) run's checkpoint exported to Hugging Face (with the run's
    tokenizer), in fp32: its results with every sample."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megatron_bloom.inference.harness_evaluation import shipped_tasks_dir

    export = tmp_path_factory.mktemp("harness") / "hf"
    run_cli(["megatron_bloom.cli.convert", "to-hf", "--checkpoint", str(pipeline_run / "ckpt"), "--output",
             str(export)])
    (export / "tokenizer.json").write_bytes((shard / "tok" / "tokenizer.json").read_bytes())
    write_tokenizer_config(export)
    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export},dtype=float32,max_length=128",
                                   tasks=TASKS, limit=LIMIT, device="cpu", batch_size=8, log_samples=True,
                                   task_manager=TaskManager(include_path=str(shipped_tasks_dir())))


def ours(pipeline_run, shard, tmp_path, tp=1, pp=1, dp=1):
    args = [f"checkpoint.load={pipeline_run / 'ckpt'}", f"eval.tokenizer={shard / 'tok'}", "precision=fp32",
            f"eval.harness.tasks=[{','.join(TASKS)}]", f"eval.harness.limit={LIMIT}", "eval.harness.batch_size=8",
            "eval.harness.log_samples=true", f"run.dir={tmp_path / 'run'}", f"parallel.tp={tp}", f"parallel.pp={pp}",
            f"parallel.dp={dp}"]
    ranks = tp * pp * dp
    result = (run_ranks(ranks, "megatron_bloom.cli.eval", args) if ranks > 1
              else run_cli(["megatron_bloom.cli.eval", *args]))
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    return printed, json.loads((tmp_path / "run" / "harness_results.json").read_text())


def responses(results, task):
    """Each example's responses (its requests' answers), by example."""
    return {sample["doc_id"]: sample["resps"] for sample in results["samples"][task]}


def assert_same_as_hf(printed, results, reference):
    assert sorted(printed["results"]) == sorted(TASKS)
    for task in ("mbloom_choice", "mbloom_cloze"):
        mine, theirs = responses(results, task), responses(reference, task)
        assert sorted(mine) == sorted(theirs) == list(range(LIMIT))
        for doc_id, answers in theirs.items():  # each choice's (log-likelihood, is greedy)
            for (log_likelihood, greedy), (expected, expected_greedy) in zip(
                    [answer[0] for answer in mine[doc_id]], [answer[0] for answer in answers]):
                assert abs(log_likelihood - expected) < 1e-4 and greedy == expected_greedy, (task, doc_id)
        for metric in ("acc,none", "acc_norm,none") if task == "mbloom_choice" else ("acc,none",):
            assert printed["results"][task][metric] == reference["results"][task][metric], (task, metric)
    mine, theirs = responses(results, "mbloom_perplexity"), responses(reference, "mbloom_perplexity")
    for doc_id, answers in theirs.items():  # whole documents, over several windows of 128 tokens
        assert abs(mine[doc_id][0][0] - answers[0][0]) < 1e-4, doc_id
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        value = printed["results"]["mbloom_perplexity"][metric]
        assert math.isclose(value, reference["results"]["mbloom_perplexity"][metric], rel_tol=1e-5), metric
    generated, expected = responses(results, "mbloom_generate"), responses(reference, "mbloom_generate")
    assert generated == expected and any(text[0][0].strip() for text in expected.values())  # greedy, stop at "\n"


def test_one_process_scores_and_generates_as_lm_evals_hf_model(pipeline_run, shard, tmp_path, reference):
    printed, results = ours(pipeline_run, shard, tmp_path)
    assert_same_as_hf(printed, results, reference)
    # lm-eval's own results file: each task's examples counted, and its config kept
    assert {task: results["n-samples"][task]["effective"] for task in TASKS} == {task: LIMIT for task in TASKS}
    assert results["configs"]["mbloom_generate"]["generation_kwargs"]["until"] == ["\n"]


@pytest.mark.slow
def test_tp_2_pp_2_scores_and_generates_as_lm_evals_hf_model(pipeline_run, shard, tmp_path, reference):
    assert_same_as_hf(*ours(pipeline_run, shard, tmp_path, tp=2, pp=2), reference)


@pytest.mark.slow
def test_two_data_parallel_replicas_split_the_requests_and_score_as_lm_evals_hf_model(pipeline_run, shard, tmp_path,
                                                                                      reference):
    assert_same_as_hf(*ours(pipeline_run, shard, tmp_path, dp=2), reference)


@pytest.mark.slow
def test_training_evaluates_its_live_model_as_the_offline_adapter_its_checkpoint_and_trains_unchanged(
        shard, pipeline_run, tmp_path):
    # The session's (tp 2, pp 2) run again, with lm-eval's tasks every 4 iterations on the live model.
    tasks = ["mbloom_choice", "mbloom_perplexity"]
    run_ranks(4, "megatron_bloom.cli.train", overrides(shard, tmp_path / "run", 2, 2, 1, iters=12) + [
        f"data.tokenizer={shard / 'tok'}", f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.save_interval=4",
        f"train.eval_harness.tasks=[{','.join(tasks)}]", "train.eval_harness.interval=4",
        "train.eval_harness.limit=8"])
    # Training is what it was without the evaluations, bit for bit (they leave every random generator alone).
    assert losses_by_iteration(tmp_path / "run") == losses_by_iteration(pipeline_run / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert [line["iter"] for line in lines] == [4, 8, 12] and all(sorted(line["harness"]) == tasks for line in lines)
    assert lines[0]["harness"]["mbloom_perplexity"] != lines[2]["harness"]["mbloom_perplexity"]  # live weights
    # The offline adapter on the checkpoint saved at iteration 8 (at (1, 1); it keeps the run's tokenizer).
    offline = run_cli(["megatron_bloom.cli.eval", f"checkpoint.load={tmp_path / 'ckpt' / 'global_step8'}",
                       "precision=fp32", f"eval.harness.tasks=[{','.join(tasks)}]", "eval.harness.limit=8",
                       f"run.dir={tmp_path / 'eval'}"])
    expected = json.loads(offline.stdout.strip().splitlines()[-1])["results"]
    live = lines[1]["harness"]
    assert live["mbloom_choice"] == expected["mbloom_choice"]
    for metric, value in expected["mbloom_perplexity"].items():
        assert math.isclose(live["mbloom_perplexity"][metric], value, rel_tol=1e-6), metric


def test_harness_mistakes_are_one_paragraph(pipeline_run, shard, tmp_path):
    from megatron_bloom.config import load_config
    from megatron_bloom.errors import ConfigError
    from megatron_bloom.training.harness import harness_interval

    result = run_cli(["megatron_bloom.cli.eval", f"checkpoint.load={pipeline_run / 'ckpt'}",
                      f"eval.tokenizer={shard / 'tok'}", "eval.harness.tasks=[mbloom_choise]"], check=False)
    assert_user_error(result, "no lm-eval task, group or tag is named 'mbloom_choise' (did you mean mbloom_choice")
    for overrides_, fragment in (
            (["train.eval_harness.tasks=[mbloom_choice]", "data.tokenizer=tok"], "needs an interval"),
            (["train.eval_harness.tasks=[mbloom_choice]", "train.eval_harness.interval=5"], "set data.tokenizer"),
            (["train.eval_harness.tasks=[mbloom_choice]", "train.eval_interval=5", "data.tokenizer=tok",
              "zero.stage=3"], "use zero.stage=0, 1 or 2")):
        with pytest.raises(ConfigError, match=fragment):
            harness_interval(load_config(overrides_))
    assert harness_interval(load_config(["train.eval_harness.tasks=[mbloom_choice]", "train.eval_interval=5",
                                         "data.tokenizer=tok"])) == 5


def test_lm_evals_python_api_loads_a_checkpoint_by_the_registered_name(pipeline_run, shard, reference):
    """`lm_eval.simple_evaluate(model="megatron_bloom", model_args="checkpoint=...")`, one process."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megatron_bloom.inference.harness import HarnessModel  # importing it registers the model with lm-eval
    from megatron_bloom.inference.harness_evaluation import shipped_tasks_dir

    assert lm_eval.api.registry.get_model("megatron_bloom") is HarnessModel

    results = lm_eval.simple_evaluate(
        model="megatron_bloom", model_args=f"checkpoint={pipeline_run / 'ckpt'},tokenizer={shard / 'tok'}",
        tasks=["mbloom_choice"], limit=LIMIT, batch_size=8, log_samples=True,
        task_manager=TaskManager(include_path=str(shipped_tasks_dir())))
    assert results["results"]["mbloom_choice"]["acc,none"] == reference["results"]["mbloom_choice"]["acc,none"]
    mine, theirs = responses(results, "mbloom_choice"), responses(reference, "mbloom_choice")
    assert all(abs(a[0][0] - b[0][0]) < 1e-4 for doc_id in theirs for a, b in zip(mine[doc_id], theirs[doc_id]))
