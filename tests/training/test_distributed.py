"""`gpt2 train` under torchrun (DDP and FSDP2) on the CPU: 2 processes with gloo against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import FIXTURES, exact_environment, run_cli, write_corpus
from gpt2cli import load_model

COMMON = [
    "--n-layer",
    "2",
    "--n-head",
    "2",
    "--n-embd",
    "32",
    "--block-size",
    "32",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--log-interval",
    "1",
    "--eval-interval",
    "3",
    "--val-fraction",
    "0.05",
    "--hellaswag",
    str(FIXTURES / "hellaswag_tiny.jsonl"),
]
PARALLEL = pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
pytestmark = pytest.mark.slow  # every test launches torchrun jobs of 2 processes


@pytest.fixture
def env(exact_env):
    return exact_env


def launch(*args, env, processes: int = 1) -> subprocess.CompletedProcess[bytes]:
    """`gpt2 train ARGS` under torchrun with `processes` workers, or in this process for one."""
    if processes == 1:
        return run_cli("train", *args, env=env)
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        "-m",
        "gpt2cli",
    ]
    return subprocess.run([*launcher, "train", *map(str, args)], capture_output=True, env=env, timeout=300)


def train(*args, env, processes: int = 1) -> subprocess.CompletedProcess[bytes]:
    result = launch(*args, env=env, processes=processes)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    return result


def metrics(out, key: str = "loss") -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [record[key] for record in records if key in record]


def losses(out) -> list[float]:
    return metrics(out, "loss")


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """The reference: one process, 4 sequences per step, 6 steps."""
    folder = tmp_path_factory.mktemp("single")
    out = folder / "run"
    train(
        write_corpus(folder),
        *COMMON,
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--out",
        out,
        env=exact_environment(folder),
    )
    return out


@PARALLEL
def test_two_processes_match_one_with_the_same_global_batch_and_their_checkpoint_loads_everywhere(
    tmp_path, corpus, env, parallel, single_process_run
):
    # 2 processes × 2 sequences, and 2 processes × 1 sequence × 2 accumulation steps: the same 4 windows per step
    double, accumulated = tmp_path / "double", tmp_path / "accumulated"
    train(
        corpus,
        *COMMON,
        "--max-steps",
        "6",
        "--batch-size",
        "2",
        "--parallel",
        parallel,
        "--out",
        double,
        env=env,
        processes=2,
    )
    train(
        corpus,
        *COMMON,
        "--max-steps",
        "6",
        "--batch-size",
        "1",
        "--total-batch-tokens",
        "128",
        "--parallel",
        parallel,
        "--out",
        accumulated,
        env=env,
        processes=2,
    )
    for out in (double, accumulated):
        assert losses(out) == pytest.approx(losses(single_process_run), rel=1e-6, abs=1e-6)
        # validation windows are shared out across the ranks and summed back
        assert metrics(out, "val_loss") == pytest.approx(metrics(single_process_run, "val_loss"), rel=1e-6)
        # HellaSwag's 3 examples are shared out 2 + 1 (the second rank runs one uncounted pass for FSDP)
        hellaswag = metrics(single_process_run, "hellaswag_acc_norm")
        assert len(hellaswag) == 2 and metrics(out, "hellaswag_acc_norm") == hellaswag
    assert len(losses(double)) == 6  # rank 0 alone wrote the metrics
    # The checkpoint a two-process run saves (sharded state gathered under FSDP) loads here and in transformers.
    from transformers import GPT2LMHeadModel

    tokens = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_model(double)(tokens)[0]
        reference = GPT2LMHeadModel.from_pretrained(double).eval()(tokens).logits
    torch.testing.assert_close(ours, reference)


@PARALLEL
def test_a_two_process_run_resumes_with_the_same_losses_on_any_number_of_processes(
    tmp_path, corpus, env, parallel, single_process_run
):
    resumed, mixed = tmp_path / "resumed", tmp_path / "mixed"
    for out, later in ((resumed, 2), (mixed, 1)):
        train(
            corpus,
            *COMMON,
            "--max-steps",
            "3",
            "--schedule-steps",
            "6",
            "--batch-size",
            "2",
            "--parallel",
            parallel,
            "--out",
            out,
            env=env,
            processes=2,
        )
        batch = "2" if later == 2 else "4"  # the same tokens per step on one process
        train("--resume", "--out", out, "--max-steps", "6", "--batch-size", batch, env=env, processes=later)
        assert losses(out) == pytest.approx(losses(single_process_run), rel=1e-6, abs=1e-6)


def test_a_failing_rank_stops_the_whole_job_with_its_message(tmp_path, corpus, env):
    # Only rank 0 creates the run folder, so only rank 0 fails; rank 1 must not wait for it forever.
    blocked = corpus.with_name("not-a-folder")
    blocked.write_text("")
    result = launch(
        corpus, *COMMON, "--max-steps", "2", "--parallel", "fsdp", "--out", blocked / "run", env=env, processes=2
    )
    assert result.returncode != 0
    assert "gpt2: error: --out" in result.stderr.decode() and "cannot write there" in result.stderr.decode()


def test_ctrl_c_stops_every_rank_at_the_same_step_and_the_run_resumes(tmp_path, corpus, env):
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "gpt2cli",
        "train",
        str(corpus),
        *COMMON,
        "--max-steps",
        "100000",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    # Ctrl-C in a terminal signals the foreground process group. torchrun starts its workers in sessions of their own
    # and forwards the signal to them, which is the path this exercises.
    job = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, start_new_session=True)
    metrics_file = out / "metrics.jsonl"
    deadline = time.monotonic() + 120

    def steps_logged() -> int:
        return len(metrics_file.read_text().splitlines()) if metrics_file.is_file() else 0

    while steps_logged() < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGINT)
    _, stderr = job.communicate(timeout=120)
    messages = [line for line in stderr.decode().splitlines() if line.startswith("gpt2: error: interrupted at step")]
    assert len(messages) == 1, stderr.decode()[-3000:]  # rank 0 alone reports it
    step = int(messages[0].split("interrupted at step ")[1].split(";")[0])
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{step:06d}"
    train("--resume", "--out", out, "--max-steps", str(step + 2), env=env, processes=2)
    assert [json.loads(line)["step"] for line in metrics_file.read_text().splitlines()][-2:] == [step + 1, step + 2]
