"""The run folder: every file a training run writes, and how a run is found again to resume it.

    model.safetensors     the latest weights (a hard link into the newest checkpoint); loads in transformers too
    config.json           transformers' config, so the folder itself is a transformers checkpoint
    config.toml           the resolved settings of the run
    metrics.jsonl         one JSON object per log line
    checkpoints/step-NNNNNN/{model,optimizer}.safetensors, state.json
    checkpoints/latest    the name of the newest complete checkpoint folder

A checkpoint folder is written under a temporary name and renamed when complete, then `latest` is replaced
atomically: killing the process at any instant leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gpt2cli import __version__
from gpt2cli.checkpoint import checkpoint_layout, hf_config_dict, write_checkpoint
from gpt2cli.distributed import full_tensor, shard_like
from gpt2cli.errors import CheckpointError, UsageError
from gpt2cli.files import atomic_path, atomic_write_bytes
from gpt2cli.model import GPT2, GPT2Config
from gpt2cli.trackers import Trackers, open_trackers

STATE_FORMAT = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest"


def new_run_folder(distributed: bool = False) -> Path:
    """A fresh `runs/YYYYMMDD-HHMMSS` (or, under torchrun, one name every rank agrees on)."""
    if distributed:  # every rank must name the same folder: torchrun gives the job one id
        return Path("runs") / f"torchrun-{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = Path("runs") / stamp, 1
    while candidate.exists():
        n += 1
        candidate = Path("runs") / f"{stamp}-{n}"
    return candidate


class RunFolder:
    """One run's folder. Reading (finding a checkpoint, its state) works on any rank; writing is rank 0's, and
    starts with `open_for_writing`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoints = path / CHECKPOINTS
        self.metrics = path / "metrics.jsonl"
        self.model_file = path / "model.safetensors"
        self.trackers = Trackers()  # none until `start_trackers`

    # ------------------------------------------------------------ reading

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoints / LATEST
        if not pointer.is_file():
            return None
        folder = self.checkpoints / pointer.read_text().strip()
        return folder if (folder / "state.json").is_file() else None

    def checkpoint_to_resume(self, resume: bool) -> Path | None:
        """The checkpoint `--resume` continues from (None for a new run, whose folder must not hold one)."""
        for stale in self.checkpoints.glob(".step-*.tmp"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        existing = self.latest_checkpoint()
        if resume:
            if existing is None:
                raise UsageError(f"{self.path}: no training state to resume (expected {self.checkpoints / LATEST})")
            return existing
        if existing is not None:
            raise UsageError(f"{self.path} already holds a run; continue it with --resume or choose another --out")
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path}: exists and is not a folder")
        return None

    @staticmethod
    def read_state(checkpoint: Path) -> dict[str, Any]:
        """A checkpoint's state.json (step, tokens, data position, RNG, plan, settings)."""
        state = json.loads((checkpoint / "state.json").read_text())
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{checkpoint}: unsupported state format {state.get('format')!r}")
        return state

    @staticmethod
    def read_optimizer(checkpoint: Path) -> dict[str, torch.Tensor]:
        return load_file(checkpoint / "optimizer.safetensors")

    # ------------------------------------------------------------ writing (rank 0)

    def open_for_writing(self, new: bool) -> None:
        """The one place a run starts writing here (a new run creates the folder; a refused run leaves nothing)."""
        if not new:
            return
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise UsageError(f"--out {self.path}: cannot write there ({error.strerror})") from None

    def write_run_files(self, settings: dict[str, Any], config: GPT2Config) -> None:
        """config.toml (the resolved settings) and, for models transformers can load, its config.json."""
        atomic_write_bytes(self.path / "config.toml", to_toml(settings).encode())
        if config.bias:
            config_json = json.dumps(hf_config_dict(config), indent=2) + "\n"
            atomic_write_bytes(self.path / "config.json", config_json.encode())

    def start_trackers(self, names: list[str], settings: dict[str, Any], resumed_step: int | None) -> None:
        """TensorBoard / W&B, fed every metrics record from now on (`resumed_step`: None for a new run)."""
        self.trackers = open_trackers(names, self.path, settings, resumed_step)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One log line into metrics.jsonl, the run's record; the trackers get the same record, as views of it."""
        with open(self.metrics, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.trackers.log(record)

    def close_trackers(self) -> None:
        self.trackers.close()

    def truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint being resumed (they will be written again)."""
        if self.metrics.is_file():
            lines = self.metrics.read_text().splitlines()
            kept = [line for line in lines if line and json.loads(line)["step"] <= step]
            atomic_write_bytes(self.metrics, "".join(line + "\n" for line in kept).encode())

    def save_checkpoint(
        self,
        step: int,
        model_tensors: dict[str, torch.Tensor],
        config: GPT2Config,
        moments: dict[str, torch.Tensor],
        state: dict[str, Any],
        keep: int,
    ) -> Path:
        """Write `checkpoints/step-NNNNNN` complete (fsynced) under a temporary name, rename it, point `latest` and
        `model.safetensors` at it, and keep the newest `keep` checkpoints."""
        name = f"step-{step:06d}"
        folder = self.checkpoints / name
        staging = self.checkpoints / f".{name}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            write_checkpoint(model_tensors, config, staging / "model.safetensors")
            save_file(moments, staging / "optimizer.safetensors")
            state = {"format": STATE_FORMAT, "version": __version__, "step": step, **state}
            (staging / "state.json").write_text(json.dumps(state, indent=1))
            for path in staging.iterdir():
                _fsync_file(path)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with atomic_path(self.checkpoints / LATEST) as temporary:
            temporary.write_text(name + "\n")
        _link_or_copy(folder / "model.safetensors", self.model_file)
        self.prune(keep, newest=name)
        return folder

    def prune(self, keep: int, newest: str) -> None:
        folders = sorted(path for path in self.checkpoints.glob("step-*") if path.is_dir())
        for old in folders[: max(0, len(folders) - keep)]:
            if old.name != newest:
                shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- tensors and RNG state <-> files


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode()


def _decode_rng(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": _encode_rng(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda"] = _encode_rng(torch.cuda.get_rng_state(device))
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(_decode_rng(state["torch"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_decode_rng(state["cuda"]), device)


def gather_model_state(model: GPT2, keep: bool = True) -> dict[str, torch.Tensor]:
    """The model's whole weights in the checkpoint layout. Under FSDP every rank must call this (the shards are
    gathered one tensor at a time); ranks that do not write pass `keep=False` and get nothing back."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding, stored once
            continue
        whole = full_tensor(tensor.detach())
        if keep:
            state[name] = whole.cpu()
    return checkpoint_layout(state)


