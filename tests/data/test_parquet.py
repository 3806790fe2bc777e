"""Parquet input (FineWeb's format) for `gpt2 tokenize`, `gpt2 train` and `gpt2 eval`, checked against tiktoken."""

from __future__ import annotations

import importlib.resources
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from conftest import assert_one_line_error, cli_env, run_cli, run_cli_process, shakespeare_text
from gpt2cli.data.encoding import EncodeOptions
from gpt2cli.data.inputs import load_token_data, resolve_inputs
from gpt2cli.data.shards import read_shard
from gpt2cli.data.tokenizer import SPLIT_PATTERN, VOCAB_SHA256
from gpt2cli.evaluation import load_eval_tokens

EOT = 50256
FIELD = "content"  # not the default `text`: --text-field must be honoured


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tiktoken.Encoding:
    """GPT-2 built by tiktoken's own file loader, independent of gpt2cli.data.tokenizer."""
    vocab = importlib.resources.files("gpt2cli.assets").joinpath("gpt2.tiktoken")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))
        ranks = load_tiktoken_bpe(str(vocab), expected_hash=VOCAB_SHA256)
    return tiktoken.Encoding(name="ref", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})


def make_documents(count: int, seed: int = 0) -> list[str]:
    """Documents of 1-60 shuffled Shakespeare lines, some with non-ASCII text, one empty."""
    lines = [line for line in shakespeare_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    documents = ["\n".join(rng.choices(lines, k=rng.randint(1, 60))) for _ in range(count)]
    documents[1] += " — café, 東京 🤖"
    documents[2] = ""
    return documents


def write_parquet(path, documents, row_group_size: int = 100, **extra_columns) -> None:
    table = pa.table({"id": list(range(len(documents))), FIELD: documents, **extra_columns})
    pq.write_table(table, path, row_group_size=row_group_size)


def expected_stream(reference: tiktoken.Encoding, documents) -> list[int]:
    """llm.c's layout: `<|endoftext|>` before each document."""
    return [token for doc in documents if doc is not None for token in (EOT, *reference.encode_ordinary(doc))]


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return make_documents(600)  # ~1.2 MB of text: several 256 KiB work units, so two workers really share it


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory, documents):
    path = tmp_path_factory.mktemp("parquet") / "docs.parquet"
    write_parquet(path, documents)
    assert pq.ParquetFile(path).num_row_groups == 6
    return path


@pytest.mark.parametrize("workers", ["1", "2"])
def test_tokens_equal_tiktoken_for_any_worker_count(tmp_path, parquet_file, documents, reference, workers):
    out = tmp_path / "docs.bin"
    result = run_cli("tokenize", parquet_file, "--text-field", FIELD, "-o", out, "--workers", workers, "--json")
    assert result.returncode == 0, result.stderr
    expected = expected_stream(reference, documents)
    assert read_shard(out).tolist() == expected
    summary = json.loads(result.stdout)
    assert summary["documents"] == len(documents) and summary["null_rows"] == 0
    assert summary["tokens"] == len(expected) - len(documents) and summary["shard_tokens"] == len(expected)


def test_folders_and_globs_of_parquet_files(tmp_path, documents, reference):
    folder = tmp_path / "fineweb"
    folder.mkdir()
    write_parquet(folder / "000_00000.parquet", documents[:40], row_group_size=7)
    write_parquet(folder / "001_00000.parquet", documents[40:100], row_group_size=7)
    (folder / "notes.txt").write_text("not data")
    expected = expected_stream(reference, documents[:100])
    for given in (folder, str(folder / "*.parquet")):
        out = tmp_path / "out.bin"
        result = run_cli("tokenize", given, "--text-field", FIELD, "-o", out)
        assert result.returncode == 0, result.stderr
        assert read_shard(out).tolist() == expected
    # Training reads the same folder (tokenized and cached per file), evaluation the same glob.
    options = EncodeOptions(text_field=FIELD)
    data = load_token_data([str(folder)], [], 0.0, options, tmp_path / "cache", workers=1)
    assert np.concatenate(data.train).tolist() == expected
    streams = load_eval_tokens([str(path) for path in resolve_inputs([str(folder / "*.parquet")])], options).streams
    per_file = [expected_stream(reference, documents[:40]), expected_stream(reference, documents[40:100])]
    assert [stream.tolist() for stream in streams] == [tokens[1:] for tokens in per_file]  # separators between


