"""Generation: the KV cache against full forwards, and `mbloom-generate` at tp 1 and 2 against
`transformers`' own `generate` on the same weights (left-padded batches, EOS, sampling)."""

import dataclasses
import json
import math
import re

import pytest
import torch

from megatron_bloom.config.schema import GenerateConfig
from megatron_bloom.errors import UserError
from megatron_bloom.inference.generation import generate_batch, prepare_for_inference
from megatron_bloom.inference.sampling import choose_tokens
from megatron_bloom.model import KVCache, build_model, cpu_kernels
from megatron_bloom.model.inference_linear import Int8Linear, KernelLinear, PackedLinear, packing_available
from megatron_bloom.parallel import ParallelState
from tests.conftest import assert_user_error, run_cli, run_ranks, sample_texts, small_config, train_test_tokenizer

GREEDY = ()  # the generators of greedy decoding: it draws from none
PROMPTS = ["ka lo mi", "да ни ком 你 好 世 def return", "ré"]


@pytest.mark.parametrize("attention_impl, capacity", [("eager", 12), ("sdpa", 12), ("sdpa", 48)],
                         ids=["eager", "sdpa-whole-buffers", "sdpa-cached-part"])
def test_cached_decoding_gives_the_logits_of_full_forwards(attention_impl, capacity):
    """`capacity`: the cache's positions; decoding reads its whole buffers once the keys fill a third."""
    config = dataclasses.replace(small_config(), attention_impl=attention_impl)
    model = build_model(config).eval()
    torch.manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (2, 12))
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        full = model(input_ids, attention_mask=mask).logits
        cache = KVCache(config.num_layers, capacity)
        steps = [model(input_ids[:, :7], attention_mask=mask[:, :7], cache=cache).logits]
        for position in range(7, 12):
            steps.append(model(input_ids[:, position:position + 1], attention_mask=mask[:, :position + 1],
                               cache=cache).logits)
    incremental = torch.cat(steps, dim=1)
    assert cache.length == 12
    torch.testing.assert_close(incremental[0, 3:], full[0, 3:], atol=1e-5, rtol=1e-5)  # padding rows: no output
    torch.testing.assert_close(incremental[1], full[1], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not packing_available(torch.device("cpu"), torch.bfloat16),
                    reason="oneDNN packs bf16 weights on CPUs with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT only")
@pytest.mark.parametrize("kernels", ["ours", "torch", "measure"])
def test_packed_cpu_inference_gives_the_plain_models_bf16_logits(kernels, monkeypatch):
    """bf16 on a CPU: `prepare_for_inference` packs every linear and the LM head (for our bf16 kernel where
    the CPU has AVX512-BF16, else for oneDNN), and single-query attention goes through our kernel where
    it can (heads of 32 values here), each where it is the faster or as MBLOOM_CPU_KERNELS forces; the
    prompt's and each decoding step's logits are the plain model's within one bf16 ulp at their scale,
    whichever side runs. (Not to the bit: the plain model's linears take whatever path torch chooses on this
    CPU, AMX or AVX-512, which round a few sums differently.)"""
    monkeypatch.setenv("MBLOOM_CPU_KERNELS", kernels)
    config = small_config(hidden_size=128)
    plain = build_model(config, dtype=torch.bfloat16).eval()
    packed = build_model(config, dtype=torch.bfloat16)
    state = ParallelState.single()
    prepare_for_inference(packed, state, torch.bfloat16, batch_size=2)
    linears = [module for module in packed.modules() if isinstance(module, (KernelLinear, PackedLinear))]
    assert len(linears) >= 4 * config.num_layers + 1  # both layouts where decoding and prompts chose apart
    ours = kernels != "torch" and cpu_kernels.kernels_available()
    if kernels != "measure":
        assert all(isinstance(module, KernelLinear if ours else PackedLinear) for module in linears)
        assert len(linears) == 4 * config.num_layers + 1
        assert packed.transformer.h[0].self_attention.cpu_decode_kernel == ours
    torch.manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (2, 9))
    logits = {}
    with torch.no_grad():
        for name, model in (("plain", plain), ("packed", packed)):
            cache = KVCache(config.num_layers, 9)
            steps = [model(input_ids[:, :6], cache=cache).logits]
            steps += [model(input_ids[:, i:i + 1], cache=cache).logits for i in range(6, 9)]
            logits[name] = torch.cat(steps, dim=1)
    scale = logits["plain"].float().abs().max().item()
    ulp = 2.0 ** (math.floor(math.log2(scale)) - 7)
    torch.testing.assert_close(logits["packed"].float(), logits["plain"].float(), rtol=0, atol=ulp)
    assert (logits["packed"] == logits["plain"]).float().mean().item() > 0.99


