"""Prompt-lookup decoding (`gpt2 sample --prompt-lookup N`): the same greedy text as plain decoding, the same
sampling distribution, the cache rolled back by position alone."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from gpt2cli import get_tokenizer
from gpt2cli.generation.drafting import (
    Draft,
    LookupHistory,
    PromptLookup,
    agreeing_prefix,
    choose_with_drafts,
    count_draft,
)
from gpt2cli.generation.generator import TextGenerator
from gpt2cli.generation.logit_filters import filtered_logits
from gpt2cli.generation.records import SamplingOptions, Timing
from gpt2cli.model.gpt2 import GPT2, GPT2Config, KVCache

BLOCK, VOCAB = 48, 512  # a small vocabulary (of GPT-2's first tokens) keeps the output head cheap


@pytest.fixture(scope="module")
def model() -> GPT2:
    torch.manual_seed(0)
    return GPT2(GPT2Config(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, block_size=BLOCK)).eval()


def varied_prompts() -> list[list[int]]:
    """Repetitive prompts (periods 1 to 7, so drafts are long and often wrong), random ones (drafts rare), and
    prompts that end one to a few tokens before the context limit."""
    generator = torch.Generator().manual_seed(1)
    prompts = []
    for period in range(1, 8):
        pattern = torch.randint(100, 400, (period,), generator=generator).tolist()
        prompts.append((pattern * 20)[: 9 + 2 * period])
    prompts += [torch.randint(0, VOCAB, (length,), generator=generator).tolist() for length in (5, 12)]
    prompts += [([7, 8, 9, 10, 11] * 10)[:length] for length in (BLOCK - 1, BLOCK - 2, BLOCK - 4)]
    return prompts


# ---------------------------------------------------------------- drafts


def test_drafts_continue_the_latest_occurrence_of_the_longest_suffix():
    assert LookupHistory([7, 1, 2, 5, 3, 2, 6, 1, 2]).draft(2) == [5, 3]  # "1 2" beats the later "2" (then 6)
    history = LookupHistory([1, 3, 8, 2, 3, 9, 4, 3])
    assert history.draft(2) == [9, 4]  # the latest "3"
    history.extend([9])  # now "3 9" matches
    assert history.draft(1) == [4]
    assert LookupHistory([1, 2, 3]).draft(4) == []  # nothing repeats
    assert history.draft(0) == []


def test_a_draft_that_runs_into_the_end_repeats_the_period():
    assert LookupHistory([5, 1, 2, 1, 2]).draft(5) == [1, 2, 1, 2, 1]
    assert LookupHistory([4, 4, 4]).draft(3) == [4, 4, 4]


def test_agreeing_prefix():
    assert [agreeing_prefix([1, 2, 3, 4], draft) for draft in ([], [1, 2, 3], [1, 5, 3], [9])] == [0, 3, 1, 0]


def test_draft_tokens_past_where_a_row_finished_count_neither_way():
    timing = Timing()
    count_draft(timing, drafted=4, kept=2, taken=3)  # 2 accepted, then the model's own token: all 4 proposed count
    assert (timing.drafted, timing.accepted) == (4, 2)
    count_draft(timing, drafted=4, kept=4, taken=2)  # a stop string on the 2nd draft token: the other 2 never ran
    assert (timing.drafted, timing.accepted) == (6, 4)
    count_draft(timing, drafted=3, kept=1, taken=2)  # finished on the model's own token after 1 accepted
    assert (timing.drafted, timing.accepted) == (9, 5)
    count_draft(timing, drafted=0, kept=0, taken=1)  # nothing drafted: nothing counted
    assert (timing.drafted, timing.accepted, timing.accepted_lengths) == (9, 5, {2: 2, 1: 1})


# ---------------------------------------------------------------- the cache


def test_rolling_back_the_cache_by_position_equals_a_fresh_cache(model):
    """The continuation writes fewer entries than the rejected draft left (11..13 of 11..15): the stale ones at 14
    and 15 must be masked by position, not merely overwritten."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 14), generator=generator)
    wrong = torch.randint(0, VOCAB, (2, 6), generator=generator)
    at = torch.tensor([11, 11])
    with torch.inference_mode():
        cache = KVCache(model.config, 2, "cpu", torch.float32)
        model.next_token_logits(tokens[:, :10], cache, 0)
        verified = torch.cat([tokens[:, 10:11], wrong[:, 1:]], dim=1)  # the pending token at 10, then a bad draft
        model.verify_logits(verified, cache, torch.tensor([10, 10]))  # stale entries 11..15; rolled back to 11
        step = model.next_token_logits(tokens[:, 11:12], cache, at)
        continued = model.verify_logits(tokens[:, 12:14], cache, at + 1)
        fresh_cache = KVCache(model.config, 2, "cpu", torch.float32)  # never saw the draft
        model.next_token_logits(tokens[:, :11], fresh_cache, 0)
        fresh_step = model.next_token_logits(tokens[:, 11:12], fresh_cache, at)
        fresh = model.verify_logits(tokens[:, 12:14], fresh_cache, at + 1)
        full, _ = model(tokens)
    torch.testing.assert_close(step, fresh_step)
    torch.testing.assert_close(continued, fresh)
    torch.testing.assert_close(continued, full[:, 12:14], rtol=1e-4, atol=1e-4)


