"""The run folder: checkpoints saved and restored exactly, pruning, `latest`, metrics and config.toml."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch

from gpt2cli import load_model
from gpt2cli.errors import UsageError
from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.training.loss import TrainingModel
from gpt2cli.training.optim import build_optimizer, load_optimizer_tensors, optimizer_tensors
from gpt2cli.training.run_folder import (
    RunFolder,
    gather_model_state,
    restore_rng,
    rng_state,
    to_toml,
)

CONFIG = GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=8)


def trained_model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT2(CONFIG)
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    idx = torch.randint(0, CONFIG.vocab_size, (2, 8))
    TrainingModel(model)(idx, idx.roll(1, dims=1)).backward()
    optimizer.step()
    return model, optimizer


def save(folder: RunFolder, model, optimizer, step: int, keep: int = 5):
    state = {"tokens": step * 10, "rng": rng_state(torch.device("cpu"))}
    moments = optimizer_tensors(model, optimizer)
    return folder.save_checkpoint(step, gather_model_state(model), model.config, moments, state, keep=keep)


def test_save_and_restore_round_trip_is_exact(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.open_for_writing(new=True)
    model, optimizer = trained_model_and_optimizer()
    rng_before = torch.get_rng_state()
    checkpoint = save(folder, model, optimizer, step=7)
    expected_draw = torch.rand(5)

    assert folder.latest_checkpoint() == checkpoint and checkpoint.name == "step-000007"
    state = RunFolder.read_state(checkpoint)
    assert state["step"] == 7 and state["tokens"] == 70 and state["format"] == 1
    restored = load_model(folder.model_file)
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), name
    assert set(restored.state_dict()) == set(model.state_dict())  # no `model.` prefix from the training module
    fresh_optimizer = build_optimizer(restored, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    load_optimizer_tensors(restored, fresh_optimizer, RunFolder.read_optimizer(checkpoint))
    saved_moments, restored_moments = optimizer_tensors(model, optimizer), optimizer_tensors(restored, fresh_optimizer)
    assert saved_moments.keys() == restored_moments.keys() and len(saved_moments) == 3 * len(list(model.parameters()))
    for name, tensor in saved_moments.items():
        assert torch.equal(tensor, restored_moments[name]), name
    torch.manual_seed(123)
    restore_rng(state["rng"], torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng_before) and torch.equal(torch.rand(5), expected_draw)


def test_pruning_keeps_the_newest_and_a_stale_temporary_folder_is_cleaned(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.open_for_writing(new=True)
    model, optimizer = trained_model_and_optimizer()
    for step in (1, 2, 3, 4):
        save(folder, model, optimizer, step, keep=2)
    assert sorted(path.name for path in folder.checkpoints.glob("step-*")) == ["step-000003", "step-000004"]
    stale = folder.checkpoints / ".step-000005.999.tmp"
    stale.mkdir()
    stale_file = folder.path / ".metrics.jsonl.999.tmp"
    stale_file.write_text("{")
    assert folder.checkpoint_to_resume(resume=True) == folder.checkpoints / "step-000004"
    assert stale.exists()  # only the lock holder clears: it could be a live writer's save in progress
    with folder.writer_lock():
        assert not stale.exists() and not stale_file.exists()
    with pytest.raises(UsageError, match="already holds a run"):
        folder.checkpoint_to_resume(resume=False)


def test_metrics_are_appended_and_truncated_on_resume(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.open_for_writing(new=True)
    for step in range(1, 6):
        folder.append_metrics({"step": step, "loss": 1.0 / step})
    with open(folder.metrics, "a") as handle:
        handle.write('{"step": 6, "lo')  # cut short by a killed process
    folder.truncate_metrics(3)
    assert [json.loads(line)["step"] for line in folder.metrics.read_text().splitlines()] == [1, 2, 3]


def test_config_toml_reads_back_as_the_settings():
    values = {"model": {"n_layer": 2, "preset": None, "dropout": 0.1}, "train": {"resume": False, "paths": ["a b"]}}
    assert tomllib.loads(to_toml(values)) == {
        "model": {"n_layer": 2, "dropout": 0.1},
        "train": {"resume": False, "paths": ["a b"]},
    }


def test_a_file_in_the_way_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        RunFolder(blocker).checkpoint_to_resume(resume=False)
