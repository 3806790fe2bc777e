"""`gpt2 bench` on tiny shapes: every test kind, the output formats, MFU, the OOM path and bad input."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from gpt2cli.benchmark import Case, Runner, plan_cases
from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.runtime.devices import resolve_precision

TINY = ("--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--reps", "2", "--warmup", "1")


def bench(*args):
    return run_cli("bench", *TINY, "--device", "cpu", *args)


def test_every_test_kind_reports_positive_numbers_in_documented_json():
    result = bench("--tests", "train,fwd,pp16,tg8", "--batch-size", "1,2", "--seq-len", "16,32", "--json")
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert {"torch", "device_name", "cpu", "cores", "gpt2cli"} <= set(report["environment"])
    rows = report["results"]
    assert [(r["test"], r["batch_size"], r["seq_len"]) for r in rows] == [
        ("train", 1, 16),
        ("train", 1, 32),
        ("train", 2, 16),
        ("train", 2, 32),
        ("fwd", 1, 16),
        ("fwd", 1, 32),
        ("fwd", 2, 16),
        ("fwd", 2, 32),
        ("pp16", 1, 16),
        ("pp16", 2, 16),
        ("tg8", 1, 8),
        ("tg8", 2, 8),
    ]
    for row in rows:
        assert {
            "test",
            "batch_size",
            "seq_len",
            "dtype",
            "compile",
            "tokens_per_s",
            "tokens_per_s_std",
            "mfu",
            "peak_memory_bytes",
        } <= set(row)
        assert row["tokens_per_s"] > 0 and row["tokens_per_s_std"] >= 0 and row["peak_memory_bytes"] > 0
        assert row["mfu"] is None  # this CPU's peak is unknown: omitted, not invented
    decode = rows[-1]
    assert decode["ms_per_token"] > 0 and decode["bandwidth_gbps"] > 0
    assert b"tg8 batch 2 seq 8" in result.stderr  # progress on stderr


def test_flops_per_token_of_the_124m_preset_by_hand():
    with torch.device("meta"):
        model = GPT2(GPT2Config.from_preset("gpt2"))
    n = 124_439_808 - 1024 * 768  # parameters without the position embeddings
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024 == 855_166_464


def test_mfu_with_a_given_peak():
    rows = json.loads(bench("--tests", "train,fwd,pp16", "--peak-tflops", "1.0", "--json").stdout)["results"]
    with torch.device("meta"):
        model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=32))
    n, head = model.num_parameters(exclude_positions=True), 50257 * 32
    for row in rows:
        flops = model.flops_per_token(row["seq_len"])
        if row["test"] == "fwd":
            flops /= 3  # a forward pass is a third of a training step
        elif row["test"] == "pp16":  # a forward pass whose output head runs for the last position only
            flops = 2 * (n - head) + 4 * 2 * 32 * 16 + 2 * head / 16
        assert row["mfu"] == pytest.approx(flops * row["tokens_per_s"] / 1e12, rel=1e-9)


def test_out_of_memory_is_reported_and_the_rest_carries_on(monkeypatch):
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=32))
    runner = Runner(model, resolve_precision("float32", torch.device("cpu")), compile=False)
    original = runner.work

    def work(case):
        if case.batch_size == 4:

            def allocate() -> None:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

            return allocate
        return original(case)

    monkeypatch.setattr(runner, "work", work)
    results = [runner.run(case, reps=2, warmup=1) for case in plan_cases(["fwd"], [1, 4, 2], [16], 32)]
    assert [r.error for r in results] == [None, "OOM", None]
    assert results[1].tokens_per_s is None and results[2].tokens_per_s > 0
    assert results[1].as_dict()["error"] == "OOM"


def test_other_errors_are_not_mistaken_for_oom(monkeypatch):
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=32))
    runner = Runner(model, resolve_precision("float32", torch.device("cpu")), compile=False)

    def broken() -> None:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(runner, "work", lambda case: broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        runner.run(Case("fwd", 1, 16), reps=1, warmup=0)


def test_without_getrusage_the_cpu_run_reports_no_peak_memory(monkeypatch):
    """Windows has no `resource` module (imported by the CPU branch only): the case still runs and reports."""
    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` now raises ImportError
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=32))
    runner = Runner(model, resolve_precision("float32", torch.device("cpu")), compile=False)
    result = runner.run(Case("fwd", 1, 16), reps=1, warmup=0)
    assert result.tokens_per_s > 0 and result.peak_memory_bytes is None


@pytest.mark.parametrize("output_format", ["csv", "jsonl", "md", "table"])
def test_output_formats_carry_the_same_rows(output_format):
    result = bench("--tests", "fwd,tg4", "--format", output_format)
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    if output_format == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [row["test"] for row in rows] == ["fwd", "tg4"] and float(rows[0]["tokens_per_s"]) > 0
    elif output_format == "jsonl":
        assert [json.loads(line)["test"] for line in text.splitlines()] == ["fwd", "tg4"]
    elif output_format == "md":
        assert text.splitlines()[0].startswith("| device |") and len(text.splitlines()) == 4
    else:
        assert "fwd" in text and "tg4" in text and "tokens/s" in text


def test_bad_input():
    assert_one_line_error(bench("--tests", "train,warp9"), 2, "unknown test 'warp9'")
    assert_one_line_error(bench("--reps", "0"), 2, "bench.reps")
    assert_one_line_error(bench("--tests", "pp64"), 2, "block size is 32")
    assert_one_line_error(bench("--batch-size", "1,x"), 2, "comma list")
    if not torch.cuda.is_available():
        assert_one_line_error(run_cli("bench", *TINY, "--device", "cuda"), 2, "CUDA is not available")