def test_a_verify_pass_past_the_context_writes_its_padding_nowhere_attended(model):
    tokens = torch.randint(0, VOCAB, (1, BLOCK), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        cache = KVCache(model.config, 1, "cpu", torch.float32)
        model.next_token_logits(tokens[:, : BLOCK - 3], cache, 0)
        padded = torch.cat([tokens[:, BLOCK - 3 :], tokens[:, :5]], dim=1)  # 3 real tokens, 5 past the end
        logits = model.verify_logits(padded, cache, torch.tensor([BLOCK - 3]))
        full, _ = model(tokens)
    torch.testing.assert_close(logits[:, :3], full[:, -3:], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- greedy: the plain decoder's text


@pytest.mark.parametrize(
    "penalty", [1.0, pytest.param(1.3, marks=pytest.mark.slow)], ids=["argmax", "repetition-penalty"]
)
def test_greedy_equals_plain_greedy_over_many_prompts(model, penalty):
    tokenizer = get_tokenizer()
    plain, lookup = TextGenerator(model, tokenizer), TextGenerator(model, tokenizer, drafting=PromptLookup(4))
    options = SamplingOptions(max_new_tokens=50, temperature=0.0, repetition_penalty=penalty, ignore_eot=True)
    timing = Timing()
    for prompt in varied_prompts():  # 50 new tokens: every prompt crosses the context limit at least once
        expected = plain.generate([prompt], options)[0]
        assert lookup.generate([prompt], options, timing=timing)[0].token_ids == expected.token_ids, prompt
    # Drafts were rejected at every position, and accepted in full.
    assert set(timing.accepted_lengths) == {0, 1, 2, 3, 4}, timing.accepted_lengths
    assert timing.tokens_per_pass > 1.5


def test_rows_of_a_batch_accept_different_counts_and_match_their_single_runs(model):
    tokenizer = get_tokenizer()
    plain, lookup = TextGenerator(model, tokenizer), TextGenerator(model, tokenizer, drafting=PromptLookup(3))
    random = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    prompts = [([5, 6, 7] * 5)[:12], random, ([9, 9, 8, 1] * 3)]
    options = SamplingOptions(max_new_tokens=40, temperature=0.0, ignore_eot=True)
    batched = lookup.generate(prompts, options)
    passes = []
    for prompt, completion in zip(prompts, batched, strict=True):
        assert completion.token_ids == plain.generate([prompt], options)[0].token_ids
        alone = Timing()
        lookup.generate([prompt], options, timing=alone)
        passes.append(alone.row_passes)
    assert len(set(passes)) > 1  # the rows needed different numbers of passes


def test_stop_strings_and_max_new_tokens_end_where_plain_decoding_ends(model):
    tokenizer = get_tokenizer()
    plain, lookup = TextGenerator(model, tokenizer), TextGenerator(model, tokenizer, drafting=PromptLookup(5))
    prompt = varied_prompts()[2]
    free = plain.generate([prompt], SamplingOptions(max_new_tokens=30, temperature=0.0, ignore_eot=True))[0]
    stop = free.text[len(free.text) // 2 :][:3]
    for options in (
        SamplingOptions(max_new_tokens=30, temperature=0.0, ignore_eot=True, stop=(stop,)),
        SamplingOptions(max_new_tokens=7, temperature=0.0, ignore_eot=True),
    ):
        expected, streamed, timing = plain.generate([prompt], options)[0], [], Timing()
        got = lookup.generate(
            [prompt], options, on_text=lambda row, piece, shown=streamed: shown.append(piece), timing=timing
        )[0]
        assert (got.token_ids, got.text, got.finish_reason) == (
            expected.token_ids,
            expected.text,
            expected.finish_reason,
        )
        assert "".join(streamed) == got.text
        assert timing.accepted <= len(got.token_ids) - 1  # every accepted draft token is in the output (not the 1st)


# ---------------------------------------------------------------- sampling: the plain sampler's distribution


def exact_distribution(model: GPT2, prompt: list[int], new_tokens: int, options: SamplingOptions) -> dict:
    """The probability of every continuation under plain sampling, computed exactly from full forward passes."""
    vocab, probabilities = model.config.vocab_size, {(): 1.0}
    for _ in range(new_tokens):
        prefixes = list(probabilities)
        histories = torch.tensor([prompt + list(prefix) for prefix in prefixes])
        with torch.inference_mode():
            logits = model(histories)[0][:, -1]
        step = torch.softmax(filtered_logits(logits, histories, options), dim=-1).double()
        probabilities = {
            (*prefix, token): probabilities[prefix] * float(step[row, token])
            for row, prefix in enumerate(prefixes)
            for token in range(vocab)
        }
    return probabilities


def chi_square_critical(degrees: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability ~0.001 (Wilson-Hilferty; z is the normal 0.999 quantile)."""
    return degrees * (1 - 2 / (9 * degrees) + z * math.sqrt(2 / (9 * degrees))) ** 3


def test_sampling_with_drafts_keeps_the_plain_distribution():
    torch.manual_seed(3)
    model = GPT2(GPT2Config(vocab_size=4, n_layer=1, n_head=2, n_embd=16, block_size=32)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(4)  # sharper distributions: drafts are often accepted, often not
    prompt, new_tokens = [0, 1, 2, 3, 0, 1, 3, 2, 1], 4
    options = SamplingOptions(max_new_tokens=new_tokens, temperature=0.9, top_k=3, repetition_penalty=1.2)
    expected = exact_distribution(model, prompt, new_tokens, options)

    lookup = TextGenerator(model, get_tokenizer(), drafting=PromptLookup(2))
    rng, timing, counts = torch.Generator().manual_seed(0), Timing(), dict.fromkeys(expected, 0)
    samples = 2000
    for _ in range(samples // 500):
        for completion in lookup.generate([prompt] * 500, options, rng, timing=timing):
            counts[tuple(completion.token_ids)] += 1
    assert 0.2 < timing.acceptance_rate < 0.9  # both outcomes of the acceptance test happened often

    # Pearson's chi-square over the continuations, the rare ones pooled so every cell expects at least 5.
    cells = sorted(expected, key=expected.get, reverse=True)
    common = list(itertools.takewhile(lambda c: expected[c] * samples >= 5, cells))
    pooled = [c for c in cells if c not in common]
    observed = [counts[c] for c in common] + [sum(counts[c] for c in pooled)]
    wanted = [expected[c] * samples for c in common] + [sum(expected[c] for c in pooled) * samples]
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, wanted, strict=True) if e > 0)
    assert len(common) > 20
    assert statistic < chi_square_critical(len(common)), (statistic, len(common))


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def hf_model(shared_hf_model_factory):
    return shared_hf_model_factory(n_layer=2, n_head=4, n_embd=64, n_positions=64)


def test_cli_json_reports_the_acceptance_rate_and_greedy_text_is_unchanged(hf_model):
    _, folder = hf_model
    args = (
        "sample",
        folder,
        "--prompt",
        "a b c a b c a b",
        "--temperature",
        "0",
        "--max-new-tokens",
        "30",
        "--ignore-eot",
        "--json",
    )
    plain, lookup = run_cli(*args), run_cli(*args, "--prompt-lookup", "4")
    assert lookup.returncode == 0, lookup.stderr.decode()
    record = json.loads(lookup.stdout)
    assert record["token_ids"] == json.loads(plain.stdout)["token_ids"]
    assert record["drafted_tokens"] > 0 and 0 <= record["accepted_tokens"] <= record["drafted_tokens"]
    assert record["acceptance_rate"] == pytest.approx(record["accepted_tokens"] / record["drafted_tokens"], abs=1e-4)
    assert record["tokens_per_pass"] >= 1
    assert b"prompt lookup: " in lookup.stderr and b"tokens per pass" in lookup.stderr
    for flags in (("--dtype", "bfloat16"), ("--quantize", "int8"), ("--num-samples", "3", "--seed", "1")):
        assert run_cli(*args[:-1], "--prompt-lookup", "3", *flags).returncode == 0, flags


@pytest.mark.parametrize("value", ["0", "-2"])
def test_cli_refuses_a_draft_length_below_one(hf_model, value):
    _, folder = hf_model
    assert_one_line_error(run_cli("sample", folder, "--prompt-lookup", value), 2, "prompt_lookup")


@pytest.mark.slow  # torch.compile
def test_compiled_verify_pass_compiles_once_and_matches_eager(model):
    from torch._dynamo.utils import counters

    options = SamplingOptions(max_new_tokens=80, temperature=0.0, ignore_eot=True)  # past the context limit
    prompts = [varied_prompts()[3]]
    eager = TextGenerator(model, get_tokenizer(), drafting=PromptLookup(4)).generate(prompts, options)[0].token_ids
    torch._dynamo.reset()
    counters.clear()
    compiled = TextGenerator(model, get_tokenizer(), compile=True, drafting=PromptLookup(4))
    assert compiled.generate(prompts, options)[0].token_ids == eager
    # Each compiled once: the verification pass and the one-token step taken when nothing was drafted.
    assert counters["frames"]["total"] == counters["stats"]["unique_graphs"] == 2


def test_rows_that_finish_at_different_passes_near_the_context_limit(model):
    # Row 0 repeats itself (long accepted drafts) and ends first, near or at the block size; row 1 goes on.
    tokenizer = get_tokenizer()
    plain, lookup = TextGenerator(model, tokenizer), TextGenerator(model, tokenizer, drafting=PromptLookup(6))
    prompts = [[3, 4] * 5, torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(5)).tolist()]
    for new_tokens in range(BLOCK - 12, BLOCK + 2, 3):
        options = SamplingOptions(max_new_tokens=new_tokens, temperature=0.0, ignore_eot=True)
        batched = lookup.generate(prompts, options)
        for prompt, completion in zip(prompts, batched, strict=True):
            assert completion.token_ids == plain.generate([prompt], options)[0].token_ids


def test_a_drafter_with_probabilities_uses_the_general_rule() -> None:
    """A draft model returns its proposal's probabilities q. With q one-hot on the drafted tokens the general rule
    (accept with p/q, resample from max(0, p - q)) must draw exactly what the deterministic rule draws; with a
    spread-out q it accepts more often where q undershoots p."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 50, generator=generator)
    histories = [[1, 2], [3], [4, 5, 6]]
    drafts = [[7, 8, 9], [10], []]
    options = SamplingOptions(temperature=1.0)
    one_hot = [torch.nn.functional.one_hot(torch.tensor(d), 50).float() if d else None for d in drafts]
    for seed in range(20):
        plain = choose_with_drafts(logits, histories, [Draft(d) for d in drafts], options, torch.manual_seed(seed))
        general = [Draft(d, q) for d, q in zip(drafts, one_hot, strict=True)]
        assert choose_with_drafts(logits, histories, general, options, torch.manual_seed(seed)) == plain

    probabilities = torch.softmax(logits[0, :1], dim=-1)  # q = p at the first drafted position: always accepted
    accepted = choose_with_drafts(
        logits[:1, :2], histories[:1], [Draft([7], probabilities)], options, torch.manual_seed(1)
    )
    assert accepted[0][0] == 7 and len(accepted[0]) == 2


def test_prompt_lookup_refuses_an_empty_draft_length() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PromptLookup(0)
