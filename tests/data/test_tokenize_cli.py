"""`gpt2 tokenize` through the real CLI, checked against tiktoken's own loader and encoder."""

from __future__ import annotations

import importlib.resources
import json
import subprocess
import sys

import numpy as np
import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from conftest import assert_one_line_error, cli_env, run_cli, shakespeare_text
from gpt2cli.data.shards import HEADER_BYTES, SHARD_MAGIC
from gpt2cli.data.tokenizer import SPLIT_PATTERN, VOCAB_SHA256

EOT = 50256


@pytest.fixture(scope="module")
def reference_encoding(tmp_path_factory) -> tiktoken.Encoding:
    """GPT-2 built by tiktoken's own file loader, independent of gpt2cli.data.tokenizer."""
    vocab = importlib.resources.files("gpt2cli.assets").joinpath("gpt2.tiktoken")
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        ranks = load_tiktoken_bpe(str(vocab), expected_hash=VOCAB_SHA256)
    return tiktoken.Encoding(
        name="gpt2-reference", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT}
    )


@pytest.fixture(scope="module")
def shakespeare_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(shakespeare_text(), encoding="utf-8")
    return path


def read_shard(path) -> tuple[np.ndarray, np.ndarray]:
    data = path.read_bytes()
    header = np.frombuffer(data[:HEADER_BYTES], dtype="<i4")
    return header, np.frombuffer(data[HEADER_BYTES:], dtype="<u2")


def test_ids_on_stdout():
    result = run_cli("tokenize", input="Hello world")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"15496 995\n"
    assert result.stderr == b""


def test_count_and_json():
    assert run_cli("tokenize", "--count", input="Hello world").stdout == b"2\n"
    result = run_cli("tokenize", "-", "--count", "--json", input="Hello world")
    summary = json.loads(result.stdout)
    assert summary["tokens"] == 2 and summary["documents"] == 1


def test_shard_equals_tiktoken_encoding(tmp_path, shakespeare_file, reference_encoding):
    out = tmp_path / "shakespeare.bin"
    result = run_cli("tokenize", shakespeare_file, "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    expected = [EOT, *reference_encoding.encode_ordinary(shakespeare_text())]
    header, tokens = read_shard(out)
    assert header[:3].tolist() == [SHARD_MAGIC, 1, len(expected)]
    assert not header[3:].any()
    assert out.stat().st_size == HEADER_BYTES + 2 * len(expected)
    assert np.array_equal(tokens, np.array(expected, dtype=np.uint16))
    summary = json.loads(result.stdout)
    assert summary["tokens"] == len(expected) - 1 and summary["shards"] == [str(out)]
    assert b"wrote" in result.stderr  # the human summary goes to stderr


def test_worker_count_does_not_change_the_tokens(tmp_path, shakespeare_file):
    outputs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}.bin"
        assert run_cli("tokenize", shakespeare_file, "-o", out, "--workers", workers).returncode == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_ids_decode_round_trip(shakespeare_file):
    ids = run_cli("tokenize", shakespeare_file)
    assert ids.returncode == 0
    assert ids.stdout.count(b"\n") == 1  # one document, one line
    text = run_cli("tokenize", "--decode", input=ids.stdout)
    assert text.returncode == 0, text.stderr
    assert text.stdout.decode() == shakespeare_text()


def test_shard_decode_round_trip(tmp_path):
    (tmp_path / "a.txt").write_text("First document.\n")
    (tmp_path / "b.txt").write_text("Second, with émoji 🤖.")
    out = tmp_path / "ab.bin"
    assert run_cli("tokenize", tmp_path / "a.txt", tmp_path / "b.txt", "-o", out).returncode == 0
    decoded = run_cli("tokenize", "--decode", out)
    assert decoded.stdout.decode() == "<|endoftext|>First document.\n<|endoftext|>Second, with émoji 🤖."
    piped = run_cli("tokenize", "--decode", "-", input=out.read_bytes())  # a shard on stdin is recognised
    assert piped.stdout == decoded.stdout


