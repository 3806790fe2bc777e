"""Training: the step, the loop and evaluation.

The run's numbers come from `plan.py`; the pieces a run needs (model, optimizer, data windows, restored state) are
prepared by `setup.py`; every file of the run folder is written by `run_folder.py`. Read `Trainer.run` and
`Trainer._loop`, then `Trainer._train_step`, top to bottom.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2cli.data.examples import ExampleData
from gpt2cli.data.inputs import TokenData
from gpt2cli.errors import Gpt2Error
from gpt2cli.model import flops
from gpt2cli.model.gpt2 import GPT2
from gpt2cli.model.lora import adapter_state
from gpt2cli.runtime.devices import Precision, device_rules, fast_matmul, peak_tflops
from gpt2cli.runtime.distributed import (
    StopPoll,
    World,
    barrier,
    gradient_sync,
    is_sharded,
    mean_across,
    sum_across,
)
from gpt2cli.settings.sections import Settings
from gpt2cli.training.batches import SamplerState, Windows, WindowSampler
from gpt2cli.training.hellaswag import HellaSwag
from gpt2cli.training.lora import LoraRun
from gpt2cli.training.loss import TrainingModel
from gpt2cli.training.memory import NotEnoughMemory, out_of_memory_message, run_step_shape
from gpt2cli.training.optim import Optimizer, clip_gradients, clip_gradients_on_device, optimizer_tensors
from gpt2cli.training.packing import PackedRows
from gpt2cli.training.plan import RunPlan
from gpt2cli.training.run_folder import RunFolder, gather_model_state, rng_state

Report = Callable[[str, dict[str, Any]], None]


class TrainingDiverged(Gpt2Error):
    """The loss or the gradient stopped being finite."""


class Interrupted(Gpt2Error):
    """Stopped on request (Ctrl-C) after saving a checkpoint."""

    exit_code = 130


@dataclass
class Progress:
    """Where the run stands: saved in every checkpoint, restored on resume."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    train_s: float = 0.0  # time in training steps only (compilation included; evaluation and saving excluded)
    sampler: SamplerState = field(default_factory=SamplerState)
    last_val_loss: float | None = None
    # --keep-best, --early-stop: the lowest validation loss so far, its step, and the evaluations since it (the
    # patience count); saved with the rest, so a resume continues the count where it was.
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0


@dataclass(frozen=True)
class TrainingSummary:
    """What a finished run reports; `to_dict()` is the document `gpt2 train --json` prints."""

    out: Path  # the run folder
    model: Path  # its final weights (out/model.safetensors)
    steps: int
    tokens: int
    elapsed_s: float
    train_s: float  # time in training steps only
    train_loss: float | None  # the mean step loss over the last log interval
    val_loss: float | None  # the last evaluation's; None without validation data
    hellaswag_acc: float | None  # the last HellaSwag score; None unless the run scored it
    hellaswag_acc_norm: float | None
    tokens_per_s: float
    device: str
    dtype: str
    best_val_loss: float | None = None  # the lowest validation loss: with --keep-best or --early-stop
    best_step: int | None = None  # the step it was reached at
    best: Path | None = None  # the checkpoint kept for it (out/checkpoints/best): with --keep-best
    stopped_early: bool | None = None  # with --early-stop: whether it ended the run before the planned step

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as strings, the HellaSwag keys only where HellaSwag was scored, the best's and the early
        stop's only where the run tracked them."""
        document = {**dataclasses.asdict(self), "out": str(self.out), "model": str(self.model)}
        if self.hellaswag_acc is None:
            del document["hellaswag_acc"], document["hellaswag_acc_norm"]
        if self.best_step is None:
            del document["best_val_loss"], document["best_step"]
        if self.best is None:
            del document["best"]
        else:
            document["best"] = str(self.best)
        if self.stopped_early is None:
            del document["stopped_early"]
        return document


# ---------------------------------------------------------------- the trainer


