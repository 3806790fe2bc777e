"""Training: the loop, its exact-resume state, and checkpoints that survive a crash at any instant.

A run folder holds:
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
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gpt2cli import __version__
from gpt2cli.batches import SamplerState, Windows, WindowSampler
from gpt2cli.checkpoint import checkpoint_layout, hf_config_dict, load_model, unwrap, write_checkpoint
from gpt2cli.devices import Precision, fast_matmul, keep_freed_memory, peak_tflops
from gpt2cli.distributed import (
    World,
    any_across,
    barrier,
    full_tensor,
    gradient_sync,
    is_sharded,
    mean_across,
    parallelize,
    shard_like,
    sum_across,
)
from gpt2cli.errors import CheckpointError, DataError, Gpt2Error, UsageError
from gpt2cli.files import atomic_path, atomic_write_bytes
from gpt2cli.model import GPT2, GPT2Config
from gpt2cli.optim import Schedule, build_optimizer
from gpt2cli.settings import Settings, TrainSettings
from gpt2cli.training_data import TokenData

STATE_FORMAT = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest"

Report = Callable[[str, dict[str, Any]], None]


class TrainingDiverged(Gpt2Error):
    """The loss or the gradient stopped being finite."""


class Interrupted(Gpt2Error):
    """Stopped on request (Ctrl-C) after saving a checkpoint."""

    exit_code = 130


# ---------------------------------------------------------------- the plan: numbers derived from the settings


@dataclass(frozen=True)
class RunPlan:
    seq_len: int
    batch_size: int  # sequences per micro-batch per process
    world_size: int
    grad_accum: int
    tokens_per_step: int
    total_steps: int
    schedule: Schedule

    @property
    def windows_per_step(self) -> int:
        return self.tokens_per_step // self.seq_len


def plan_run(train: TrainSettings, config: GPT2Config, train_windows: int, world_size: int = 1) -> RunPlan:
    seq_len = train.seq_len or config.block_size
    if seq_len > config.block_size:
        raise UsageError(f"--seq-len {seq_len} is longer than the model's block size {config.block_size}")
    micro_tokens = train.batch_size * seq_len * world_size
    tokens_per_step = train.total_batch_tokens or micro_tokens
    if tokens_per_step % micro_tokens:
        raise UsageError(
            f"--total-batch-tokens {tokens_per_step} is not a multiple of batch_size × seq_len × processes "
            f"({train.batch_size} × {seq_len} × {world_size} = {micro_tokens})"
        )
    windows_per_step = tokens_per_step // seq_len
    if train_windows < train.batch_size:
        raise DataError(
            f"the training data has {train_windows} window(s) of {seq_len + 1} tokens, fewer than one batch of "
            f"{train.batch_size}; give more text or lower --batch-size / --seq-len"
        )
    if train.max_steps is not None:
        total_steps = train.max_steps
    elif train.max_tokens is not None:
        total_steps = math.ceil(train.max_tokens / tokens_per_step)
    else:
        total_steps = math.ceil((train.epochs or 1.0) * train_windows / windows_per_step)
    schedule_steps = train.schedule_steps or total_steps
    warmup = train.warmup_steps if train.warmup_steps is not None else min(700, schedule_steps // 20)
    schedule = Schedule(
        kind=train.schedule,
        lr=train.lr,
        min_lr=train.min_lr if train.min_lr is not None else train.lr / 10,
        warmup_steps=warmup,
        total_steps=schedule_steps,
    )
    return RunPlan(
        seq_len=seq_len,
        batch_size=train.batch_size,
        world_size=world_size,
        grad_accum=tokens_per_step // micro_tokens,
        tokens_per_step=tokens_per_step,
        total_steps=total_steps,
        schedule=schedule,
    )


# ---------------------------------------------------------------- saved state


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    sampler: SamplerState = field(default_factory=SamplerState)
    last_val_loss: float | None = None


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


def gather_model_state(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The model's whole weights in the checkpoint layout. Under FSDP every rank must call this (the shards are
    gathered one tensor at a time); ranks that do not write pass `keep=False` and get nothing back."""
    state = {}
    for name, tensor in unwrap(model).state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding, stored once
            continue
        whole = full_tensor(tensor.detach())
        if keep:
            state[name] = whole.cpu()
    return checkpoint_layout(state)


