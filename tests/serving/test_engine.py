"""The serve engine on its own (no HTTP): the step's buckets, the start-up warm-up, and greedy output through padded
buckets against `gpt2 sample`."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from gpt2cli import get_tokenizer
from gpt2cli.generation.records import SamplingOptions
from gpt2cli.model.gpt2 import GPT2, GPT2Config, KVCache
from gpt2cli.runtime.compile import allow_step_shapes
from gpt2cli.serving.engine import Engine, Finished, Sequence, StepBuckets, TokenGenerated, step_buckets

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog again and again", "A", "To be, or not to be"]


@pytest.fixture(scope="module")
def model() -> GPT2:
    torch.manual_seed(0)
    return GPT2(GPT2Config(n_layer=2, n_head=4, n_embd=64, block_size=128)).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    from gpt2cli import save_model

    return save_model(model, tmp_path_factory.mktemp("engine") / "tiny.safetensors")


def generate(engine: Engine, requests: list[tuple[list[int], SamplingOptions, int]]) -> list[list[int]]:
    """Submit every (prompt ids, options, seed) at once; each sequence's generated token ids."""
    tokens: list[list[int]] = [[] for _ in requests]
    finished: list[Finished] = []
    done = threading.Event()

    def emitter(index: int):
        def emit(event) -> None:
            if isinstance(event, TokenGenerated):
                tokens[index].append(event.token)
            elif isinstance(event, Finished):
                finished.append(event)
                if len(finished) == len(requests):
                    done.set()

        return emit

    sequences = [
        Sequence(index, ids, options, torch.Generator().manual_seed(seed), emitter(index))
        for index, (ids, options, seed) in enumerate(requests)
    ]
    engine.submit(sequences)
    assert done.wait(120), "the engine did not finish"
    assert all(event.error is None for event in finished), [event.error for event in finished]
    return tokens


def sampled_greedily(checkpoint: Path, tmp_path: Path, prompts: list[str], *flags: str) -> dict[str, list[int]]:
    """`gpt2 sample`'s greedy token ids for each prompt (past <|endoftext|>), with `flags` added."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    result = run_cli(
        "sample", checkpoint, "--prompts-file", prompts_file, "--temperature", "0", "--ignore-eot", *flags, "--json"
    )
    assert result.returncode == 0, result.stderr.decode()
    return {record["prompt"]: record["token_ids"] for record in map(json.loads, result.stdout.splitlines())}


def assert_served_greedily(
    engine: Engine, prompts: list[str], lengths: list[int], expected: dict[str, list[int]], **options: float
) -> None:
    """Serve every prompt at once, greedily for its length, on a started-then-stopped `engine`; each sequence's
    tokens are the first of `expected`'s."""
    tokenizer = engine.tokenizer
    engine.start()
    try:
        requests = [
            (
                tokenizer.encode(prompt),
                SamplingOptions(max_new_tokens=n, temperature=0.0, ignore_eot=True, **options),
                0,
            )
            for prompt, n in zip(prompts, lengths, strict=True)
        ]
        served = generate(engine, requests)
    finally:
        engine.stop()
    for prompt, n, tokens in zip(prompts, lengths, served, strict=True):
        assert tokens == expected[prompt][:n], prompt


# ---------------------------------------------------------------- buckets


def test_cuda_graphs_pad_rows_and_length_to_powers_of_two():
    buckets = step_buckets("cuda", True, max_batch=16, capacity=1024)
    assert buckets.rows == (1, 2, 4, 8, 16) and buckets.lengths == (16, 32, 64, 128, 256, 512, 1024)
    assert len(buckets.shapes) == 35 and buckets.shapes[0] == (1, 16) and buckets.shapes[-1] == (16, 1024)
    assert buckets.pick(1, 5) == (1, 16)  # one client pays for one row and 16 positions, not 16 x 1024
    assert buckets.pick(3, 17) == (4, 32)
    assert buckets.pick(9, 513) == (16, 1024)
    assert buckets.pick(16, 1024) == (16, 1024)


def test_a_batch_or_context_that_is_not_a_power_of_two_is_the_last_bucket():
    buckets = step_buckets("cuda", True, max_batch=6, capacity=100)
    assert buckets.rows == (1, 2, 4, 6) and buckets.lengths == (16, 32, 64, 100)
    assert buckets.pick(5, 65) == (6, 100)
    assert step_buckets("cuda", True, max_batch=1, capacity=8) == StepBuckets((1,), (8,))