class Trainer:
    """One training run: `run()` trains until the planned step, saving and evaluating on the way.

    It receives its pieces prepared (see `setup.prepare_trainer`) and changes no settings object."""

    def __init__(
        self,
        *,
        settings: Settings,
        data: TokenData | ExampleData,
        train_windows: Windows | PackedRows,
        val_windows: Windows | PackedRows,
        plan: RunPlan,
        model: GPT2,
        trained: torch.nn.Module,
        optimizer: Optimizer,
        scaler: torch.amp.GradScaler | None,
        sampler: WindowSampler,
        progress: Progress,
        folder: RunFolder,
        precision: Precision,
        world: World,
        report: Report | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        hellaswag: HellaSwag | None = None,
        lora: LoraRun | None = None,
    ) -> None:
        self.settings = settings
        self.train_settings = settings.train
        self.data = data
        # Over data.train and data.val, windows of plan.seq_len tokens (fine-tuning examples: packed rows).
        self.train_windows = train_windows
        self.val_windows = val_windows
        self.plan = plan
        self.model = model  # the GPT2 itself: its parameter names are the checkpoint's
        self.trained = trained  # what the step calls: a TrainingModel, DDP around one, or one sharded by FSDP
        # Evaluation needs no gradient sync; FSDP shards in place, so this is the sharded root under FSDP.
        self.loss_model: TrainingModel = getattr(trained, "module", trained)
        self.optimizer = optimizer
        self.scaler = scaler
        self.sampler = sampler
        self.progress = progress
        self.folder = folder
        self.out = folder.path
        self.precision = precision
        self.device = precision.device
        self.world = world
        # Under torchrun only rank 0 reports and writes files; every rank trains.
        self.report = (report if world.is_main else None) or (lambda event, payload: None)
        self.should_stop = should_stop
        self.stop_poll = StopPoll(world, self.device)  # when the ranks agree on a stop request
        self.sharded = is_sharded(model.transformer.wte.weight)
        self.saved_step = progress.step if progress.step else -1
        self.peak = peak_tflops(self.device, precision.dtype)  # the run's compute dtype picks the peak
        self.flops_per_token = model.flops_per_token(plan.seq_len)
        if lora is not None:  # a frozen base computes no weight gradients: 2N of the 6N per token are not done
            self.flops_per_token -= 2 * model.num_parameters(exclude_positions=True)
        self.hellaswag = hellaswag  # scored with the validation loss, at every evaluation
        self.lora = lora  # checkpoints hold the adapters; model.safetensors is the merged model
        # --keep-best / --early-stop follow the lowest validation loss (settings refuse them without validation data).
        self.tracks_best = bool(self.data.val) and (
            self.train_settings.keep_best or bool(self.train_settings.early_stop)
        )
        self.stopped_early = False

    # ------------------------------------------------------------ the loop

    def run(self) -> TrainingSummary:
        """Train to the planned step; returns the summary. Raises `Interrupted` after saving on a stop request."""
        plan, progress = self.plan, self.progress
        if self.world.is_main:
            settings = self.settings.model_dump(mode="json")
            self.folder.write_run_files(settings, self.model.config)
            self.folder.start_trackers(self.train_settings.log_to, settings, progress.step or None)
            self.restore_best()
        try:
            return self._loop(plan, progress)
        finally:
            self.folder.close_trackers()  # flushed whatever ends the run: done, Ctrl-C, divergence

    def _loop(self, plan: RunPlan, progress: Progress) -> TrainingSummary:
        """Step, evaluate, log, save until the planned step (or a stop request)."""
        self.report("start", self._start_payload())
        window_seconds, window_tokens = 0.0, 0  # training time only: evaluation and saving excluded
        losses: list[float] = []
        run_started = time.perf_counter() - progress.elapsed_s
        with fast_matmul(self.device):
            while progress.step < plan.total_steps:
                step_started = time.perf_counter()
                loss, grad_norm, lr = self._first_step() if not losses else self._train_step()
                step_seconds = time.perf_counter() - step_started
                window_seconds += step_seconds
                progress.train_s += step_seconds
                progress.step += 1
                progress.tokens += plan.tokens_per_step
                progress.elapsed_s = time.perf_counter() - run_started
                window_tokens += plan.tokens_per_step
                losses.append(loss)
                last = progress.step == plan.total_steps
                evaluate = (self.data.val or self.hellaswag) and (
                    progress.step % self.train_settings.eval_interval == 0 or last
                )
                improved = False
                if evaluate and self.data.val:
                    progress.last_val_loss = self.evaluate()
                    improved = self._track_best(progress.last_val_loss)
                if evaluate and self.hellaswag:
                    self.hellaswag.score()
                patience = self.train_settings.early_stop
                out_of_patience = bool(patience and progress.evals_since_best >= patience)
                stop_early = bool(evaluate and self.tracks_best and out_of_patience and not last)
                if self.world.is_main and (progress.step % self.train_settings.log_interval == 0 or last or evaluate):
                    self._log(
                        loss, grad_norm, lr, window_tokens / max(window_seconds, 1e-9), bool(evaluate), stop_early
                    )
                    window_seconds, window_tokens = 0.0, 0
                if progress.step % self.train_settings.save_interval == 0 or last or stop_early:
                    self.save_checkpoint()
                if improved and self.train_settings.keep_best:
                    self._keep_best()
                if stop_early:
                    self.stopped_early = True
                    self.report(
                        "notice",
                        {
                            "message": f"early stop at step {progress.step}: no lower validation loss in {patience} "
                            f"evaluations (best {progress.best_val_loss:.4f} at step {progress.best_step})"
                        },
                    )
                    break
                # Ctrl-C: every rank stops after the same step, with its state saved.
                if self.stop_poll.agreed_stop(progress.step, self.should_stop()) and not last:
                    self.save_checkpoint()
                    # No rank may exit before rank 0 has written: torchrun stops the whole job when one exits early.
                    barrier(self.world)
                    raise Interrupted(
                        f"interrupted at step {progress.step}; checkpoint saved. "
                        f"Resume with: gpt2 train --resume --out {self.out}"
                    )
        return self._summary(losses)

    def _track_best(self, val_loss: float) -> bool:
        """Follow the lowest validation loss; True when `val_loss` is a new one. Every rank computes the same (the
        loss is averaged across ranks), so every rank stops early at the same step."""
        progress = self.progress
        if not self.tracks_best:
            return False
        if progress.best_val_loss is None or val_loss < progress.best_val_loss:
            progress.best_val_loss, progress.best_step, progress.evals_since_best = val_loss, progress.step, 0
            return True
        progress.evals_since_best += 1
        return False

    def _keep_best(self) -> None:
        """`checkpoints/best` := this step's checkpoint (saved here if this is no save step)."""
        checkpoint = self.save_checkpoint()  # under FSDP every rank takes part
        if self.world.is_main and checkpoint is not None:
            # The run's model.safetensors is this step's too: best/'s model where the checkpoint holds adapters only.
            best = self.folder.keep_as_best(checkpoint, weights=self.folder.model_file)
            self.report(
                "best", {"step": self.progress.step, "val_loss": self.progress.best_val_loss, "path": str(best)}
            )

    def restore_best(self) -> None:  # rank 0
        """After a resume: if the process that saved the best step died before `best` pointed at it, point it now."""
        step = self.progress.best_step
        if not (self.world.is_main and self.train_settings.keep_best and step is not None):
            return
        kept = self.folder.best_checkpoint()
        checkpoint = self.folder.checkpoints / f"step-{step:06d}"
        if (kept is None or RunFolder.read_state(kept)["step"] != step) and (checkpoint / "state.json").is_file():
            self.folder.keep_as_best(checkpoint)

    def _first_step(self) -> tuple[float, float, float]:
        """The first step of this process: an out-of-memory here is the shape's fault, said as one line."""
        try:
            return self._train_step()
        except torch.OutOfMemoryError:
            total = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
            shape = run_step_shape(self.train_settings, self.model, self.plan, self.precision, self.world)
            raise NotEnoughMemory(out_of_memory_message(shape, str(self.device), total)) from None

    def _train_step(self) -> tuple[float, float, float]:
        """One optimizer step over the global batch; returns the mean loss, the gradient norm and the lr."""
        plan = self.plan
        lr = plan.schedule.lr_at(self.progress.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # Muon's groups: its own peak, the same schedule
        windows = self.sampler.take(plan.windows_per_step)  # the global batch: the same on every rank
        loss_sum = torch.zeros((), device=self.device)
        world = self.world
        # The step's loss is the mean over every target that counts in it, on all micro-batches and ranks, so a
        # token weighs the same however the step is split. Each rank divides its summed loss by the step's count
        # (known everywhere: every rank draws the same global batch) over world_size, as DDP and FSDP average the
        # ranks' gradients.
        normalizer = max(1, self.train_windows.target_count(windows)) / world.world_size
        if world.distributed and self.model.config.dropout > 0:
            # Each rank its own dropout masks (one seed would drop the same units of every rank's slice), derived
            # from the step so that a resumed run draws the masks the uninterrupted one did.
            torch.manual_seed(dropout_seed(self.train_settings.seed, self.progress.step, world.rank))
        for micro in range(plan.grad_accum):
            first = (micro * world.world_size + world.rank) * plan.batch_size  # this rank's slice of the micro-step
            batch = self.train_windows.training_batch(windows[first : first + plan.batch_size], self.device)
            # Gradients are exchanged once per step, on the last micro-step; earlier ones accumulate locally.
            with gradient_sync(self.trained, enabled=micro == plan.grad_accum - 1):
                with self.precision.autocast():
                    # hidden states and the fused loss (training/loss.py): this micro-batch's share of the step's mean
                    loss = self.trained(batch.inputs, batch.targets, batch.documents, normalizer)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += loss.detach()
        loss_sum = mean_across(loss_sum, world)  # each rank's share was scaled by world_size: the step's mean
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        parameters, max_norm = list(self.model.parameters()), self.train_settings.grad_clip or math.inf
        if device_rules(self.device).asynchronous:
            # Reading a value on the host waits for the GPU to finish: enqueue the whole step first, read after.
            # A non-finite step is still caught here, before anything is saved.
            norm = clip_gradients_on_device(parameters, max_norm)
            self._optimizer_step()
            loss_value, norm_value = torch.stack([loss_sum, norm.float()]).tolist()
            self._check_finite(loss_value, norm_value)
        else:
            # The CPU computes in order anyway: reading the norm first skips the clipping pass when it is below the
            # limit, and a non-finite step is refused before the update.
            norm_value = clip_gradients(parameters, max_norm)
            loss_value = loss_sum.item()
            self._check_finite(loss_value, norm_value)
            self._optimizer_step()
        return loss_value, norm_value, lr

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update when fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _check_finite(self, loss_value: float, norm_value: float) -> None:
        # With fp16 loss scaling an infinite gradient is expected now and then: the scaler skips that update.
        if not math.isfinite(loss_value) or (self.scaler is None and not math.isfinite(norm_value)):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            raise TrainingDiverged(
                f"the {what} became {loss_value if what == 'loss' else norm_value} at step {self.progress.step + 1}; "
                f"stopped without saving it (the last good checkpoint in {self.out} is kept). Try a lower --lr"
            )

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first `eval_tokens` of the validation data (the same windows every time), over every
        target that counts (fine-tuning examples: the completions or assistant turns).

        Under torchrun the windows are shared out across ranks. Every rank runs the same number of forward passes
        (FSDP gathers weights collectively); a rank with no windows left scores one with weight zero."""
        self.model.eval()
        count = min(len(self.val_windows), max(1, self.train_settings.eval_tokens // self.plan.seq_len))
        batch, world = self.plan.batch_size, self.world
        total, seen = 0.0, 0
        for start in range(0, count, batch * world.world_size):
            first = start + world.rank * batch
            indices = np.arange(first, min(count, first + batch))
            weight = 1.0 if len(indices) else 0.0
            if weight == 0:
                indices = np.arange(1)
            scored = self.val_windows.training_batch(indices, self.device)
            with self.precision.autocast():  # summed (normalizer 1): the mean is over every target that counts
                loss = self.loss_model(scored.inputs, scored.targets, scored.documents, 1.0)
            total += loss.item() * weight
            seen += self.val_windows.target_count(indices) * weight
        self.model.train()
        if world.distributed:
            totals = torch.tensor([total, seen], dtype=torch.float64, device=self.device)
            total, seen = sum_across(totals, world).tolist()
        return total / max(seen, 1)

    # ------------------------------------------------------------ reporting

    def _mfu(self, tokens_per_s: float) -> float | None:
        # `tokens_per_s` counts every rank's tokens: they were computed on world_size devices.
        return flops.mfu(self.flops_per_token, tokens_per_s, self.peak, self.world.world_size)

    def _log(
        self, loss: float, grad_norm: float, lr: float, tokens_per_s: float, evaluated: bool, stop_early: bool = False
    ) -> None:
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
            "train_s": round(progress.train_s, 3),
        }
        if evaluated and self.data.val:
            record["val_loss"] = round(progress.last_val_loss, 6)  # type: ignore[arg-type]
        record.update(self.hellaswag.metrics() if evaluated and self.hellaswag else {})
        if evaluated and self.tracks_best:
            record.update(best_val_loss=round(progress.best_val_loss, 6), best_step=progress.best_step)  # type: ignore[arg-type]
            if self.train_settings.early_stop:
                record.update(evals_since_best=progress.evals_since_best)
            if stop_early:
                record.update(stopped_early=True)
        self.folder.append_metrics(record)
        self.report("log", {**record, "total_steps": self.plan.total_steps, "epoch": self.sampler.epochs_done})

    def _start_payload(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "out": str(self.out),
            "device": str(self.device),
            "dtype": self.precision.name,
            "compile": self.train_settings.compile,
            "parameters": self.model.num_parameters(),
            "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "model": self.model.config.to_dict(),
            "train_tokens": self.data.train_tokens,
            "val_tokens": self.data.val_tokens,
            "plan": {**dataclasses.asdict(plan), "windows_per_step": plan.windows_per_step},
            "resumed_at": self.progress.step,
            "settings": self.settings.model_dump(mode="json"),
        }

    def _summary(self, losses: list[float]) -> TrainingSummary:
        progress = self.progress
        tail = losses[-max(1, min(len(losses), self.train_settings.log_interval)) :] if losses else []
        hellaswag = self.hellaswag.metrics() if self.hellaswag else {}
        best_val_loss = progress.best_val_loss if self.tracks_best else None
        return TrainingSummary(
            out=self.out,
            model=self.folder.model_file,
            steps=progress.step,
            tokens=progress.tokens,
            elapsed_s=round(progress.elapsed_s, 3),
            train_s=round(progress.train_s, 3),
            train_loss=round(sum(tail) / len(tail), 6) if tail else None,
            val_loss=None if progress.last_val_loss is None else round(progress.last_val_loss, 6),
            hellaswag_acc=hellaswag.get("hellaswag_acc"),
            hellaswag_acc_norm=hellaswag.get("hellaswag_acc_norm"),
            tokens_per_s=round(progress.tokens / max(progress.elapsed_s, 1e-9), 1),
            device=str(self.device),
            dtype=self.precision.name,
            best_val_loss=None if best_val_loss is None else round(best_val_loss, 6),
            best_step=progress.best_step if self.tracks_best else None,
            best=self.folder.best_checkpoint() if self.tracks_best and self.train_settings.keep_best else None,
            stopped_early=self.stopped_early if self.train_settings.early_stop and self.tracks_best else None,
        )

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path | None:
        """Save the model, optimizer and progress as the run's newest checkpoint (rank 0 writes it).

        Under FSDP every rank takes part in gathering the whole tensors; rank 0 alone writes."""
        progress = self.progress
        if self.saved_step == progress.step:
            return self.folder.checkpoints / f"step-{progress.step:06d}"
        self.saved_step = progress.step
        if not (self.world.is_main or self.sharded):
            return None
        keep = self.world.is_main
        adapters = model_tensors = None
        if self.lora is None:
            model_tensors = gather_model_state(self.model, keep)
        else:
            adapters = adapter_state(self.model)
        moments = optimizer_tensors(self.model, self.optimizer, keep)
        if not keep:
            return None
        if self.lora is not None:  # the merged model, into the base re-read at its stored precision
            adapters = {name: tensor.detach().cpu().contiguous() for name, tensor in adapters.items()}
            model_tensors = self.lora.merged_tensors(adapters)
        state = {
            "tokens": progress.tokens,
            "elapsed_s": progress.elapsed_s,
            "train_s": progress.train_s,
            "sampler": dataclasses.asdict(self.sampler.state),
            "last_val_loss": progress.last_val_loss,
            "best_val_loss": progress.best_val_loss,
            "best_step": progress.best_step,
            "evals_since_best": progress.evals_since_best,
            "rng": rng_state(self.device),
            "plan": dataclasses.asdict(self.plan),
            "data": self.data.fingerprint(),
            "settings": self.settings.model_dump(mode="json"),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.lora is not None:
            state["lora"] = self.lora.record()
        folder = self.folder.save_checkpoint(
            progress.step,
            model_tensors,
            self.model.config,
            moments,
            state,
            keep=self.train_settings.keep,
            adapters=adapters,
            keep_adapters=self.lora is not None and self.lora.save_adapters,
        )
        self.report("checkpoint", {"step": progress.step, "path": str(folder)})
        return folder


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one rank's dropout masks at one step under torchrun: distinct per rank and per step."""
    return (seed * 1_000_003 + step) * 65_537 + rank
