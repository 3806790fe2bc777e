"""`gpt2 train --log-to tensorboard,wandb`: the trackers hold what metrics.jsonl holds, also across a resume, read
back with TensorBoard's own event reader and from W&B's offline run files."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from gpt2cli.errors import UsageError
from gpt2cli.observe.trackers import check_trackers, hyperparameters, tracker_scalars

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4"]
SHORT = [*TINY, "--device", "cpu", "--dtype", "float32", "--log-interval", "1", "--eval-interval", "3"]
SHORT += ["--eval-tokens", "256", "--save-interval", "2", "--keep", "2"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_interrupted_then_resumed(corpus: Path, out: Path, env: dict[str, str], tracker: str) -> None:
    """4 steps, then as if the process died after logging step 4 but before its checkpoint: resume from step 2
    to step 6. Steps 3 and 4 are logged twice; the second time must win (TensorBoard) or be skipped (W&B)."""
    first = run_cli("train", corpus, *SHORT, "--max-steps", "4", "--log-to", tracker, "--out", out, env=env)
    assert first.returncode == 0, first.stderr.decode()
    (out / "checkpoints" / "latest").write_text("step-000002\n")
    second = run_cli("train", "--resume", "--out", out, "--max-steps", "6", "--log-to", tracker, env=env)
    assert second.returncode == 0, second.stderr.decode()
    assert [record["step"] for record in metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_tensorboard_events_equal_metrics_across_a_resume(tmp_path, corpus, exact_env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "run"
    train_interrupted_then_resumed(corpus, out, exact_env, "tensorboard")
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per process, same folder
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = metrics(out)
    for tag, field in (("train/loss", "loss"), ("val/loss", "val_loss"), ("train/lr", "lr")):
        expected = [(r["step"], float(np.float32(r[field]))) for r in logged if field in r]  # stored as float32
        assert [(e.step, e.value) for e in events.Scalars(tag)] == expected
    assert {"train/grad_norm", "train/tokens", "train/tok_per_s", "train/elapsed_s"} <= set(events.Tags()["scalars"])
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model.n_layer"].number_value == 1 and hparams["train.log_to"].string_value == "tensorboard"


def wandb_history(run_file: Path) -> tuple[str, list[dict]]:
    """(run id, history rows) of an offline `.wandb` file: W&B's LevelDB-style log of protobuf records."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    position, pending, run_id, rows = 7, b"", "", []
    while position + 7 <= len(data):
        left = 32768 - position % 32768  # records never straddle a 32 KiB block's 7-byte header
        if left < 7:
            position += left
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "run":
                run_id = record.run.run_id
            elif record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return run_id, rows


def test_wandb_offline_holds_the_losses_and_a_resume_continues_the_same_run(tmp_path, corpus, exact_env):
    out = tmp_path / "run"
    env = {**exact_env, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    train_interrupted_then_resumed(corpus, out, env, "wandb")
    state = json.loads((out / "wandb.json").read_text())
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and state["last_step"] == 6
    (first_id, first), (second_id, second) = (wandb_history(path) for path in files)
    assert first_id == second_id == state["run_id"]  # the resumed process continued the same W&B run
    assert [row["_step"] for row in first] == [1, 2, 3, 4]
    assert [row["_step"] for row in second] == [5, 6]  # 3 and 4 were already there: skipped
    by_step = {r["step"]: r for r in metrics(out)}
    for row in first + second:
        assert row["train/loss"] == by_step[row["_step"]]["loss"]  # steps 3, 4: bit-identical after the resume
    assert [(row["_step"], row["val/loss"]) for row in first + second if row["_step"] != 4 and "val/loss" in row] == [
        (r["step"], r["val_loss"]) for r in metrics(out) if "val_loss" in r
    ]  # the first process also evaluated step 4, as its last step


@pytest.mark.parametrize(("tracker", "module"), [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_missing_tracker_stops_before_training(tracker, module, tmp_path, corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    out = tmp_path / "run"
    result = run_cli("train", corpus, *SHORT, "--max-steps", "2", "--log-to", tracker, "--out", out)
    stderr = result.stderr.decode()
    assert result.returncode == 2 and f"pip install 'gpt2cli[{tracker}]'" in stderr, stderr
    assert stderr.count("\n") == 1 and not out.exists()  # nothing printed or written before the check
    with pytest.raises(UsageError, match=rf"--log-to {tracker} needs the {tracker} extra"):
        check_trackers([tracker])


def test_unknown_tracker_is_a_usage_error(tmp_path, corpus):
    result = run_cli("train", corpus, *SHORT, "--log-to", "mlflow", "--out", tmp_path / "run")
    assert result.returncode == 2 and "train.log_to" in result.stderr.decode()


def test_records_and_settings_as_tracker_values():
    record = {"step": 7, "loss": 3.5, "lr": 1e-3, "mfu": None, "val_loss": 3.75, "hellaswag_acc": 0.3}
    assert tracker_scalars(record) == {"train/loss": 3.5, "train/lr": 1e-3, "val/loss": 3.75, "val/hellaswag_acc": 0.3}
    best = {
        "step": 9,
        "val_loss": 3.8,
        "best_val_loss": 3.75,
        "best_step": 7,
        "evals_since_best": 1,
        "stopped_early": True,
    }
    assert tracker_scalars(best) == {
        "val/loss": 3.8,
        "val/best_val_loss": 3.75,
        "val/best_step": 7.0,
        "val/evals_since_best": 1.0,
    }
    flat = hyperparameters(
        {"model": {"n_layer": 2, "vocab_size": None}, "train": {"val_data": ["a", "b"]}, "sample": {"top_k": 5}}
    )
    assert flat == {"model.n_layer": 2, "model.vocab_size": "none", "train.val_data": "a,b"}