def test_int8_weights_stay_close_to_the_model():
    """`generate.quantize=int8`: every linear and the LM head hold int8 weights (one scale per output
    channel); a decoding step's and a prompt's (dequantized path) logits stay within the rounding."""
    config = small_config()
    plain = build_model(config).eval()
    quantized = build_model(config)
    prepare_for_inference(quantized, ParallelState.single(), torch.float32, batch_size=2, quantize="int8")
    assert sum(isinstance(module, Int8Linear) for module in quantized.modules()) == 4 * config.num_layers + 1
    assert quantized.transformer.h[0].mlp.dense_h_to_4h.weight_int8.dtype == torch.int8
    torch.manual_seed(0)
    for length in (1, Int8Linear.DEQUANTIZED_ROWS):  # int8 kernel, then dequantized weights
        input_ids = torch.randint(0, config.vocab_size, (2, length))
        with torch.no_grad():
            expected, actual = plain(input_ids).logits, quantized(input_ids).logits
        error = (actual - expected).abs().max().item()
        assert 0 < error <= 0.01 * expected.abs().max().item()


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_tokens_and_logits():
    """`generate.compile=true`: the one-token steps through torch.compile (dynamic shapes: one compilation
    for every cache length, and for both decoding paths of the attention) give the eager model's logits
    and greedy tokens."""
    config = dataclasses.replace(small_config(), eos_token_id=None)
    model = build_model(config)
    state = ParallelState.single()
    decode = prepare_for_inference(model, state, torch.float32, batch_size=2, compile=True)
    assert prepare_for_inference(build_model(config), state, torch.float32, batch_size=2) is None
    torch.manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        steps = {}
        for name, forward in (("eager", model), ("compiled", decode)):
            cache = KVCache(config.num_layers, 20)  # the whole buffers are read from the 7th key on
            logits = [model(input_ids[:, :4], cache=cache).logits]
            logits += [forward(input_ids[:, i:i + 1], cache=cache).logits for i in range(4, 12)]
            steps[name] = torch.cat(logits, dim=1)
    torch.testing.assert_close(steps["compiled"], steps["eager"], rtol=1e-5, atol=1e-5)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    settings = GenerateConfig(max_new_tokens=10)
    eager = generate_batch(model, prompts, config, settings, state, GREEDY)
    assert generate_batch(model, prompts, config, settings, state, GREEDY, decode_model=decode) == eager
    with pytest.raises(UserError, match="generate.compile"):
        prepare_for_inference(build_model(config), state, torch.float32, 2, quantize="int8", compile=True)
    # Weights are frozen into the compiled graph: a second model compiled in the same process must run its
    # own weights, not the first model's graph (it did when dynamo's module guards were skipped).
    other = build_model(config)
    with torch.no_grad():
        for parameter in other.parameters():  # build_model's initialization is seeded: make them differ
            parameter.add_(0.02 * torch.randn_like(parameter))
    other_decode = prepare_for_inference(other, state, torch.float32, batch_size=2, compile=True)
    with torch.no_grad():
        caches = [KVCache(config.num_layers, 20) for _ in range(2)]
        for cache in caches:
            other(input_ids[:, :4], cache=cache)
        expected = other(input_ids[:, 4:5], cache=caches[0]).logits
        assert not torch.allclose(expected, steps["eager"][:, 4:5])
        torch.testing.assert_close(other_decode(input_ids[:, 4:5], cache=caches[1]).logits, expected,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not packing_available(torch.device("cpu"), torch.bfloat16),
                    reason="oneDNN packs bf16 weights on CPUs with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT only")