def optimizer_tensors(model: GPT2, optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, torch.Tensor]:
    """AdamW's moments and step counts, named after their parameters (gathered whole under FSDP, like the weights)."""
    tensors = {}
    for name, parameter in unwrap(model).named_parameters():
        for key, value in optimizer.state.get(parameter, {}).items():
            whole = full_tensor(value.detach())
            if keep:
                tensors[f"{name}.{key}"] = whole.contiguous().cpu()
    return tensors


def load_optimizer_tensors(model: GPT2, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    fused = any(group.get("fused") for group in optimizer.param_groups)  # fused AdamW keeps `step` on the device
    for name, parameter in unwrap(model).named_parameters():
        if f"{name}.exp_avg" not in tensors:
            raise CheckpointError(f"optimizer state has no moments for {name}")
        # Copies: optimizer state is updated in place and must not alias the loaded file's buffers. Under FSDP
        # each rank keeps its own shard of the whole moments saved in the file.
        optimizer.state[parameter] = {
            "step": tensors[f"{name}.step"].to(parameter.device if fused else "cpu", copy=True),
            "exp_avg": shard_like(tensors[f"{name}.exp_avg"].to(parameter.device, copy=True), parameter),
            "exp_avg_sq": shard_like(tensors[f"{name}.exp_avg_sq"].to(parameter.device, copy=True), parameter),
        }


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    folder = out / CHECKPOINTS / pointer.read_text().strip()
    return folder if (folder / "state.json").is_file() else None


def _link_or_copy(source: Path, destination: Path) -> None:
    with atomic_path(destination) as temporary:
        try:
            os.link(source, temporary)
        except OSError:  # no hard links on this filesystem
            shutil.copyfile(source, temporary)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


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


# ---------------------------------------------------------------- the trainer


class Trainer:
    """One training run: `run()` trains until the planned step, saving and evaluating on the way."""

    def __init__(
        self,
        settings: Settings,
        data: TokenData,
        out: Path,
        precision: Precision,
        report: Report | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        world: World | None = None,
    ) -> None:
        self.world = world or World()
        self.settings = settings
        self.train_settings = settings.train
        self.out = out
        self.precision = precision
        self.device = precision.device
        # Under torchrun only rank 0 reports and writes files; every rank trains.
        self.report = (report if self.world.is_main else None) or (lambda event, payload: None)
        self.should_stop = should_stop
        self.data = data
        self.progress = Progress()

        resume_from = self._checkpoint_to_resume()
        if resume_from is not None:
            self._keep_saved_schedule(resume_from)
        self.model = self._build_model(resume_from)
        config = self.model.config
        seq_len = self.train_settings.seq_len or config.block_size
        self.train_windows = Windows(data.train, seq_len)
        self.val_windows = Windows(data.val, seq_len)
        self.plan = plan_run(self.train_settings, config, len(self.train_windows), self.world.world_size)
        if data.val and len(self.val_windows) == 0:
            raise DataError(
                f"the validation data ({data.val_tokens} tokens) is shorter than one window of {seq_len + 1} tokens; "
                "raise --val-fraction, give --val-data, or lower --seq-len"
            )
        if resume_from is None and self.world.is_main:
            self._create_out_folder()  # only once everything checked out: a refused run leaves nothing behind
        train = self.train_settings
        self.compiled = train.compile
        if train.compile:
            self.model.compile_blocks()
        # What the step runs: the model, its DDP wrapper, or (FSDP) the model with its weights sharded in place.
        self.trained = parallelize(self.model, self.world, train.parallel, self.device)
        self.sharded = is_sharded(self.model.transformer.wte.weight)
        self.optimizer = build_optimizer(
            self.model, train.lr, train.weight_decay, (train.beta1, train.beta2), self.device
        )
        self.scaler = _grad_scaler(self.device, self.sharded) if precision.needs_scaler else None
        self.sampler = WindowSampler(len(self.train_windows), train.seed)
        self.saved_step = -1
        if resume_from is not None:
            self._restore(resume_from)
            self.saved_step = self.progress.step
        keep_freed_memory(self.device)
        self.peak = peak_tflops(self.device)
        self.flops_per_token = self.model.flops_per_token(self.plan.seq_len)

    # ------------------------------------------------------------ setup

    def _checkpoint_to_resume(self) -> Path | None:
        """The checkpoint `--resume` continues from (None for a new run, whose folder must not hold one)."""
        out = self.out
        for stale in (out / CHECKPOINTS).glob(".step-*.tmp"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        existing = latest_checkpoint(out)
        if self.train_settings.resume:
            if existing is None:
                raise UsageError(f"{out}: no training state to resume (expected {out / CHECKPOINTS / LATEST})")
            return existing
        if existing is not None:
            raise UsageError(f"{out} already holds a run; continue it with --resume or choose another --out")
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a folder")
        return None

    def _keep_saved_schedule(self, folder: Path) -> None:
        """A resumed run keeps its learning-rate schedule even when --max-steps changes, unless told otherwise."""
        saved = json.loads((folder / "state.json").read_text())["plan"]["schedule"]
        train = self.train_settings
        if train.schedule_steps is None:
            train.schedule_steps = saved["total_steps"]
        if train.warmup_steps is None:
            train.warmup_steps = saved["warmup_steps"]

    def _create_out_folder(self) -> None:
        try:
            (self.out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise UsageError(f"--out {self.out}: cannot write there ({error.strerror})") from None

    def _build_model(self, resume_from: Path | None) -> GPT2:
        torch.manual_seed(self.train_settings.seed)
        if resume_from is not None:
            model = load_model(resume_from / "model.safetensors", device=self.device, dtype=torch.float32)
            wanted = self.settings.model.to_config() if self.train_settings.init_from is None else None
            if wanted is not None and dataclasses.replace(wanted, dropout=model.config.dropout) != model.config:
                raise UsageError(
                    f"{self.out}: the saved model's shape ({_shape(model.config)}) differs from the settings' "
                    f"({_shape(wanted)}); resume with the run's own settings"
                )
        elif self.train_settings.init_from is not None:
            model = load_model(self.train_settings.init_from, device=self.device, dtype=torch.float32)
        else:
            model = GPT2(self.settings.model.to_config()).to(self.device)
        model.set_dropout(self.settings.model.dropout)
        return model.train()

    def _restore(self, folder: Path) -> None:
        state = json.loads((folder / "state.json").read_text())
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{folder}: unsupported state format {state.get('format')!r}")
        if state["data"] != self.data.fingerprint():
            raise UsageError(
                f"{self.out}: the training data differs from the run's ({state['data']['train_tokens']:,} training "
                f"tokens from {len(state['data']['sources'])} source(s)); resume with the same data"
            )
        if state["plan"]["tokens_per_step"] != self.plan.tokens_per_step:
            raise UsageError(
                f"{self.out}: the run used {state['plan']['tokens_per_step']} tokens per step, these settings "
                f"{self.plan.tokens_per_step}; resume with the same batch"
            )
        load_optimizer_tensors(self.model, self.optimizer, load_file(folder / "optimizer.safetensors"))
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(
            step=state["step"],
            tokens=state["tokens"],
            elapsed_s=state["elapsed_s"],
            sampler=SamplerState(**state["sampler"]),
            last_val_loss=state.get("last_val_loss"),
        )
        self.sampler.state = self.progress.sampler
        restore_rng(state["rng"], self.device)
        if self.world.is_main:
            self._truncate_metrics(self.progress.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint being resumed (they will be written again)."""
        metrics = self.out / "metrics.jsonl"
        if metrics.is_file():
            kept = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            atomic_write_bytes(metrics, "".join(line + "\n" for line in kept).encode())

    # ------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train to the planned step; returns the summary. Raises `Interrupted` after saving on a stop request."""
        plan, progress = self.plan, self.progress
        if self.world.is_main:
            self._write_run_files()
        self.report("start", self._start_payload())
        window_seconds, window_tokens = 0.0, 0  # training time only: evaluation and saving excluded
        losses: list[float] = []
        run_started = time.perf_counter() - progress.elapsed_s
        with fast_matmul(self.device):
            while progress.step < plan.total_steps:
                step_started = time.perf_counter()
                loss, grad_norm, lr = self._train_step()
                window_seconds += time.perf_counter() - step_started
                progress.step += 1
                progress.tokens += plan.tokens_per_step
                progress.elapsed_s = time.perf_counter() - run_started
                window_tokens += plan.tokens_per_step
                losses.append(loss)
                last = progress.step == plan.total_steps
                evaluate = self.data.val and (progress.step % self.train_settings.eval_interval == 0 or last)
                if evaluate:
                    progress.last_val_loss = self.evaluate()
                if self.world.is_main and (progress.step % self.train_settings.log_interval == 0 or last or evaluate):
                    self._log(loss, grad_norm, lr, window_tokens / max(window_seconds, 1e-9), bool(evaluate))
                    window_seconds, window_tokens = 0.0, 0
                if progress.step % self.train_settings.save_interval == 0 or last:
                    self.save_checkpoint()
                if any_across(self.should_stop(), self.world, self.device) and not last:
                    self.save_checkpoint()
                    # No rank may exit before rank 0 has written: torchrun stops the whole job when one exits early.
                    barrier(self.world)
                    raise Interrupted(
                        f"interrupted at step {progress.step}; checkpoint saved. "
                        f"Resume with: gpt2 train --resume --out {self.out}"
                    )
        return self._summary(losses)

    def _train_step(self) -> tuple[float, float, float]:
        plan = self.plan
        lr = plan.schedule.lr_at(self.progress.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        windows = self.sampler.take(plan.windows_per_step)  # the global batch: the same on every rank
        loss_sum = torch.zeros((), device=self.device)
        world = self.world
        for micro in range(plan.grad_accum):
            first = (micro * world.world_size + world.rank) * plan.batch_size  # this rank's slice of the micro-step
            inputs, targets = self.train_windows.batch(windows[first : first + plan.batch_size], self.device)
            with gradient_sync(self.trained, enabled=micro == plan.grad_accum - 1):
                with self.precision.autocast():
                    _, loss = self.trained(inputs, targets, return_logits=False, compiled_loss=self.compiled)
                scaled = loss / plan.grad_accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach()
        loss_sum = mean_across(loss_sum, world)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm_value = _clip_gradients(list(self.model.parameters()), self.train_settings.grad_clip or math.inf)
        loss_value = (loss_sum / plan.grad_accum).item()
        if not math.isfinite(loss_value) or (self.scaler is None and not math.isfinite(norm_value)):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            raise TrainingDiverged(
                f"the {what} became {loss_value if what == 'loss' else norm_value} at step {self.progress.step + 1}; "
                f"stopped without saving it (the last good checkpoint in {self.out} is kept). Try a lower --lr"
            )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update when fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value, lr

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first `eval_tokens` of the validation data (the same windows every time).

        Under torchrun the windows are shared out across ranks. Every rank runs the same number of forward passes
        (FSDP gathers weights collectively); a rank with no windows left scores one with weight zero."""
        self.model.eval()
        count = min(len(self.val_windows), max(1, self.train_settings.eval_tokens // self.plan.seq_len))
        batch, world = self.plan.batch_size, self.world
        total, seen = 0.0, 0
        for start in range(0, count, batch * world.world_size):
            first = start + world.rank * batch
            indices = np.arange(first, min(count, first + batch))
            weight = len(indices)
            if weight == 0:
                indices = np.arange(1)
            inputs, targets = self.val_windows.batch(indices, self.device)
            with self.precision.autocast():
                _, loss = self.model(inputs, targets, return_logits=False)
            total += loss.item() * weight
            seen += weight
        self.model.train()
        if world.distributed:
            totals = torch.tensor([total, seen], dtype=torch.float64, device=self.device)
            total, seen = sum_across(totals, world).tolist()
        return total / seen

    # ------------------------------------------------------------ reporting

    def _mfu(self, tokens_per_s: float) -> float | None:
        if self.peak is None:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak * 1e12)

    def _log(self, loss: float, grad_norm: float, lr: float, tokens_per_s: float, evaluated: bool) -> None:
        progress = self.progress
        record: dict[str, Any] = {
            "step": progress.step,
            "loss": round(loss, 6),
            "lr": lr,
            "grad_norm": round(grad_norm, 6),
            "tokens": progress.tokens,
            "tok_per_s": round(tokens_per_s, 1),
            "mfu": None if (mfu := self._mfu(tokens_per_s)) is None else round(mfu, 4),
            "elapsed_s": round(progress.elapsed_s, 3),
        }
        if evaluated:
            record["val_loss"] = round(progress.last_val_loss, 6)  # type: ignore[arg-type]
        with open(self.out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.report("log", {**record, "total_steps": self.plan.total_steps, "epoch": self.sampler.epochs_done})

    def _start_payload(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "out": str(self.out),
            "device": str(self.device),
            "dtype": self.precision.name,
            "compile": self.train_settings.compile,
            "parameters": self.model.num_parameters(),
            "model": self.model.config.to_dict(),
            "train_tokens": self.data.train_tokens,
            "val_tokens": self.data.val_tokens,
            "plan": {**dataclasses.asdict(plan), "windows_per_step": plan.windows_per_step},
            "resumed_at": self.progress.step,
            "settings": self.settings.model_dump(mode="json"),
        }

    def _summary(self, losses: list[float]) -> dict[str, Any]:
        progress = self.progress
        tail = losses[-max(1, min(len(losses), self.train_settings.log_interval)) :] if losses else []
        return {
            "out": str(self.out),
            "model": str(self.out / "model.safetensors"),
            "steps": progress.step,
            "tokens": progress.tokens,
            "elapsed_s": round(progress.elapsed_s, 3),
            "train_loss": round(sum(tail) / len(tail), 6) if tail else None,
            "val_loss": None if progress.last_val_loss is None else round(progress.last_val_loss, 6),
            "tokens_per_s": round(progress.tokens / max(progress.elapsed_s, 1e-9), 1),
            "device": str(self.device),
            "dtype": self.precision.name,
        }

    # ------------------------------------------------------------ files

    def _write_run_files(self) -> None:
        atomic_write_bytes(self.out / "config.toml", to_toml(self.settings.model_dump(mode="json")).encode())
        if self.model.config.bias:
            config_json = json.dumps(hf_config_dict(self.model.config), indent=2) + "\n"
            atomic_write_bytes(self.out / "config.json", config_json.encode())

    def save_checkpoint(self) -> Path | None:
        """Write the model, optimizer and state as a new checkpoint folder, then point `latest` at it (rank 0).

        Under FSDP every rank takes part in gathering the whole tensors; rank 0 alone writes."""
        progress = self.progress
        name = f"step-{progress.step:06d}"
        root = self.out / CHECKPOINTS
        folder = root / name
        if self.saved_step == progress.step:
            return folder
        self.saved_step = progress.step
        if not (self.world.is_main or self.sharded):
            return None
        keep = self.world.is_main
        model_tensors = gather_model_state(self.model, keep)
        moments = optimizer_tensors(self.model, self.optimizer, keep)
        if not keep:
            return None
        staging = root / f".{name}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            write_checkpoint(model_tensors, self.model.config, staging / "model.safetensors")
            save_file(moments, staging / "optimizer.safetensors")
            state = {
                "format": STATE_FORMAT,
                "version": __version__,
                "step": progress.step,
                "tokens": progress.tokens,
                "elapsed_s": progress.elapsed_s,
                "sampler": dataclasses.asdict(self.sampler.state),
                "last_val_loss": progress.last_val_loss,
                "rng": rng_state(self.device),
                "plan": {**dataclasses.asdict(self.plan)},
                "data": self.data.fingerprint(),
                "settings": self.settings.model_dump(mode="json"),
            }
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            (staging / "state.json").write_text(json.dumps(state, indent=1))
            for path in staging.iterdir():
                _fsync_file(path)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        pointer = root / LATEST
        with atomic_path(pointer) as temporary:
            temporary.write_text(name + "\n")
        _link_or_copy(folder / "model.safetensors", self.out / "model.safetensors")
        self._prune(root, keep=self.train_settings.keep, newest=name)
        self.report("checkpoint", {"step": progress.step, "path": str(folder)})
        return folder

    @staticmethod
    def _prune(root: Path, keep: int, newest: str) -> None:
        folders = sorted(path for path in root.glob("step-*") if path.is_dir())
        for old in folders[: max(0, len(folders) - keep)]:
            if old.name != newest:
                shutil.rmtree(old, ignore_errors=True)


def _clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """Scale gradients to at most `max_norm` in total; returns the norm before clipping (over all shards)."""
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    total_norm = full_tensor(torch.nn.utils.get_total_norm(grads))
    norm = total_norm.item()  # the step reads it anyway (logs, divergence check): one host sync
    if norm + 1e-6 > max_norm:  # below it the scale is exactly 1: skip a pass over every gradient
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return norm


def _grad_scaler(device: torch.device, sharded: bool) -> torch.amp.GradScaler:
    """fp16 loss scaling; with sharded gradients every rank must agree on overflow, which the sharded scaler does."""
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


def _shape(config: GPT2Config) -> str:
    return f"{config.n_layer} layers, {config.n_head} heads, width {config.n_embd}, block {config.block_size}"
