"""`gpt2 sample` and the sampler, with transformers' `generate` as the oracle."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import assert_one_line_error, biased_model, cli_env, run_cli
from gpt2cli import get_tokenizer, load_model
from gpt2cli.generation.generator import TextGenerator, group_by_length
from gpt2cli.generation.logit_filters import apply_repetition_penalty, min_p_filter, top_k_filter, top_p_filter
from gpt2cli.generation.quantize import quantize_int8
from gpt2cli.generation.records import SamplingOptions, Timing
from gpt2cli.model.gpt2 import GPT2, GPT2Config, KVCache

PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def hf_model(shared_hf_model_factory):  # read only: built once
    return shared_hf_model_factory(n_layer=2, n_head=4, n_embd=64, n_positions=64)


def reference_greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    output = model.generate(
        torch.tensor([prompt_ids]),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=50256,
    )
    return output[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "full-forward"])
def test_greedy_matches_transformers_generate(hf_model, use_cache):
    reference, folder = hf_model
    prompt = get_tokenizer().encode(PROMPT)
    text_generator = TextGenerator(load_model(folder), get_tokenizer(), use_cache=use_cache)
    options = SamplingOptions(max_new_tokens=40, temperature=0.0, ignore_eot=True)
    completion = text_generator.generate([prompt], options)[0]
    assert completion.token_ids == reference_greedy(reference, prompt, 40)
    assert completion.finish_reason == "length"


def test_cli_greedy_matches_transformers(hf_model):
    reference, folder = hf_model
    result = run_cli(
        "sample", folder, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "40", "--ignore-eot", "--json"
    )
    assert result.returncode == 0, result.stderr.decode()
    record = json.loads(result.stdout)
    assert set(record) == {"prompt", "completion", "token_ids", "finish_reason", "tokens_per_s", "compile_s"}
    assert record["token_ids"] == reference_greedy(reference, get_tokenizer().encode(PROMPT), 40)
    assert record["completion"] == get_tokenizer().decode(record["token_ids"])
    assert record["prompt"] == PROMPT and record["finish_reason"] == "length" and record["tokens_per_s"] > 0
    assert record["compile_s"] == 0  # eager: nothing compiled or warmed up
    assert b"generated 40 tokens" in result.stderr and b"time to first token" in result.stderr


def test_kv_cache_logits_equal_a_full_forward_at_every_step(hf_model):
    _, folder = hf_model
    model = load_model(folder)
    tokens = torch.randint(0, 50257, (2, 30), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    with torch.no_grad():
        cached = [model.next_token_logits(tokens[:, :10], cache, 0)]
        cached += [model.next_token_logits(tokens[:, t : t + 1], cache, t) for t in range(10, 30)]
        chunked_cache = KVCache(model.config, 2, "cpu", torch.float32)
        model.next_token_logits(tokens[:, :10], chunked_cache, 0)
        chunked = model.next_token_logits(tokens[:, 10:30], chunked_cache, 10)  # several new tokens at once
        full, _ = model(tokens)
    for step, logits in enumerate(cached):
        torch.testing.assert_close(logits, full[:, 9 + step])
    torch.testing.assert_close(chunked, full[:, -1])


def test_rows_at_different_positions_give_each_row_alone_logits(hf_model):
    _, folder = hf_model
    model = load_model(folder)
    prompts = [list(range(100, 105)), list(range(200, 209)), [300, 301]]
    new_tokens = torch.tensor([[7, 8, 9, 10], [11, 12, 13, 14], [15, 16, 17, 18]])
    batched = KVCache(model.config, 3, "cpu", torch.float32)
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):  # each row prefilled alone into its slot, as serving does
            model.next_token_logits(torch.tensor([prompt]), batched, torch.tensor([0]), first_row=row)
        positions = torch.tensor([len(prompt) for prompt in prompts])
        steps = []
        for step in range(new_tokens.size(1)):
            end = int(positions.max()) + 1
            length = batched.attend_length(end) if step % 2 else None  # a bucket, or the whole cache
            steps.append(model.next_token_logits(new_tokens[:, step : step + 1], batched, positions, length))
            positions += 1
        for row, prompt in enumerate(prompts):
            alone, _ = model(torch.tensor([prompt + new_tokens[row].tolist()]))
            for step, logits in enumerate(steps):
                torch.testing.assert_close(logits[row], alone[0, len(prompt) + step], rtol=1e-4, atol=1e-4)


def test_attend_length_is_a_power_of_two_bucket_within_the_cache(hf_model):
    _, folder = hf_model
    cache = KVCache(load_model(folder).config, 1, "cpu", torch.float32)  # 64 positions
    assert [cache.attend_length(end) for end in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]


def test_the_warm_up_covers_every_length_the_steps_will_attend_to():
    generator = TextGenerator(GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=128)), get_tokenizer())
    cache = generator.cache_for(1)
    assert generator.attend_lengths(cache, 5, 1) == [16]
    assert generator.attend_lengths(cache, 5, 100) == [16, 32, 64, 128]  # ends 5..104
    assert generator.attend_lengths(cache, 120, 9) == [128]  # ends 120..128: the last fills the window
    # Past the window: re-encoded at 64 tokens, the steps go on from an end of 65
    assert generator.attend_lengths(cache, 120, 20) == [128]
    assert generator.attend_lengths(cache, 30, 200) == [32, 64, 128]


@pytest.mark.slow  # torch.compile
def test_compiled_decode_step_compiles_once_and_matches_eager():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=4, n_embd=64, block_size=128))
    options = SamplingOptions(max_new_tokens=101, temperature=0.0, ignore_eot=True)  # 100 decode steps
    prompt = [[464, 2068, 7586, 21831]]
    eager = TextGenerator(model, get_tokenizer()).generate(prompt, options)[0].token_ids
    torch._dynamo.reset()
    counters.clear()
    compiled = TextGenerator(model, get_tokenizer(), compile=True)  # on the CPU: bucketed lengths, one compilation
    step, lengths = compiled.step, []
    compiled.step = lambda *arguments: lengths.append(arguments[3]) or step(*arguments)
    timing = Timing()
    assert compiled.generate(prompt, options, timing=timing)[0].token_ids == eager
    assert counters["frames"]["total"] == 1 and counters["stats"]["unique_graphs"] == 1
    # Every length the 100 steps attend to (ends 5..104) ran once before the clock started, and that time is apart.
    assert lengths[:4] == [16, 32, 64, 128] and len(lengths) == 4 + 100
    assert timing.warmup_s > 0 and timing.decode_tokens == 100

    # The CUDA-graph shape (the whole cache, static shapes): positions are data, so it too compiles once.
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(model.next_token_logits, dynamic=False, backend="eager")
    cache = KVCache(model.config, 1, "cpu", torch.float32)
    with torch.inference_mode():
        token = model.next_token_logits(torch.tensor(prompt), cache, 0).argmax(-1, keepdim=True)  # prefill: eager
        positions, tokens = torch.tensor([len(prompt[0])]), [int(token)]
        for _ in range(100):
            token = step(token, cache, positions, cache.capacity).argmax(-1, keepdim=True)
            positions += 1
            tokens.append(int(token))
    assert tokens == eager
    assert counters["frames"]["total"] == 1


def test_same_seed_same_text(hf_model):
    _, folder = hf_model
    args = ("sample", folder, "--prompt", "Once", "--max-new-tokens", "30", "--top-k", "40", "--ignore-eot")
    first, second = run_cli(*args, "--seed", "7"), run_cli(*args, "--seed", "7")
    other = run_cli(*args, "--seed", "8")
    assert first.returncode == 0 and first.stdout == second.stdout
    assert first.stdout != other.stdout


# ---------------------------------------------------------------- filters on hand-made logits


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = top_k_filter(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True, False]]
    assert torch.equal(top_k_filter(logits, 5), logits)


def test_top_p_keeps_the_smallest_nucleus():
    probabilities = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probabilities.log()
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_min_p_drops_tokens_far_below_the_best():
    logits = torch.tensor([[0.6, 0.3, 0.07, 0.03]]).log()
    assert torch.isfinite(min_p_filter(logits, 0.1)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(min_p_filter(logits, 0.6)).tolist() == [[True, False, False, False]]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    penalized = apply_repetition_penalty(logits, torch.tensor([[0, 1, 0]]), 2.0)
    assert penalized.tolist() == [[1.0, -4.0, 1.0]]


# ---------------------------------------------------------------- stopping


def test_eot_stops_unless_ignored(tmp_path):
    path = biased_model(tmp_path / "eot.safetensors", {50256}, block_size=32)
    stopped = json.loads(run_cli("sample", path, "--prompt", "Hi", "--json", "--seed", "0").stdout)
    assert stopped["finish_reason"] == "eot" and stopped["token_ids"] == [] and stopped["completion"] == ""
    args = ("sample", path, "--prompt", "Hi", "--json", "--ignore-eot", "--max-new-tokens", "3", "--temperature", "0")
    ignored = json.loads(run_cli(*args).stdout)
    assert ignored["finish_reason"] == "length" and ignored["token_ids"] == [50256] * 3


def test_stop_string_stops_exactly_before_it(hf_model):
    _, folder = hf_model
    text_generator = TextGenerator(load_model(folder), get_tokenizer())
    prompt = get_tokenizer().encode(PROMPT)
    free = text_generator.generate([prompt], SamplingOptions(max_new_tokens=40, temperature=0.0, ignore_eot=True))[0]
    stop = free.text[10:14]
    options = SamplingOptions(max_new_tokens=40, temperature=0.0, ignore_eot=True, stop=(stop,))
    streamed: list[str] = []
    stopped = text_generator.generate([prompt], options, on_text=lambda row, piece: streamed.append(piece))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]
    assert "".join(streamed) == stopped.text  # nothing past the stop string was ever shown


# ---------------------------------------------------------------- prompts, batching, precision


def test_prompts_file_generates_each_prompt_in_batches(hf_model, tmp_path):
    _, folder = hf_model
    prompts = ["Hello world", "A much longer prompt than the first one", "Hello again"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    args = ("--temperature", "0", "--max-new-tokens", "12", "--ignore-eot", "--json")
    batched = [
        json.loads(line) for line in run_cli("sample", folder, "--prompts-file", path, *args).stdout.splitlines()
    ]
    assert sorted(record["prompt"] for record in batched) == sorted(prompts)
    for record in batched:
        single = json.loads(run_cli("sample", folder, "--prompt", record["prompt"], *args).stdout)
        assert single["token_ids"] == record["token_ids"]


def test_prompts_group_by_length_in_order_and_timings_add_up(hf_model):
    assert group_by_length([[1, 2], [3], [4, 5], [6]], copies=2) == [[0, 0, 2, 2], [1, 1, 3, 3]]
    _, folder = hf_model
    text_generator = TextGenerator(load_model(folder), get_tokenizer())
    prompts = [[10, 11, 12], [20], [30, 31, 32]]
    timing = Timing()
    options = SamplingOptions(max_new_tokens=5, temperature=0.0, ignore_eot=True)
    results = list(text_generator.generate_grouped(prompts, options, num_samples=2, timing=timing))
    assert [index for index, _, _ in results] == [0, 0, 2, 2, 1, 1]
    for index, completion, _ in results:
        assert completion.prompt_ids == prompts[index]
        assert completion.token_ids == text_generator.generate([prompts[index]], options)[0].token_ids
    batch_timings = {id(batch): batch for _, _, batch in results}.values()
    assert len(batch_timings) == 2
    assert timing.prefill_tokens == 2 * 3 + 2 * 3 + 2 * 1 == sum(t.prefill_tokens for t in batch_timings)
    assert timing.decode_tokens == sum(t.decode_tokens for t in batch_timings) == 6 * 4
    assert timing.decode_s == pytest.approx(sum(t.decode_s for t in batch_timings))


def test_num_samples_and_plain_output(hf_model):
    _, folder = hf_model
    result = run_cli("sample", folder, "--num-samples", "3", "--max-new-tokens", "5", "--seed", "1", "--json")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 3 and all(r["prompt"] == "" for r in records)  # empty prompt: from <|endoftext|>
    plain = run_cli("sample", folder, "--num-samples", "2", "--max-new-tokens", "5", "--seed", "1")
    assert plain.returncode == 0 and plain.stdout.count(b"---\n") == 1


def test_long_prompt_is_cut_from_the_left_with_a_warning(hf_model):
    _, folder = hf_model
    result = run_cli("sample", folder, "--prompt", "word " * 200, "--max-new-tokens", "100", "--json", "--ignore-eot")
    assert result.returncode == 0, result.stderr.decode()
    assert b"warning: the prompt was cut from the left to the last 63 tokens" in result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) == 100  # past the 64-token window, the window slid


def test_bfloat16_and_int8_stay_close_to_float32(hf_model):
    _, folder = hf_model
    tokens = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = load_model(folder)(tokens)[0]
        half = load_model(folder, dtype=torch.bfloat16)(tokens)[0].float()
        int8 = quantize_int8(load_model(folder))(tokens)[0]
    for approximate in (half, int8):
        assert torch.corrcoef(torch.stack([exact.flatten(), approximate.flatten()]))[0, 1] > 0.99
    for flag in (("--dtype", "bfloat16"), ("--quantize", "int8")):
        assert run_cli("sample", folder, "--max-new-tokens", "4", *flag).returncode == 0


def test_closed_stdout_ends_quietly(hf_model):
    _, folder = hf_model
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt2cli", "sample", str(folder), "--max-new-tokens", "2000", "--ignore-eot"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    assert process.stdout.read(5)
    process.stdout.close()
    assert process.wait(timeout=120) == 0
    assert b"Traceback" not in process.stderr.read()


# ---------------------------------------------------------------- bad input


def test_missing_and_broken_checkpoints(tmp_path):
    assert_one_line_error(run_cli("sample", tmp_path / "none.safetensors"), 2, "no such file")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    assert_one_line_error(run_cli("sample", broken), 1, "safetensors")


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [
        ("--top-p", "0", "sample.top_p"),
        ("--top-p", "1.5", "sample.top_p"),
        ("--temperature", "-0.5", "sample.temperature"),
        ("--max-new-tokens", "0", "sample.max_new_tokens"),
        ("--top-k", "50258", "sample.top_k"),
        ("--quantize", "int2", "--quantize"),  # a closed choice: the command line names the flag
        ("--stop", "", "sample.stop"),  # would stop before the first token; the server refuses it too
    ],
)
def test_invalid_settings_exit_2(tmp_path, flag, value, field):
    assert_one_line_error(run_cli("sample", tmp_path / "any", flag, value), 2, field)


def test_conflicting_prompt_options(hf_model):
    _, folder = hf_model
    result = run_cli("sample", folder, "--prompt", "a", "--prompts-file", "-")
    assert_one_line_error(result, 2, "only one of")