def test_val_tokens_max_tokens_and_shard_size_as_llm_c_names_them(tmp_path, parquet_file, documents, reference):
    expected = expected_stream(reference, documents)
    result = run_cli(
        "tokenize",
        parquet_file,
        "--text-field",
        FIELD,
        "-o",
        tmp_path / "fw.bin",
        "--val-tokens",
        "10000",
        "--shard-size",
        "40000",
        "--max-tokens",
        "100000",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    names = ["fw_val_000000.bin", "fw_train_000001.bin", "fw_train_000002.bin", "fw_train_000003.bin"]
    assert json.loads(result.stdout)["shards"] == [str(tmp_path / name) for name in names]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names)  # nothing else left behind
    shards = [read_shard(tmp_path / name).tolist() for name in names]
    assert [len(shard) for shard in shards] == [10000, 40000, 40000, 10000]
    assert [token for shard in shards for token in shard] == expected[:100000]
    # A folder as training data leaves the validation shard out; it is given with --val-data.
    assert [path.name for path in resolve_inputs([str(tmp_path)], skip_val_shards=True)] == names[1:]
    data = load_token_data([str(tmp_path)], [str(tmp_path / names[0])], 0.0, EncodeOptions(), tmp_path / "cache")
    assert data.train_tokens == 90000 and data.val_tokens == 10000
    # Without --shard-size: one validation shard and one training shard.
    single = tmp_path / "single"
    single.mkdir()
    args = ("tokenize", parquet_file, "--text-field", FIELD, "-o", single / "fw.bin", "--val-tokens", "5000")
    assert run_cli(*args).returncode == 0
    assert read_shard(single / "fw_train_000001.bin").tolist() == expected[5000:]


def test_null_rows_are_skipped_and_counted(tmp_path, documents, reference):
    with_nulls = [None if index % 5 == 3 else doc for index, doc in enumerate(documents[:50])]
    path = tmp_path / "nulls.parquet"
    write_parquet(path, with_nulls, row_group_size=8)
    out = tmp_path / "nulls.bin"
    result = run_cli("tokenize", path, "--text-field", FIELD, "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    assert read_shard(out).tolist() == expected_stream(reference, with_nulls)
    summary = json.loads(result.stdout)
    assert summary["null_rows"] == 10 and summary["documents"] == 40
    assert "skipped 10 null rows" in result.stderr.decode()


def test_bad_parquet_input(tmp_path, parquet_file):
    out = tmp_path / "out.bin"
    missing = run_cli("tokenize", parquet_file, "-o", out)  # the default column, `text`, is not there
    assert_one_line_error(missing, 1, "no column 'text'", f"columns: id, {FIELD}")
    numbers = tmp_path / "numbers.parquet"
    write_parquet(numbers, ["a", "b"], numbers=[1.5, 2.5])
    wrong_type = run_cli("tokenize", numbers, "--text-field", "numbers", "-o", out)
    assert_one_line_error(wrong_type, 1, "column 'numbers' holds double, not text")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not Parquet at all")
    assert_one_line_error(run_cli("tokenize", garbage, "-o", out), 1, "garbage.parquet: not a readable Parquet file")
    # A file whose footer is intact but whose data pages are damaged fails while reading, naming the file.
    damaged = tmp_path / "damaged.parquet"
    data = bytearray(parquet_file.read_bytes())
    data[200:60000] = bytes(59800)
    damaged.write_bytes(bytes(data))
    assert_one_line_error(run_cli("tokenize", damaged, "--text-field", FIELD, "-o", out), 1, "damaged.parquet:")
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli("tokenize", empty, "-o", out), 2, "is a directory with no .parquet files")


def test_without_pyarrow_the_extra_is_named(tmp_path, parquet_file):
    blocker = tmp_path / "blocker" / "pyarrow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no pyarrow here')\n")
    env = cli_env(PYTHONPATH=str(blocker.parent))
    # A real process: this one has pyarrow imported already.
    result = run_cli_process("tokenize", parquet_file, "--text-field", FIELD, "-o", tmp_path / "x.bin", env=env)
    assert_one_line_error(result, 2, "pip install 'gpt2cli[parquet]'")


def test_eval_reads_parquet_like_jsonl(tmp_path, documents):
    import torch

    from gpt2cli import save_model
    from gpt2cli.model.gpt2 import GPT2, GPT2Config

    write_parquet(tmp_path / "docs.parquet", documents[:30])
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({FIELD: doc}) + "\n" for doc in documents[:30]))
    options = EncodeOptions(text_field=FIELD)
    parquet, jsonl = (load_eval_tokens([str(tmp_path / name)], options) for name in ("docs.parquet", "docs.jsonl"))
    assert [stream.tolist() for stream in parquet.streams] == [stream.tolist() for stream in jsonl.streams]
    assert parquet.text_bytes == jsonl.text_bytes
    torch.manual_seed(0)
    checkpoint = save_model(GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=32)), tmp_path / "m.safetensors")
    args = ("eval", checkpoint, tmp_path / "docs.parquet", "--text-field", FIELD, "--max-tokens", "3000", "--json")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokens"] == 2999