@pytest.mark.parametrize(("device_type", "compiled"), [("cpu", True), ("cpu", False), ("cuda", False)])
def test_without_cuda_graphs_a_step_runs_the_active_rows_at_the_caches_length_bucket(device_type, compiled):
    config = GPT2Config(n_layer=1, n_head=1, n_embd=8, block_size=1024)
    cache = KVCache(config, 1, "cpu", torch.float32)
    buckets = step_buckets(device_type, compiled, max_batch=16, capacity=1024)
    assert buckets.rows is None and buckets.shapes == []  # nothing to warm up: the step takes shapes as they come
    for end in range(1, 1025):
        assert buckets.pick(7, end) == (7, cache.attend_length(end))  # today's rule, unchanged


def test_the_recompile_limit_rises_to_the_number_of_shapes():
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    # torch's own patching: pytest's monkeypatch restores a config entry in a way that hides it from torch itself
    with (
        dynamo_config.patch(recompile_limit=8, accumulated_recompile_limit=256),
        inductor_config.patch({"triton.cudagraph_dynamic_shape_warn_limit": 8}),
    ):
        allow_step_shapes(35)
        assert dynamo_config.recompile_limit == 35 and dynamo_config.accumulated_recompile_limit == 256  # not lowered
        assert inductor_config.triton.cudagraph_dynamic_shape_warn_limit == 35
        allow_step_shapes(4)
        assert dynamo_config.recompile_limit == 35


def test_the_recompile_limit_has_its_older_name_on_older_torch(monkeypatch):
    class OldConfig:  # torch before 2.7: the limits' earlier names only
        cache_size_limit = 8
        accumulated_cache_size_limit = 64

    monkeypatch.setattr(torch._dynamo, "config", OldConfig)
    allow_step_shapes(35)
    assert OldConfig.cache_size_limit == 35 and OldConfig.accumulated_cache_size_limit == 64


# ---------------------------------------------------------------- warm-up and greedy output


def test_the_warm_up_visits_every_bucket_before_the_engine_serves(model):
    buckets = step_buckets("cuda", True, max_batch=6, capacity=128)
    engine = Engine(model, get_tokenizer(), max_batch=6, buckets=buckets)
    calls: list[tuple[int, int]] = []

    def fake_step(tokens, cache, positions, length):
        assert tokens.shape == (positions.size(0), 1) and not positions.any()  # free rows, at position 0
        calls.append((tokens.size(0), length))
        return torch.zeros(tokens.size(0), model.config.vocab_size)

    engine.step = fake_step
    seconds = engine.start()
    try:
        assert seconds >= 0 and engine.warm_up_s == seconds
        assert sorted(set(calls)) == sorted(buckets.shapes) and len(calls) == len(buckets.shapes) == 16
    finally:
        engine.stop()


def test_a_failed_warm_up_is_raised_by_start(model):
    engine = Engine(model, get_tokenizer(), max_batch=2, buckets=step_buckets("cuda", True, 2, 128))

    def broken(*args):
        raise RuntimeError("no graph today")

    engine.step = broken
    with pytest.raises(RuntimeError, match="no graph today"):
        engine.start()


def test_greedy_through_padded_buckets_equals_gpt2_sample(model, checkpoint, tmp_path):
    """CUDA's buckets, run eagerly on the CPU: 4 rows padded to 4 then 2 and 1 as sequences finish, lengths
    crossing 16, 32, 64 and 128; each sequence's tokens are the first of `gpt2 sample`'s greedy ones."""
    expected = sampled_greedily(checkpoint, tmp_path, PROMPTS, "--max-new-tokens", "100")
    engine = Engine(model, get_tokenizer(), max_batch=4, buckets=step_buckets("cuda", True, 4, 128))
    steps: list[tuple[int, int]] = []  # the (rows, length) of every step
    step = engine.step

    def counting_step(tokens, cache, positions, length):
        steps.append((tokens.size(0), length))
        return step(tokens, cache, positions, length)

    engine.step = counting_step
    # finishing at different steps: rows leave, the last moves into their place
    assert_served_greedily(engine, PROMPTS, [100, 20, 60, 5], expected)
    assert {rows for rows, _ in steps} >= {4, 2, 1} and {length for _, length in steps} >= {32, 64, 128}
    assert all((rows, length) in engine.buckets.shapes for rows, length in steps)


# ---------------------------------------------------------------- batched sampling


def test_a_seeded_sequence_samples_the_same_text_whatever_shares_its_batch(model):
    tokenizer = get_tokenizer()
    sampled = SamplingOptions(max_new_tokens=24, temperature=0.9, top_k=50, ignore_eot=True)
    penalised = SamplingOptions(max_new_tokens=30, temperature=1.1, top_p=0.8, repetition_penalty=1.3, ignore_eot=True)
    once = (tokenizer.encode("Once upon"), sampled, 7)
    engine = Engine(model, tokenizer, max_batch=6)
    engine.start()
    try:
        (alone,) = generate(engine, [once])
        neighbours = [
            (tokenizer.encode(PROMPTS[1]), SamplingOptions(max_new_tokens=5, temperature=0.0), 0),
            (tokenizer.encode("Once upon"), penalised, 7),  # the same seed, other options: another text
            (tokenizer.encode(PROMPTS[3]), sampled, 8),
        ]
        crowded = generate(engine, [*neighbours, once, once])
        again = generate(engine, [neighbours[1], once])
    finally:
        engine.stop()
    assert len(alone) == 24 and crowded[3] == crowded[4] == again[1] == alone
    assert crowded[1] == again[0] != alone and crowded[2] != alone


