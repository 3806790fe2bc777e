"""The run folder: checkpoints saved and restored exactly, pruning, `latest`, metrics and config.toml; the writer's
lock on Windows (its POSIX branch, with real processes, is in tests/test_reliability.py)."""

from __future__ import annotations

import errno
import json
import os
import sys
import tomllib

import pytest
import torch

from gpt2cli import load_model
from gpt2cli.errors import UsageError
from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.training import run_folder
from gpt2cli.training.loss import TrainingModel
from gpt2cli.training.optim import build_optimizer, load_optimizer_tensors, optimizer_tensors
from gpt2cli.training.run_folder import (
    RunFolder,
    RunFolderInUse,
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


# ---------------------------------------------------------------- the writer's lock on Windows, run here on a fake


class FakeMsvcrt:
    """`msvcrt.locking` as Windows behaves: byte-range locks held per open file (a second open in the same process
    conflicts too), and mandatory: through another open file, reading a locked byte fails (`read`, installed over
    `os.read`)."""

    LK_UNLCK, LK_LOCK, LK_NBLCK = 0, 1, 2

    def __init__(self) -> None:
        self.held: dict[tuple[int, int, int], int] = {}  # (device, inode, offset) -> the descriptor holding it
        self._os_read = os.read

    @staticmethod
    def _file(descriptor: int) -> tuple[int, int]:
        status = os.fstat(descriptor)
        return status.st_dev, status.st_ino

    def locking(self, descriptor: int, mode: int, nbytes: int) -> None:
        start = os.lseek(descriptor, 0, os.SEEK_CUR)
        keys = [(*self._file(descriptor), offset) for offset in range(start, start + nbytes)]
        if mode == self.LK_UNLCK:
            if any(self.held.get(key) != descriptor for key in keys):
                raise PermissionError(errno.EACCES, "not locked by this file")
            for key in keys:
                del self.held[key]
            return
        assert mode == self.LK_NBLCK  # the writer never waits
        if any(key in self.held for key in keys):
            raise PermissionError(errno.EACCES, "Permission denied")
        self.held.update(dict.fromkeys(keys, descriptor))

    def read(self, descriptor: int, size: int) -> bytes:
        device, inode = self._file(descriptor)
        start = os.lseek(descriptor, 0, os.SEEK_CUR)
        for (held_device, held_inode, offset), holder in self.held.items():
            if (held_device, held_inode) == (device, inode) and holder != descriptor and start <= offset < start + size:
                raise PermissionError(errno.EACCES, "The process cannot access the file: a portion is locked")
        return self._os_read(descriptor, size)


@pytest.fixture
def windows_locking(monkeypatch) -> FakeMsvcrt:
    fake = FakeMsvcrt()
    monkeypatch.setattr(run_folder, "_LOCKING", run_folder._MsvcrtLocking(fake))
    monkeypatch.setattr(os, "read", fake.read)
    return fake


def test_windows_lock_names_its_holder_and_a_refused_new_folder_is_removed(tmp_path, windows_locking):
    folder = RunFolder(tmp_path / "new" / "run")
    with folder.writer_lock():
        assert (folder.path / ".lock").read_bytes() == f"{os.getpid()}\n".encode()  # no \r\n: binary mode
        assert list(windows_locking.held.values()) and (folder.path / ".lock").stat().st_size < run_folder.LOCK_BYTE
        # The refused writer reads the PID through its own open file: the locked byte lies past it.
        second = RunFolder(folder.path).writer_lock()
        with pytest.raises(RunFolderInUse, match=rf"in use by another gpt2 train \(PID {os.getpid()}\)"), second:
            pass
    assert not windows_locking.held  # unlocked on release, not left to the close
    assert not (tmp_path / "new").exists()  # removed after letting go: Windows cannot remove an open file
    with folder.writer_lock():  # free again
        pass


def test_the_fake_is_mandatory_so_the_pid_must_lie_outside_the_locked_byte(tmp_path, windows_locking, monkeypatch):
    """What LOCK_BYTE guards against: a lock on the PID itself would hide it from the refused writer."""
    monkeypatch.setattr(run_folder, "LOCK_BYTE", 0)
    folder = RunFolder(tmp_path / "run")
    with folder.writer_lock(), pytest.raises(PermissionError), RunFolder(folder.path).writer_lock():
        pass


def test_the_lock_is_chosen_per_platform(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    assert isinstance(run_folder._platform_locking(), run_folder._MsvcrtLocking)
    monkeypatch.setattr(sys, "platform", "linux")
    assert isinstance(run_folder._platform_locking(), run_folder._FlockLocking)
