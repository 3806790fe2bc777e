"""`gpt2 eval` against losses computed directly with transformers' GPT2LMHeadModel."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import FIXTURES, assert_one_line_error, biased_model, run_cli, shakespeare_text
from gpt2cli import get_tokenizer
from gpt2cli.evaluation import sliding_windows

TEXT = shakespeare_text()[:6000]


@pytest.fixture(scope="module")
def hf_model(shared_hf_model_factory):  # read only: built once
    return shared_hf_model_factory(n_layer=2, n_head=4, n_embd=64, n_positions=64)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def reference_loss(model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """Summed loss over the same windows, straight from transformers' logits."""
    tokens = torch.tensor(ids)
    total, count = 0.0, 0
    for window in sliding_windows(len(ids), context, stride):
        inputs = tokens[window.begin : window.end][None]
        targets = tokens[window.begin + 1 : window.end + 1]
        with torch.no_grad():
            logits = model(inputs).logits[0].double()
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[-window.scored :]
        total += losses.sum().item()
        count += window.scored
    return total / count, count


@pytest.mark.parametrize(("context", "stride"), [(64, 64), (64, 16), (40, 40)])
def test_loss_and_perplexity_match_transformers(hf_model, text_file, context, stride):
    reference, folder = hf_model
    ids = get_tokenizer().encode(TEXT)
    expected, count = reference_loss(reference, ids, context, stride)
    result = run_cli("eval", folder, text_file, "--context", context, "--stride", stride, "--batch-size", "3", "--json")
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert report["loss"] == pytest.approx(expected, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert report["tokens"] == count == len(ids) - 1  # every token but the first, once
    assert report["bits_per_byte"] == pytest.approx(expected * count / math.log(2) / len(TEXT.encode()), rel=1e-5)
    low, high = report["ci95"]
    assert low < report["loss"] < high


def test_windows_cover_every_token_once():
    for n, context, stride in [(2, 8, 8), (100, 16, 16), (100, 16, 5), (101, 10, 1), (17, 16, 8)]:
        covered = []
        for window in sliding_windows(n, context, stride):
            assert window.end - window.begin <= context and window.end <= n - 1
            covered += range(window.end - window.scored + 1, window.end + 1)
        assert covered == list(range(1, n))
    assert sliding_windows(1, 8, 8) == []


def test_shards_and_max_tokens(hf_model, text_file, tmp_path):
    _, folder = hf_model
    shard = tmp_path / "text.bin"
    assert run_cli("tokenize", text_file, "-o", shard).returncode == 0
    result = json.loads(run_cli("eval", folder, shard, "--json").stdout)
    assert result["tokens"] == len(get_tokenizer().encode(TEXT))  # the shard's leading <|endoftext|> adds one
    assert result["bits_per_byte"] is None  # bytes are only known for text input
    capped = json.loads(run_cli("eval", folder, text_file, "--max-tokens", "100", "--json").stdout)
    assert capped["tokens"] == 99


def test_table_output(hf_model, text_file):
    _, folder = hf_model
    result = run_cli("eval", folder, text_file)
    assert result.returncode == 0
    assert b"perplexity" in result.stdout and b"bits per byte" in result.stdout


# ---------------------------------------------------------------- multiple choice


def test_multiple_choice_losses_equal_a_direct_computation(hf_model):
    from gpt2cli import load_model
    from gpt2cli.evaluation import ending_losses, read_multiple_choice
    from gpt2cli.runtime.devices import Precision

    reference, folder = hf_model
    tokenizer = get_tokenizer()
    example = read_multiple_choice(str(FIXTURES / "hellaswag_tiny.jsonl"))[0]
    ours = ending_losses(load_model(folder), tokenizer, example, Precision(torch.device("cpu"), None))
    context = tokenizer.encode(example.context)
    for (total, count), ending in zip(ours, example.endings, strict=True):
        ending_ids = tokenizer.encode(" " + ending)
        tokens = torch.tensor([context + ending_ids])
        with torch.no_grad():
            logits = reference(tokens).logits[0, :-1]
        losses = torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="none")[-len(ending_ids) :]
        assert count == len(ending_ids)
        assert total == pytest.approx(losses.sum().item(), rel=1e-5)


def test_a_model_built_to_prefer_the_right_endings_scores_100_percent(tmp_path):
    examples = [json.loads(line) for line in (FIXTURES / "hellaswag_tiny.jsonl").read_text().splitlines()]
    right_words = " ".join(example["endings"][example["label"]] for example in examples)
    checkpoint = biased_model(tmp_path / "biased.safetensors", set(get_tokenizer().encode(" " + right_words)))
    result = run_cli("eval", checkpoint, FIXTURES / "hellaswag_tiny.jsonl", "--task", "hellaswag", "--json")
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout) == {"acc": 1.0, "acc_norm": 1.0, "n": 3}
    limited = run_cli(
        "eval", checkpoint, FIXTURES / "hellaswag_tiny.jsonl", "--task", "hellaswag", "--limit", "1", "--json"
    )
    assert json.loads(limited.stdout)["n"] == 1


# ---------------------------------------------------------------- bad input


def test_empty_and_too_short_data(hf_model, tmp_path):
    _, folder = hf_model
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(run_cli("eval", folder, empty), 1, "empty")
    one = tmp_path / "one.txt"
    one.write_text("Hello")
    assert_one_line_error(run_cli("eval", folder, one), 1, "fewer than two tokens")
    short = tmp_path / "short.txt"
    short.write_text("Hello world, this is short.")  # shorter than one window: scored as it is
    assert json.loads(run_cli("eval", folder, short, "--json").stdout)["tokens"] == 6


def test_bad_windows(hf_model, text_file):
    _, folder = hf_model
    assert_one_line_error(run_cli("eval", folder, text_file, "--context", "32", "--stride", "64"), 2, "stride")
    assert_one_line_error(run_cli("eval", folder, text_file, "--stride", "0"), 2, "eval.stride")
    assert_one_line_error(run_cli("eval", folder, text_file, "--context", "65"), 2, "block size 64")
    assert_one_line_error(run_cli("eval", folder, text_file, "--stride", "100"), 2, "must not exceed")


def test_malformed_multiple_choice(hf_model, tmp_path):
    _, folder = hf_model
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"ctx": "A", "endings": ["b", "c"], "label": 0})
    path.write_text(good + "\n{broken\n")
    assert_one_line_error(run_cli("eval", folder, path, "--task", "hellaswag"), 1, "bad.jsonl:2: invalid JSON")
    path.write_text(good + "\n" + json.dumps({"ctx": "A", "endings": ["b", "c"], "label": 2}) + "\n")
    assert_one_line_error(
        run_cli("eval", folder, path, "--task", "hellaswag"), 1, "bad.jsonl:2: label 2 is out of range"
    )


def test_malformed_jsonl_text(hf_model, tmp_path):
    _, folder = hf_model
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"text": 3}\n')
    assert_one_line_error(run_cli("eval", folder, path), 1, "docs.jsonl:2")


def test_missing_data_and_checkpoint(hf_model, tmp_path):
    _, folder = hf_model
    assert_one_line_error(run_cli("eval", folder, tmp_path / "none.txt"), 2, "no such file")
    assert_one_line_error(run_cli("eval", tmp_path / "none", tmp_path / "none.txt"), 2, "no such file")
