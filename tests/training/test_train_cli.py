"""`gpt2 train` through the real CLI: learning, the run folder and --json, checkpoints, exact resume, interrupts, inputs
and bad input. The Trainer in-process is tested in test_trainer.py, the fused loss in test_loss.py."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import assert_one_line_error, cli_env, run_cli, shakespeare_text
from gpt2cli import get_tokenizer, load_model

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4"]
EXACT = ["--device", "cpu", "--dtype", "float32", "--log-interval", "1"]
# What `--json` prints, in this order (HellaSwag's two scores follow val_loss where --hellaswag is given).
SUMMARY_KEYS = [
    "out",
    "model",
    "steps",
    "tokens",
    "elapsed_s",
    "train_s",
    "train_loss",
    "val_loss",
    "tokens_per_s",
    "device",
    "dtype",
]


@pytest.fixture
def env(tmp_path):
    return cli_env(GPT2_DATA__CACHE_DIR=str(tmp_path / "cache"))


def train(*args, env, **kwargs):
    return run_cli("train", *args, env=env, **kwargs)


def assert_stops_with(result, code: int, *fragments: str) -> str:
    """A failure during training: progress lines may come first, then one `gpt2: error:` line; no traceback."""
    stderr = result.stderr.decode()
    assert result.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("gpt2: error: ") and all(fragment in last for fragment in fragments), stderr
    return last


def losses(out) -> dict[int, float]:
    return {
        record["step"]: record["loss"] for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    }


def test_loss_falls_and_the_run_folder_is_complete(tmp_path, corpus, env):
    out = tmp_path / "run"
    result = train(corpus, *TINY, *EXACT, "--max-steps", "40", "--lr", "3e-3", "--out", out, "--json", env=env)
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)
    curve = losses(out)
    assert curve[1] > 10.5 and summary["train_loss"] < curve[1] - 2.0  # from ~ln(50257) towards text statistics
    assert summary["steps"] == 40 and summary["val_loss"] < 10.0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000040"  # the last step is saved
    assert {"model.safetensors", "config.json", "config.toml", "metrics.jsonl", "checkpoints"} <= {
        p.name for p in out.iterdir()
    }
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tok_per_s", "mfu", "elapsed_s", "val_loss"} <= set(record)
    stderr = result.stderr.decode()
    assert "train: " in stderr and "batch_size=4" in stderr  # resolved settings printed at start
    assert f"gpt2 sample {out / 'model.safetensors'}" in stderr


def test_saved_run_loads_in_transformers_with_the_same_logits(tmp_path, corpus, env):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "run"
    assert train(corpus, *TINY, *EXACT, "--max-steps", "3", "--out", out, env=env).returncode == 0
    ours = load_model(out)
    reference = GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], reference(idx).logits)


def test_resume_continues_bit_for_bit(tmp_path, corpus, exact_env):
    env = exact_env
    common = [corpus, *TINY, *EXACT, "--dropout", "0.1", "--val-fraction", "0.1", "--eval-interval", "3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(*common, "--max-steps", "8", "--out", straight, env=env).returncode == 0
    assert train(*common, "--max-steps", "4", "--schedule-steps", "8", "--out", split, env=env).returncode == 0
    resumed = train("--resume", "--out", split, "--max-steps", "8", env=env)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert losses(split) == losses(straight)  # every step, bitwise (float32 on the CPU)
    for name, tensor in load_model(straight).state_dict().items():
        assert torch.equal(tensor, load_model(split).state_dict()[name]), name


def test_a_run_started_with_relative_paths_resumes_from_another_folder(tmp_path, corpus, env):
    started = train(
        corpus.name, *TINY, *EXACT, "--max-steps", "2", "--schedule-steps", "4", "--out", "run", env=env, cwd=tmp_path
    )
    assert started.returncode == 0, started.stderr.decode()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = train("--resume", "--out", tmp_path / "run", "--max-steps", "4", env=env, cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]
    assert str(corpus) in (tmp_path / "run" / "config.toml").read_text()  # saved as an absolute path


@pytest.mark.slow  # a real process, signalled mid-run, then runs to compare with
def test_ctrl_c_saves_then_resume_matches_an_uninterrupted_run(tmp_path, corpus, exact_env):
    env = exact_env
    common = [corpus, *TINY, *EXACT, "--max-steps", "400", "--save-interval", "1000", "--eval-interval", "1000"]
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt2cli", "train", *map(str, common), "--out", str(interrupted)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    metrics = interrupted / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr.decode()
    assert f"gpt2 train --resume --out {interrupted}" in stderr.decode()
    stopped_at = max(losses(interrupted))
    assert 5 <= stopped_at < 400
    assert load_model(interrupted).config.n_layer == 2  # the checkpoint written on the way out loads

    resumed = train("--resume", "--out", interrupted, "--max-steps", str(stopped_at + 5), env=env)
    assert resumed.returncode == 0, resumed.stderr.decode()
    straight = tmp_path / "straight"
    reference = [corpus, *TINY, *EXACT, "--schedule-steps", "400", "--max-steps", str(stopped_at + 5)]
    assert train(*reference, "--out", straight, env=env).returncode == 0
    assert losses(interrupted) == losses(straight)


@pytest.mark.slow  # a real process, signalled mid-run, then runs to compare with
def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path, corpus, env):
    out = tmp_path / "killed"
    args = [corpus, *TINY, *EXACT, "--max-steps", "1000", "--save-interval", "1", "--out", out]
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt2cli", "train", *map(str, args)], stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "latest").exists():
        time.sleep(0.05)
    time.sleep(0.7)  # somewhere in the middle of writing checkpoints
    process.kill()
    process.wait()
    model = load_model(out)  # the top-level weights
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved_step = int((out / "checkpoints" / "latest").read_text().split("-")[1])
    resumed = train("--resume", "--out", out, "--max-steps", str(saved_step + 2), env=env)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert not list((out / "checkpoints").glob(".*.tmp"))  # half-written checkpoints were cleared


def test_seed_yaml_config_runs(tmp_path, env):
    text = tmp_path / "input.txt"
    text.write_text(shakespeare_text()[:60_000])
    config = tmp_path / "default_config.yaml"
    config.write_text(
        "model:\n  block_size: 32\n  vocab_size: 50257\n  n_layer: 1\n  n_head: 2\n  n_embd: 32\n"
        "training:\n  num_epochs: 0.05\n  batch_size: 4\n  sequence_length: 32\n  learning_rate: 0.001\n"
        "  device: cpu\n"
        f"data:\n  input_file: {text}\n"
        f"logging:\n  log_interval: 2\n  save_interval: 5\n  model_save_path: {tmp_path / 'saved' / 'model.pt'}\n"
    )
    result = train("--config", config, "--json", env=env)
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)
    assert summary["out"] == str(tmp_path / "saved" / "model")  # model_save_path's file name becomes the run folder
    tokens = 1 + len(get_tokenizer().encode(shakespeare_text()[:60_000]))  # <|endoftext|> + text
    train_windows = (tokens - round(tokens * 0.05) - 1) // 32
    assert summary["steps"] == math.ceil(0.05 * train_windows / 4)  # num_epochs, batch_size, sequence_length
    assert load_model(tmp_path / "saved" / "model").config.n_layer == 1


def test_init_from_a_transformers_folder(tmp_path, corpus, env, hf_model_factory):
    reference, folder = hf_model_factory(n_layer=2, n_head=2, n_embd=32, n_positions=32)
    out = tmp_path / "finetuned"
    result = train(
        corpus,
        "--init-from",
        folder,
        *EXACT,
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--lr",
        "1e-9",
        "--weight-decay",
        "0",
        "--out",
        out,
        env=env,
    )
    assert result.returncode == 0, result.stderr.decode()
    tuned = load_model(out)
    idx = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(tuned(idx)[0], reference(idx).logits, atol=1e-4, rtol=1e-4)


def test_text_is_tokenized_once_and_cached(tmp_path, corpus, env):
    for name in ("a", "b"):
        assert train(corpus, *TINY, *EXACT, "--max-steps", "1", "--out", tmp_path / name, env=env).returncode == 0
    entry, checksum = sorted(path.name for path in (tmp_path / "cache" / "tokens").iterdir())
    assert entry.endswith(".bin") and checksum == f"{entry}.sha256"  # one entry, its SHA-256 beside it


def test_bin_shards_folder_and_glob_inputs_and_the_json_summary(tmp_path, corpus, env):
    shards = tmp_path / "shards"
    shards.mkdir()
    assert run_cli("tokenize", corpus, "-o", shards / "part.bin", "--shard-size", "12000").returncode == 0
    curves = []
    for name, data in (("folder", shards), ("glob", str(shards / "part_*.bin"))):
        out = tmp_path / name
        result = train(data, *TINY, *EXACT, "--max-steps", "2", "--out", out, "--json", env=env)
        assert result.returncode == 0, result.stderr.decode()
        summary = json.loads(result.stdout)  # one JSON document, nothing else on stdout
        assert list(summary) == SUMMARY_KEYS
        assert (summary["out"], summary["model"]) == (str(out), str(out / "model.safetensors"))
        assert (summary["steps"], summary["tokens"]) == (2, 2 * 4 * 32)
        assert (summary["device"], summary["dtype"]) == ("cpu", "float32")
        curve = losses(out)
        assert summary["train_loss"] == curve[2]  # the mean over the last log interval: step 2 alone
        assert isinstance(summary["val_loss"], float) and summary["tokens_per_s"] > 0
        assert 0 < summary["train_s"] <= summary["elapsed_s"]
        curves.append(curve)
    assert curves[0] == curves[1]  # the folder and the glob read the same shards


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus, env):
    out = tmp_path / "diverged"
    args = [
        corpus,
        *TINY,
        *EXACT,
        "--lr",
        "1e6",
        "--warmup-steps",
        "0",
        "--schedule",
        "constant",
        "--grad-clip",
        "1e30",
        "--save-interval",
        "1",
        "--max-steps",
        "200",
        "--out",
        out,
    ]
    result = train(*args, env=env)
    line = assert_stops_with(result, 1, "became", "at step")
    failed_step = int(line.split("at step ")[1].split(";")[0])
    model = load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{failed_step - 1:06d}"


# ---------------------------------------------------------------- bad input


def test_missing_data_file(tmp_path, env):
    assert_one_line_error(train(tmp_path / "missing.txt", "--out", tmp_path / "o", env=env), 2, "no such file")
    assert not (tmp_path / "o").exists()


def test_empty_and_too_short_corpus(tmp_path, env):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(train(empty, *TINY, "--out", tmp_path / "o1", env=env), 1, "empty")
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question. " * 4)
    assert_one_line_error(train(short, *TINY, "--out", tmp_path / "o2", env=env), 1, "fewer than one batch")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_seq_len_longer_than_block_and_batch_that_does_not_divide(tmp_path, corpus, env):
    out = tmp_path / "o"
    assert_one_line_error(train(corpus, *TINY, "--seq-len", "64", "--out", out, env=env), 2, "block size 32")
    result = train(corpus, *TINY, "--total-batch-tokens", "1000", "--out", out, env=env)
    assert_one_line_error(result, 2, "not a multiple of batch_size")
    assert not out.exists()


def test_resume_without_state_or_with_another_shape(tmp_path, corpus, env):
    assert_one_line_error(train("--resume", "--out", tmp_path / "nothing", env=env), 2, "no training state")
    assert_one_line_error(train("--resume", env=env), 2, "--resume needs --out")
    out = tmp_path / "run"
    assert train(corpus, *TINY, *EXACT, "--max-steps", "1", "--out", out, env=env).returncode == 0
    assert_one_line_error(train("--resume", "--out", out, "--n-layer", "3", env=env), 2, "differs")
    assert_one_line_error(train(corpus, *TINY, "--out", out, env=env), 2, "already holds a run")


def test_init_from_missing_or_broken(tmp_path, corpus, env):
    result = train(corpus, "--init-from", tmp_path / "nope", "--out", tmp_path / "o", env=env)
    assert_one_line_error(result, 2, "no such file")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    assert_one_line_error(train(corpus, "--init-from", broken, "--out", tmp_path / "o", env=env), 1, "safetensors")
    assert not (tmp_path / "o").exists()


def test_cuda_where_there_is_none(tmp_path, corpus, env):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = train(corpus, *TINY, "--device", "cuda", "--out", tmp_path / "o", env=env)
    assert_one_line_error(result, 2, "CUDA is not available")


def test_unwritable_out(tmp_path, corpus, env):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = train(corpus, *TINY, "--max-steps", "1", "--out", blocker / "run", env=env)
    assert_one_line_error(result, 2, "cannot write there")
    assert_one_line_error(train(corpus, *TINY, "--out", blocker, env=env), 2, "not a folder")


def test_invalid_settings_exit_2(tmp_path, corpus, env):
    assert_one_line_error(train(corpus, "--lr", "-1", env=env), 2, "train.lr")
    assert_one_line_error(train(corpus, "--schedule", "exponential", env=env), 2, "--schedule", "cosine")
    assert_one_line_error(train(corpus, "--max-steps", "5", "--epochs", "1", env=env), 2, "only one of")


def test_environment_sets_train_options(tmp_path, corpus):
    env = cli_env(GPT2_DATA__CACHE_DIR=str(tmp_path / "cache"), GPT2_TRAIN__MAX_STEPS="2", GPT2_TRAIN__LR="0.002")
    out = tmp_path / "run"
    result = train(corpus, *TINY, *EXACT, "--out", out, "--json", env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["steps"] == 2
    assert "lr = 0.002" in (out / "config.toml").read_text()
    assert math.isclose(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["lr"], 0.002 * 1, rel_tol=1)
    assert os.access(out / "model.safetensors", os.R_OK)
