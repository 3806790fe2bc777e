"""`--keep-best` and `--early-stop` through the real CLI: the best checkpoint kept beside the latest, the stop after N
evaluations without a lower validation loss (saved first), both in metrics.jsonl, the summary and --json, a resume in
the middle of a patience count, and the bad values."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, run_cli
from gpt2cli import load_model
from gpt2cli.training.run_folder import BEST, BEST_PREVIOUS, RunFolder

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4"]
EXACT = ["--device", "cpu", "--dtype", "float32", "--log-interval", "1"]
# Three training steps (lr 3e-3 falling linearly to exactly 0 at the schedule's end), then none that move a weight:
# the validation loss falls at steps 1-3 and stays where it is from then on, so the patience count is known.
PLATEAU = [
    *("--eval-interval", "1", "--eval-tokens", "256", "--schedule", "linear", "--schedule-steps", "3"),
    *("--warmup-steps", "0", "--lr", "3e-3", "--min-lr", "0", "--early-stop", "3", "--keep-best"),
]
TRACKED = ("step", "loss", "val_loss", "best_val_loss", "best_step", "evals_since_best", "stopped_early")


def records(out) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{key: record[key] for key in TRACKED if key in record} for record in map(json.loads, lines)]


def train(corpus, env, *args):
    return run_cli("train", corpus, *TINY, *EXACT, *PLATEAU, *args, env=env)


def test_the_best_is_kept_the_run_stops_early_and_a_resume_mid_count_continues_it(tmp_path, corpus, exact_env):
    out = tmp_path / "whole"
    result = train(corpus, exact_env, "--max-steps", "12", "--out", out, "--json")
    assert result.returncode == 0, result.stderr.decode()
    stderr = result.stderr.decode()
    assert "early stop at step 6: no lower validation loss in 3 evaluations" in stderr
    assert "best val loss" in stderr and "stopped early" in stderr

    seen = records(out)
    assert [record["step"] for record in seen] == [1, 2, 3, 4, 5, 6]  # stopped at 6 of 12
    assert [record["best_step"] for record in seen] == [1, 2, 3, 3, 3, 3]
    assert [record["evals_since_best"] for record in seen] == [0, 0, 0, 1, 2, 3]
    assert seen[-1]["stopped_early"] is True and "stopped_early" not in seen[-2]
    best_val = seen[2]["val_loss"]
    assert all(record["best_val_loss"] == best_val for record in seen[2:])

    summary = json.loads(result.stdout)
    assert summary["steps"] == 6 and summary["stopped_early"] is True
    assert summary["best_step"] == 3 and summary["best_val_loss"] == best_val
    best = out / "checkpoints" / BEST
    assert summary["best"] == str(best)
    # Saved first: the latest checkpoint is the stopping step; the best, beside it, is step 3's (pruned by --keep 1).
    folder = RunFolder(out)
    assert folder.latest_checkpoint().name == "step-000006"
    assert RunFolder.read_state(folder.best_checkpoint())["step"] == 3
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == [BEST, "latest", "step-000006"]
    assert load_model(best / "model.safetensors").config.n_layer == 2

    # The same run in two parts, the first ending two evaluations into the patience of three.
    split = tmp_path / "split"
    first = train(corpus, exact_env, "--max-steps", "5", "--out", split, "--json")
    assert first.returncode == 0, first.stderr.decode()
    assert json.loads(first.stdout)["stopped_early"] is False
    assert records(split)[-1]["evals_since_best"] == 2
    resumed = run_cli("train", "--resume", "--out", split, "--max-steps", "12", "--json", env=exact_env)
    assert resumed.returncode == 0, resumed.stderr.decode()
    summary = json.loads(resumed.stdout)
    assert summary["steps"] == 6 and summary["stopped_early"] is True and summary["best_step"] == 3
    assert records(split) == records(out)  # the same losses, the same count: stopped after one more evaluation
    assert RunFolder.read_state(RunFolder(split).best_checkpoint())["step"] == 3


def test_without_either_flag_nothing_changes(tmp_path, corpus, exact_env):
    out = tmp_path / "run"
    args = ["--max-steps", "2", "--eval-interval", "1", "--eval-tokens", "256", "--out", out, "--json"]
    result = run_cli("train", corpus, *TINY, *EXACT, *args, env=exact_env)
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)
    assert not {"best_val_loss", "best_step", "best", "stopped_early"} & set(summary)
    assert not {"best_val_loss", "best_step", "evals_since_best"} & set(
        json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    )
    assert not (out / "checkpoints" / BEST).exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--early-stop", "0"], ["early_stop", "greater than or equal to 1"]),
        (["--early-stop", "-2"], ["early_stop", "greater than or equal to 1"]),
        (["--early-stop", "2", "--val-fraction", "0"], ["--early-stop needs validation data", "--val-data"]),
        (["--keep-best", "--val-fraction", "0"], ["--keep-best needs validation data"]),
        (
            ["--early-stop", "3", "--max-steps", "10", "--eval-interval", "5"],
            ["--early-stop 3 can never stop", "2 time"],
        ),
    ],
)
def test_bad_values_exit_2_with_one_line(tmp_path, corpus, exact_env, args, fragments):
    out = tmp_path / "run"
    result = run_cli("train", corpus, *TINY, *EXACT, *args, "--out", out, env=exact_env)
    assert_one_line_error(result, 2, *fragments)
    assert not out.exists()


def test_a_best_swap_cut_short_is_finished_by_the_next_writer(tmp_path):
    folder = RunFolder(tmp_path / "run")
    checkpoints = folder.checkpoints
    (checkpoints / BEST_PREVIOUS).mkdir(parents=True)
    (checkpoints / BEST_PREVIOUS / "state.json").write_text("{}")
    with folder.writer_lock():  # killed between the two renames: the old best is put back
        assert (checkpoints / BEST / "state.json").is_file() and not (checkpoints / BEST_PREVIOUS).exists()
    (checkpoints / BEST_PREVIOUS).mkdir()
    with folder.writer_lock():  # killed after the new best was in place: the old one goes
        assert (checkpoints / BEST).is_dir() and not (checkpoints / BEST_PREVIOUS).exists()


def test_a_checkpoint_without_weights_gets_the_runs_model_of_its_step(tmp_path):
    """A LoRA run's checkpoints hold adapters; its merged model is the run's model.safetensors: best/ links both."""
    folder = RunFolder(tmp_path / "run")
    step = folder.checkpoints / "step-000004"
    step.mkdir(parents=True)
    (step / "adapters.safetensors").write_bytes(b"adapters")
    (step / "state.json").write_text('{"format": 1, "step": 4}')
    folder.model_file.write_bytes(b"merged")
    best = folder.keep_as_best(step, weights=folder.model_file)
    assert (best / "model.safetensors").read_bytes() == b"merged"
    assert (best / "adapters.safetensors").read_bytes() == b"adapters"
    assert folder.best_checkpoint() == best