def test_compiled_decoding_runs_the_packed_bf16_weights():
    """On CPUs in bf16 the linears are packed before compiling (the prompt's eager step uses them too): the
    compiled steps (our CPU kernels, where there are, called from the graph) stay within bf16 rounding of
    the eager packed model."""
    config = dataclasses.replace(small_config(hidden_size=128), eos_token_id=None)
    state = ParallelState.single()
    eager, model = build_model(config, dtype=torch.bfloat16), build_model(config, dtype=torch.bfloat16)
    assert prepare_for_inference(eager, state, torch.bfloat16, batch_size=2) is None
    decode = prepare_for_inference(model, state, torch.bfloat16, batch_size=2, compile=True)
    assert sum(isinstance(module, (KernelLinear, PackedLinear)) for module in model.modules()) == \
        4 * config.num_layers + 1
    torch.manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (2, 12))
    logits = {}
    with torch.no_grad():
        for name, forward, prompt_model in (("eager", eager, eager), ("compiled", decode, model)):
            cache = KVCache(config.num_layers, 20)
            steps = [prompt_model(input_ids[:, :4], cache=cache).logits]
            steps += [forward(input_ids[:, i:i + 1], cache=cache).logits for i in range(4, 12)]
            logits[name] = torch.cat(steps, dim=1).float()
    torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=0, atol=0.02)