def test_jsonl_documents_and_text_field(tmp_path, reference_encoding):
    docs = ["one document", "another\nwith a newline", "<|endoftext|> inside"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": doc, "id": i}) + "\n" for i, doc in enumerate(docs)))
    out = tmp_path / "docs.bin"
    result = run_cli("tokenize", path, "-o", out, "--text-field", "body")
    assert result.returncode == 0, result.stderr
    expected = [token for doc in docs for token in (EOT, *reference_encoding.encode_ordinary(doc))]
    assert read_shard(out)[1].tolist() == expected
    lines = run_cli("tokenize", path, "--text-field", "body").stdout.decode().splitlines()
    assert [list(map(int, line.split())) for line in lines] == [reference_encoding.encode_ordinary(d) for d in docs]


def test_special_flag_encodes_endoftext(tmp_path):
    assert run_cli("tokenize", "--special", input="a<|endoftext|>b").stdout == b"64 50256 65\n"
    assert b"50256" not in run_cli("tokenize", input="a<|endoftext|>b").stdout


def test_shard_size_splits_the_stream(tmp_path, shakespeare_file):
    whole = tmp_path / "whole.bin"
    assert run_cli("tokenize", shakespeare_file, "-o", whole).returncode == 0
    result = run_cli("tokenize", shakespeare_file, "-o", tmp_path / "part.bin", "--shard-size", "500000", "--json")
    assert result.returncode == 0, result.stderr
    names = [f"part_{i:06d}.bin" for i in range(4)]
    assert json.loads(result.stdout)["shards"] == [str(tmp_path / name) for name in names]
    parts = [read_shard(tmp_path / name) for name in names]
    assert [header[2] for header, _ in parts] == [500000, 500000, 500000, read_shard(whole)[0][2] - 1_500_000]
    assert np.array_equal(np.concatenate([tokens for _, tokens in parts]), read_shard(whole)[1])


def test_closed_stdout_ends_quietly(shakespeare_file):
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt2cli", "tokenize", str(shakespeare_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    assert process.stdout.read(10)
    process.stdout.close()  # like `| head -c 10`
    assert process.wait(timeout=60) == 0
    assert process.stderr.read() == b""


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    assert_one_line_error(run_cli("tokenize", tmp_path / "nope.txt"), 2, "nope.txt: no such file")


def test_directory(tmp_path):
    assert_one_line_error(run_cli("tokenize", tmp_path), 2, "is a directory")


def test_invalid_utf8_names_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"plain ascii then caf\xe9 au lait")
    out = tmp_path / "out.bin"
    assert_one_line_error(run_cli("tokenize", path, "-o", out), 1, "invalid UTF-8 at byte 20", "--errors replace")
    assert list(tmp_path.iterdir()) == [path]
    replaced = run_cli("tokenize", path, "--errors", "replace")
    assert replaced.returncode == 0
    assert (
        run_cli("tokenize", "--decode", input=replaced.stdout).stdout.decode() == "plain ascii then caf\ufffd au lait"
    )


def test_empty_input_writes_no_shard(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out.bin"
    assert_one_line_error(run_cli("tokenize", empty, "-o", out), 1, "empty")
    assert not out.exists() and list(tmp_path.iterdir()) == [empty]
    assert_one_line_error(run_cli("tokenize", input=""), 1, "empty")


def test_failure_midway_leaves_no_shards(tmp_path, shakespeare_file):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe")
    result = run_cli("tokenize", shakespeare_file, bad, "-o", tmp_path / "x.bin", "--shard-size", "100000")
    assert_one_line_error(result, 1, "bad.txt: invalid UTF-8 at byte 5")
    assert list(tmp_path.iterdir()) == [bad]


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{not json}\n')
    assert_one_line_error(run_cli("tokenize", path), 1, "docs.jsonl:3: invalid JSON")
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    assert_one_line_error(run_cli("tokenize", path), 1, "docs.jsonl:2: no string field 'text'")


def test_decode_rejects_a_shard_with_the_wrong_magic(tmp_path):
    path = tmp_path / "wrong.bin"
    path.write_bytes(np.array([12345, 1, 2] + [0] * 253, dtype="<i4").tobytes() + b"\x00\x01\x00\x02")
    assert_one_line_error(run_cli("tokenize", "--decode", path), 1, "not a token shard")


def test_decode_rejects_a_truncated_shard(tmp_path):
    (tmp_path / "t.txt").write_text("some text to cut short " * 20)
    out = tmp_path / "t.bin"
    assert run_cli("tokenize", tmp_path / "t.txt", "-o", out).returncode == 0
    out.write_bytes(out.read_bytes()[:-10])
    assert_one_line_error(run_cli("tokenize", "--decode", out), 1, "truncated shard")


def test_decode_rejects_ids_outside_the_vocabulary(tmp_path):
    assert_one_line_error(run_cli("tokenize", "--decode", input="15496 50257\n"), 1, "token id 50257 is outside")
    assert_one_line_error(run_cli("tokenize", "--decode", input="15496 hello\n"), 1, "'hello' is not a token id")
    shard = tmp_path / "big.bin"
    shard.write_bytes(np.array([SHARD_MAGIC, 1, 2] + [0] * 253, dtype="<i4").tobytes() + b"\x00\x01\xff\xff")
    assert_one_line_error(run_cli("tokenize", "--decode", shard), 1, "token id 65535 is outside")


def test_conflicting_flags_are_usage_errors(tmp_path):
    assert_one_line_error(run_cli("tokenize", "--decode", "--count"), 2, "cannot be combined")
    assert_one_line_error(run_cli("tokenize", "--count", "-o", tmp_path / "x.bin"), 2, "-o writes token shards")
    assert_one_line_error(run_cli("tokenize", "-o", tmp_path / "no" / "x.bin", input="hi"), 2, "does not exist")


def test_jsonl_error_line_number_counts_across_chunks(tmp_path):
    path = tmp_path / "many.jsonl"
    lines = [json.dumps({"text": f"document number {i} " * 20}) for i in range(5000)]  # ~2 MB: many chunks
    lines[4321] = '{"text": broken'
    path.write_text("\n".join(lines) + "\n")
    assert_one_line_error(run_cli("tokenize", path, "--workers", "2"), 1, "many.jsonl:4322: invalid JSON")
