"""`gpt2 train` under torchrun (DDP) on the CPU: 2 processes with gloo against one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gpt2cli import load_model

COMMON = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--device", "cpu",
          "--dtype", "float32", "--log-interval", "1", "--val-fraction", "0.05"]  # fmt: skip


@pytest.fixture
def env(exact_env):
    return exact_env


def train(*args, env, processes: int = 1) -> subprocess.CompletedProcess[bytes]:
    launcher = [sys.executable, "-m", "gpt2cli"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(processes), "-m", "gpt2cli"]  # fmt: skip
    result = subprocess.run([*launcher, "train", *map(str, args)], capture_output=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    return result


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, corpus, env):
    single, double = tmp_path / "single", tmp_path / "double"
    train(corpus, *COMMON, "--max-steps", "6", "--batch-size", "4", "--out", single, env=env)
    # 2 processes × 2 sequences, and 2 processes × 1 sequence × 2 accumulation steps: the same 4 windows per step
    train(corpus, *COMMON, "--max-steps", "6", "--batch-size", "2", "--out", double, env=env, processes=2)
    accumulated = tmp_path / "accumulated"
    train(corpus, *COMMON, "--max-steps", "6", "--batch-size", "1", "--total-batch-tokens", "128",
          "--out", accumulated, env=env, processes=2)  # fmt: skip
    assert losses(double) == pytest.approx(losses(single), rel=1e-6, abs=1e-6)
    assert losses(accumulated) == pytest.approx(losses(single), rel=1e-6, abs=1e-6)
    assert len(losses(double)) == 6  # rank 0 alone wrote the metrics


def test_a_two_process_run_resumes_with_the_same_losses_on_any_number_of_processes(tmp_path, corpus, env):
    straight, resumed, mixed = tmp_path / "straight", tmp_path / "resumed", tmp_path / "mixed"
    train(corpus, *COMMON, "--max-steps", "6", "--batch-size", "2", "--out", straight, env=env, processes=2)
    for out, later in ((resumed, 2), (mixed, 1)):
        train(corpus, *COMMON, "--max-steps", "3", "--schedule-steps", "6", "--batch-size", "2", "--out", out,
              env=env, processes=2)  # fmt: skip
        batch = "2" if later == 2 else "4"  # the same tokens per step on one process
        train("--resume", "--out", out, "--max-steps", "6", "--batch-size", batch, env=env, processes=later)
        assert losses(out) == pytest.approx(losses(straight), rel=1e-6, abs=1e-6)


def test_the_checkpoint_of_a_two_process_run_loads_everywhere(tmp_path, corpus, env):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "run"
    train(corpus, *COMMON, "--max-steps", "2", "--batch-size", "2", "--out", out, env=env, processes=2)
    tokens = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_model(out)(tokens)[0]
        reference = GPT2LMHeadModel.from_pretrained(out).eval()(tokens).logits
    torch.testing.assert_close(ours, reference)