def test_sampling_keeps_to_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = lambda config: {int(choose_tokens(logits, config, [generator])) for _ in range(300)}  # noqa: E731
    assert draws(GenerateConfig(do_sample=False)) == {0}
    assert draws(GenerateConfig(do_sample=True, top_k=2)) == {0, 1}
    assert draws(GenerateConfig(do_sample=True, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert draws(GenerateConfig(do_sample=True, top_p=0.5)) == {0}
    assert draws(GenerateConfig(do_sample=True)) == {0, 1, 2, 3}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random transformers BLOOM (large init, so greedy text varies) imported as a checkpoint, with a
    tokenizer, and the prompts written as a jsonl file."""
    import transformers

    root = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    hf = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=1024, hidden_size=64, n_layer=4, n_head=4, initializer_range=0.3,
        bos_token_id=1, eos_token_id=2, pad_token_id=3)).eval()
    hf.save_pretrained(root / "hf")
    run_cli(["megatron_bloom.cli.convert", "from-hf", "--hf", str(root / "hf"), "--output", str(root / "ckpt")])
    train_test_tokenizer(root / "tok", sample_texts(300), vocab_size=1000)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return root, hf


def run_generate(root, tp, *overrides, pp=1, dp=1):
    result = run_ranks(tp * pp * dp, "megatron_bloom.cli.generate", [
        f"checkpoint.load={root / 'ckpt'}", f"eval.tokenizer={root / 'tok'}",
        f"generate.input={root / 'prompts.jsonl'}", "generate.batch_size=3", "generate.max_new_tokens=24",
        "precision=fp32", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}", *overrides])
    # the summary reports the speed: first-token time per batch, then the one-token steps' rate
    summary = re.search(r"time to first token \d+ ms per batch, then [\d,.]+ tokens/s", result.stderr)
    assert summary, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.strip().splitlines() if line.startswith("{")]
    results, streamed = lines[-len(PROMPTS):], lines[:-len(PROMPTS)]
    assert all("completion" in line for line in results)
    if "generate.stream=true" in overrides:  # the pieces of each prompt, in order, make its completion
        assert streamed and all(set(line) == {"index", "text"} for line in streamed)
        joined = ["".join(line["text"] for line in streamed if line["index"] == index) for index in range(len(results))]
        assert joined == [r["completion"] for r in results]
    else:
        assert not streamed
    return results


@pytest.fixture(scope="module")
def greedy_one_process(exported):
    return run_generate(exported[0], 1)


def test_greedy_generation_at_any_layout_equals_transformers(exported, greedy_one_process):
    """(tp, pp) = (1, 1), (2, 2) streaming, and (1, 2) with dp 2 (batches of 2 and 1: a pipeline of two
    micro-batches, then of one)."""
    from megatron_bloom.data.tokenizer import load_tokenizer

    root, hf = exported
    tp1 = greedy_one_process
    assert [r["prompt"] for r in tp1] == PROMPTS
    tp2_pp2 = run_generate(root, 2, "generate.stream=true", pp=2)
    pp2_dp2 = run_generate(root, 1, "generate.batch_size=2", pp=2, dp=2)
    assert [r["token_ids"] for r in tp2_pp2] == [r["token_ids"] for r in tp1]
    assert [r["token_ids"] for r in pp2_dp2] == [r["token_ids"] for r in tp1]

    tokenizer = load_tokenizer(root / "tok")
    prompts = [tokenizer.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    longest = max(len(p) for p in prompts)
    input_ids = torch.tensor([[3] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        output = hf.generate(input_ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                             eos_token_id=2, pad_token_id=3)
    expected = []
    for row in output[:, longest:].tolist():
        expected.append(row[: row.index(2) + 1] if 2 in row else row)
    assert [r["token_ids"] for r in tp1] == expected
    assert len({token for r in tp1 for token in r["token_ids"]}) > 5  # real text, not one token repeated
    assert tp1[0]["completion"] == tokenizer.decode(expected[0], skip_special_tokens=False)


@pytest.mark.slow
def test_int8_generation_runs_from_the_command_line(exported):
    root, _ = exported
    results = run_generate(root, 1, "generate.quantize=int8")
    assert [r["prompt"] for r in results] == PROMPTS and all(r["token_ids"] for r in results)
    refused = run_cli(["megatron_bloom.cli.generate", f"checkpoint.load={root / 'ckpt'}",
                       f"eval.tokenizer={root / 'tok'}", "generate.prompt=ka", "generate.quantize=int4"], check=False)
    assert_user_error(refused, "generate.quantize", "int4")


@pytest.mark.slow
def test_sampling_is_the_same_at_any_layout(exported, greedy_one_process):
    """Each prompt draws from its own generator: the same tokens at (1, 1) in one batch of 3, at (2, 2),
    and at (1, 2) with dp 2 in batches of 1."""
    root, _ = exported
    sampling = ["generate.do_sample=true", "generate.top_k=50", "generate.top_p=0.9", "generate.seed=7"]
    one = run_generate(root, 1, *sampling)
    tp2_pp2 = run_generate(root, 2, *sampling, pp=2)
    pp2_dp2 = run_generate(root, 1, *sampling, "generate.batch_size=1", pp=2, dp=2)
    assert [r["token_ids"] for r in tp2_pp2] == [r["token_ids"] for r in one]
    assert [r["token_ids"] for r in pp2_dp2] == [r["token_ids"] for r in one]
    assert [r["token_ids"] for r in one] != [r["token_ids"] for r in greedy_one_process]


def test_generate_without_a_prompt_is_a_user_error(exported):
    root, _ = exported
    result = run_cli(["megatron_bloom.cli.generate", f"checkpoint.load={root / 'ckpt'}", f"eval.tokenizer={root / 'tok'}"],
                     check=False)
    assert_user_error(result, "generate.prompt")


def test_a_prompt_takes_any_text_without_quoting(exported, tmp_path):
    """Cyrillic with a comma, `=`, quotes, brackets and `${`: each generates from exactly the text given, as
    does a multi-line prompt from --prompt-file; no Hydra quoting needed."""
    root, _ = exported
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Жизнь, и всё\nsecond line, with = and 'quotes'\n", encoding="utf-8")
    symbols = "a=b 'single' \"double\" [x] ${y} back\\slash"
    cases = {"Жизнь, и всё": ["generate.prompt=Жизнь, и всё"], symbols: [f"generate.prompt={symbols}"],
             "Жизнь, и всё\nsecond line, with = and 'quotes'": ["--prompt-file", str(prompt_file)]}
    for prompt, args in cases.items():
        result = run_cli(["megatron_bloom.cli.generate", f"checkpoint.load={root / 'ckpt'}",
                          f"eval.tokenizer={root / 'tok'}", "generate.max_new_tokens=2", "precision=fp32", *args])
        record = json.loads(result.stdout.strip().splitlines()[-1])
        assert record["prompt"] == prompt and len(record["token_ids"]) >= 1
