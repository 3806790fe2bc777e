"""`gpt2 train --hellaswag`: scored at every evaluation; equal to `gpt2 eval --task hellaswag` on the same weights."""

from __future__ import annotations

import json

from conftest import FIXTURES, assert_one_line_error, cli_env, run_cli

HELLASWAG = FIXTURES / "hellaswag_tiny.jsonl"
TINY = [
    "--n-layer",
    "2",
    "--n-head",
    "2",
    "--n-embd",
    "32",
    "--block-size",
    "64",
    "--batch-size",
    "4",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--lr",
    "3e-3",
    "--log-interval",
    "1",
]


def test_in_training_scores_equal_gpt2_eval_on_the_saved_checkpoints(tmp_path, corpus):
    out = tmp_path / "run"
    env = cli_env(GPT2_DATA__CACHE_DIR=str(tmp_path / "cache"))
    result = run_cli(
        "train",
        corpus,
        *TINY,
        "--max-steps",
        "6",
        "--eval-interval",
        "3",
        "--save-interval",
        "3",
        "--keep",
        "2",
        "--hellaswag",
        HELLASWAG,
        "--out",
        out,
        "--json",
        env=env,
    )
    assert result.returncode == 0, result.stderr.decode()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [record for record in records if "hellaswag_acc" in record]
    assert [record["step"] for record in scored] == [3, 6]  # every evaluation step, and only those
    assert all("val_loss" in record for record in scored)
    for record in scored:
        checkpoint = out / "checkpoints" / f"step-{record['step']:06d}" / "model.safetensors"
        evaluated = run_cli(
            "eval",
            checkpoint,
            HELLASWAG,
            "--task",
            "hellaswag",
            "--dtype",
            "float32",
            "--json",
            "--device",
            "cpu",
            env=env,
        )
        assert evaluated.returncode == 0, evaluated.stderr.decode()
        expected = json.loads(evaluated.stdout)
        assert (record["hellaswag_acc"], record["hellaswag_acc_norm"]) == (expected["acc"], expected["acc_norm"])
    assert json.loads(result.stdout)["hellaswag_acc_norm"] == scored[-1]["hellaswag_acc_norm"]
    assert "hellaswag " in result.stderr.decode()  # shown on the progress lines


def test_a_limit_and_a_bad_file_are_checked_before_the_run_starts(tmp_path, corpus):
    env = cli_env(GPT2_DATA__CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "limited"
    result = run_cli(
        "train",
        corpus,
        *TINY,
        "--max-steps",
        "1",
        "--val-fraction",
        "0",
        "--hellaswag",
        HELLASWAG,
        "--hellaswag-limit",
        "1",
        "--out",
        out,
        env=env,
    )
    assert result.returncode == 0, result.stderr.decode()
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["hellaswag_acc"] in (0.0, 1.0) and "val_loss" not in record  # one example, no validation data
    missing = run_cli("train", corpus, *TINY, "--hellaswag", tmp_path / "none.jsonl", "--out", tmp_path / "x", env=env)
    assert_one_line_error(missing, 2, "none.jsonl: no such file")
    assert not (tmp_path / "x").exists()
