"""Experiment trackers (TensorBoard, Weights & Biases) as views of `metrics.jsonl`.

The run folder's metrics file stays the one record of a run: every record written there is handed, unchanged,
to each tracker, its fields under `train/` (`train/loss`, `train/lr`, ...) and the evaluation's under `val/`
(`val_loss` as `val/loss`, `hellaswag_acc` as `val/hellaswag_acc`). The resolved settings go along as
hyperparameters, flattened to `section.field`. Only rank 0 opens trackers (it alone writes the run folder).

Resuming continues the same tracker run: TensorBoard writes into the run folder's `tensorboard/` with
`purge_step` = the resumed step + 1 (hiding what an interrupted run logged past its checkpoint); W&B reuses the
run id kept in `wandb.json` and skips the steps it already has (W&B refuses steps that go back).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from gpt2cli.errors import Gpt2Error
from gpt2cli.runtime.extras import import_extra

# tracker -> (module to import, extra that installs it)
TRACKERS: dict[str, tuple[str, str]] = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
HPARAM_SECTIONS = ("model", "data", "train")  # the settings that shape a training run
TENSORBOARD_DIR = "tensorboard"
WANDB_STATE = "wandb.json"
WANDB_DEFAULT_PROJECT = "gpt2cli"


def check_trackers(names: Sequence[str]) -> None:
    """Fail (exit 2, naming the `pip install`) for a tracker whose package is missing: before training starts."""
    for name in names:
        module, extra = TRACKERS[name]
        import_extra(module, extra, f"--log-to {name}")


def tracker_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numbers under `train/` and `val/` (the step is the x axis, not a value)."""
    scalars = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key.startswith("val_"):
            scalars[f"val/{key.removeprefix('val_')}"] = float(value)
        elif key.startswith(("hellaswag", "best_")) or key == "evals_since_best":  # evaluation's (--keep-best)
            scalars[f"val/{key}"] = float(value)
        else:
            scalars[f"train/{key}"] = float(value)
    return scalars


def hyperparameters(settings: Mapping[str, Mapping[str, Any]]) -> dict[str, str | int | float | bool]:
    """The resolved settings as flat `section.field` values; lists become comma-joined strings, None "none"."""
    flat: dict[str, str | int | float | bool] = {}
    for section in HPARAM_SECTIONS:
        for field, value in settings.get(section, {}).items():
            if isinstance(value, list):
                value = ",".join(map(str, value))
            elif value is None:
                value = "none"
            flat[f"{section}.{field}"] = value
    return flat


class Tracker(Protocol):
    def log(self, record: Mapping[str, Any]) -> None: ...
    def close(self) -> None: ...


class TensorBoardTracker:
    """Event files in RUN/tensorboard/, written with torch's SummaryWriter."""

    def __init__(self, folder: Path, hparams: dict[str, Any], resumed_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        log_dir = folder / TENSORBOARD_DIR
        first = not any(log_dir.glob("events.out.tfevents.*"))
        purge_step = None if resumed_step is None else resumed_step + 1
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=10)
        if first:
            # Into this run's own event files (add_hparams would open a new subfolder, a separate "run" in the UI);
            # the metric names link the hyperparameters table to the scalars logged here.
            for summary in hparams_summary(hparams, {"train/loss": 0.0, "val/loss": 0.0}):
                self.writer.file_writer.add_summary(summary)

    def log(self, record: Mapping[str, Any]) -> None:
        for tag, value in tracker_scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run whose files live in RUN/wandb/; `WANDB_MODE=offline` (and W&B's other variables) are respected."""

    def __init__(self, folder: Path, hparams: dict[str, Any], resumed_step: int | None) -> None:
        wandb = import_extra("wandb", "wandb", "--log-to wandb")
        self.state_path = folder / WANDB_STATE
        state = _read_json(self.state_path) if resumed_step is not None else {}
        run_id = state.get("run_id") or secrets.token_hex(4)  # W&B ids: lowercase letters and digits
        self.last_step: int = state.get("last_step", -1)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", WANDB_DEFAULT_PROJECT),
                name=folder.name,
                id=run_id,
                resume="allow",
                dir=str(folder),
                config=hparams,
                settings=wandb.Settings(console="off"),  # leave our stdout/stderr alone (the live display)
            )
        except Exception as error:  # W&B fails in many ways (no login, no network); the run has not started yet
            raise Gpt2Error(f"--log-to wandb: {type(error).__name__}: {error}") from None
        self.last_step = max(self.last_step, (getattr(self.run, "starting_step", 0) or 0) - 1)
        self._save_state(run_id)

    def _save_state(self, run_id: str | None = None) -> None:
        state = {"run_id": run_id or self.run.id, "last_step": self.last_step}
        temporary = self.state_path.with_name(f".{WANDB_STATE}.tmp")
        temporary.write_text(json.dumps(state) + "\n")
        os.replace(temporary, self.state_path)

    def log(self, record: Mapping[str, Any]) -> None:
        step = record["step"]
        if step <= self.last_step:  # logged before the interruption; W&B would refuse a step that goes back
            return
        self.run.log(tracker_scalars(record), step=step)
        self.last_step = step
        self._save_state()

    def close(self) -> None:
        self.run.finish()


_KINDS: dict[str, type] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


class Trackers:
    """The trackers of one run, fed together; empty (and free) when no tracker was asked for."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    def log(self, record: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def open_trackers(
    names: Sequence[str], folder: Path, settings: Mapping[str, Mapping[str, Any]], resumed_step: int | None
) -> Trackers:
    """Start each named tracker for the run in `folder` (`resumed_step`: the checkpoint's step, None if new)."""
    check_trackers(names)
    hparams = hyperparameters(settings)
    opened: list[Tracker] = []
    try:
        for name in dict.fromkeys(names):
            opened.append(_KINDS[name](folder, hparams, resumed_step))
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