def optimizer_tensors(model: GPT2, optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, torch.Tensor]:
    """AdamW's moments and step counts, named after their parameters (gathered whole under FSDP, like the weights)."""
    tensors = {}
    for name, parameter in model.named_parameters():
        for key, value in optimizer.state.get(parameter, {}).items():
            whole = full_tensor(value.detach())
            if keep:
                tensors[f"{name}.{key}"] = whole.contiguous().cpu()
    return tensors


def load_optimizer_tensors(model: GPT2, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    fused = any(group.get("fused") for group in optimizer.param_groups)  # fused AdamW keeps `step` on the device
    for name, parameter in model.named_parameters():
        if f"{name}.exp_avg" not in tensors:
            raise CheckpointError(f"optimizer state has no moments for {name}")
        # Copies: optimizer state is updated in place and must not alias the loaded file's buffers. Under FSDP
        # each rank keeps its own shard of the whole moments saved in the file.
        optimizer.state[parameter] = {
            "step": tensors[f"{name}.step"].to(parameter.device if fused else "cpu", copy=True),
            "exp_avg": shard_like(tensors[f"{name}.exp_avg"].to(parameter.device, copy=True), parameter),
            "exp_avg_sq": shard_like(tensors[f"{name}.exp_avg_sq"].to(parameter.device, copy=True), parameter),
        }


def to_toml(values: dict[str, Any]) -> str:
    """Settings as TOML: tables of scalars and lists (None values are left out)."""

    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, list):
            return "[" + ", ".join(literal(item) for item in value) + "]"
        return json.dumps(str(value))

    lines = []
    for table, fields in values.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {literal(value)}" for key, value in fields.items() if value is not None)
        lines.append("")
    return "\n".join(lines)


def _link_or_copy(source: Path, destination: Path) -> None:
    with atomic_path(destination) as temporary:
        try:
            os.link(source, temporary)
        except OSError:  # no hard links on this filesystem
            shutil.copyfile(source, temporary)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