def test_greedy_with_a_repetition_penalty_equals_gpt2_sample(model, checkpoint, tmp_path):
    """The penalty reads each row's history from the device buffer, kept across row moves and padded per row."""
    expected = sampled_greedily(checkpoint, tmp_path, PROMPTS, "--max-new-tokens", "40", "--repetition-penalty", "1.5")
    engine = Engine(model, get_tokenizer(), max_batch=4, buckets=step_buckets("cuda", True, 4, 128))
    assert_served_greedily(engine, PROMPTS, [40, 12, 30, 3], expected, repetition_penalty=1.5)


# ---------------------------------------------------------------- prompt lookup


def test_greedy_with_prompt_lookup_equals_gpt2_sample(model, checkpoint, tmp_path, monkeypatch):
    """Each row drafts from its own text and the drafts are verified in one pass beside rows without one (CUDA's
    buckets, eagerly on the CPU); every row's tokens are still `gpt2 sample`'s greedy ones, and some passes gained
    a row several tokens."""
    import gpt2cli.serving.engine as engine_module

    prompts = ["one two three one two three one two three one two", *PROMPTS]
    expected = sampled_greedily(checkpoint, tmp_path, prompts, "--max-new-tokens", "40")

    gains: list[int] = []  # tokens each verified draft gained its row
    verify = engine_module.choose_with_drafts

    def recording_verify(*args):
        gained = verify(*args)
        gains.append(len(gained[0]))
        return gained

    monkeypatch.setattr(engine_module, "choose_with_drafts", recording_verify)
    engine = Engine(model, get_tokenizer(), max_batch=4, buckets=step_buckets("cuda", True, 4, 128), prompt_lookup=3)
    # five sequences in four rows: one waits, rows leave and move
    assert_served_greedily(engine, prompts, [40, 30, 15, 40, 7], expected)
    assert gains and max(gains) == 4  # a whole draft of 3 kept, and the model's own token


def test_a_seeded_sequence_with_prompt_lookup_does_not_depend_on_its_neighbours(model):
    """A row draws from its own generator whether or not a neighbour drafted in the same pass."""
    tokenizer = get_tokenizer()
    sampled = SamplingOptions(max_new_tokens=30, temperature=0.8, top_k=20, ignore_eot=True)
    once = (tokenizer.encode("a b a b a b a b"), sampled, 3)
    engine = Engine(model, tokenizer, max_batch=4, prompt_lookup=2)
    engine.start()
    try:
        (alone,) = generate(engine, [once])
        greedy = SamplingOptions(max_new_tokens=40, temperature=0.0, ignore_eot=True)
        neighbours = [(tokenizer.encode("x y z x y z x y z"), greedy, 0), (tokenizer.encode(PROMPTS[0]), sampled, 4)]
        crowded = generate(engine, [*neighbours, once])
    finally:
        engine.stop()
    assert len(alone) == 30 and crowded[2] == alone


@pytest.mark.slow
def test_the_cuda_compilation_covers_every_bucket_in_a_few_compilations():
    """`serve_compile_arguments("cuda")` without its CUDA graphs, on the CPU: Dynamo's automatic dynamic shapes
    compile the 16 buckets a few times, not once each (the first shape, then the length symbolic, then the rows;
    the whole batch is a case of its own), and every bucket's logits are the eager step's."""
    from torch._dynamo.utils import counters

    from gpt2cli.runtime.compile import serve_compile_arguments

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=128)).eval()
    arguments = serve_compile_arguments("cuda")
    arguments["options"] = {k: v for k, v in arguments["options"].items() if k != "triton.cudagraphs"}
    torch._dynamo.reset()
    step = torch.compile(model.next_token_logits, **arguments)
    buckets = step_buckets("cuda", True, max_batch=8, capacity=128)
    allow_step_shapes(len(buckets.shapes))
    cache = KVCache(model.config, 8, "cpu", torch.float32)
    positions = torch.arange(8) + 3
    before = counters["frames"]["ok"]
    with torch.inference_mode():
        for rows, length in buckets.shapes:
            tokens = torch.arange(rows)[:, None] + 100
            expected = model.next_token_logits(tokens, cache, positions[:rows], length)
            torch.testing.assert_close(step(tokens, cache, positions[:rows], length), expected)
    assert counters["frames"]["ok"] - before <= 4
