"""Preparing a training run: its settings (a resume reads the run's own), the model, the optimizer and the state
to continue from, checked before anything is written; then a `Trainer` that holds them.

No settings object is changed here: settings that differ (saved schedule, absolute paths) are new copies.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from gpt2cli.data.examples import MESSAGES, ExampleData
from gpt2cli.data.inputs import TokenData
from gpt2cli.errors import DataError, UsageError
from gpt2cli.evaluation import read_multiple_choice
from gpt2cli.formats.chat_template import ChatTemplate, read_chat_template
from gpt2cli.formats.checkpoint import load_model
from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.runtime.compile import choose_compile, compile_blocks, keep_compiled_code
from gpt2cli.runtime.devices import Precision, keep_freed_memory
from gpt2cli.runtime.distributed import World, is_sharded, parallelize
from gpt2cli.settings.sections import DEFAULT_RUN, Settings, TrainSettings, load_settings
from gpt2cli.training.batches import SamplerState, Windows, WindowSampler
from gpt2cli.training.hellaswag import HellaSwag
from gpt2cli.training.lora import LoraRun, prepare_lora
from gpt2cli.training.loss import TrainingModel
from gpt2cli.training.memory import check_training_memory, memory_remedies, parameter_bytes, run_step_shape
from gpt2cli.training.optim import Optimizer, build_muon, build_optimizer, load_optimizer_tensors, muon_available
from gpt2cli.training.packing import PackedRows
from gpt2cli.training.plan import plan_run
from gpt2cli.training.run_folder import RunFolder, restore_rng
from gpt2cli.training.trainer import Progress, Report, Trainer


def resolve_settings(config: str | os.PathLike[str] | None, flags: Mapping[str, Mapping[str, Any]]) -> Settings:
    """The run's settings from the config file, the environment and the flags given, as `gpt2 train` resolves them.

    No data given anywhere is the embedded default run (its profile under the other sources); `--resume` reads the
    run's own saved settings (unless --config is given), with the flags given now still winning.
    """
    probe = load_settings(config, flags)
    if probe.train.resume:
        if probe.train.out is None:
            raise UsageError("--resume needs --out, the folder of the run to continue")
        saved = Path(probe.train.out) / "config.toml"
        if config is None and saved.is_file():
            # The saved settings are the run's resolved ones: the default-run profile is not laid over them again,
            # so a run saved before the profile changed (e.g. AdamW before Muon) resumes as it was started.
            return load_settings(saved, flags)
    return load_settings(config, flags, profile=None if probe.data.paths else DEFAULT_RUN)


def run_chat_template(settings: Settings, data_format: str) -> ChatTemplate | None:
    """The chat template a run renders with and its checkpoints carry: --chat-template, else the one --init-from
    carries, else (messages records) the built-in one; None for a run that has none to carry."""
    option = settings.data.chat_template
    if option is not None:
        return ChatTemplate.from_option(option)
    carried = read_chat_template(settings.train.init_from) if settings.train.init_from else None
    if carried is not None:
        return carried
    return ChatTemplate.default() if data_format == MESSAGES else None


def with_absolute_paths(settings: Settings, out: Path) -> Settings:
    """The settings the run saves: input paths and the run folder absolute, so a resume finds them anywhere."""
    data, train = settings.data, settings.train
    init_from = None if train.init_from is None else os.path.abspath(train.init_from)
    return settings.model_copy(
        update={
            "data": data.model_copy(
                update={
                    "paths": [os.path.abspath(path) for path in data.paths],
                    "chat_template": _absolute_template(data.chat_template),
                }
            ),
            "train": train.model_copy(
                update={
                    "val_data": [os.path.abspath(path) for path in train.val_data],
                    "init_from": init_from,
                    "hellaswag": None if train.hellaswag is None else os.path.abspath(train.hellaswag),
                    "out": str(out),
                }
            ),
        }
    )


def _absolute_template(option: str | None) -> str | None:
    """A --chat-template FILE made absolute; `default` (the built-in template) and None as they are."""
    return option if option in (None, "default") else os.path.abspath(option)  # type: ignore[arg-type]


def _with_saved_schedule(settings: Settings, state: dict[str, Any]) -> Settings:
    """A resumed run keeps its learning-rate schedule even when --max-steps changes, unless told otherwise."""
    saved, train = state["plan"]["schedule"], settings.train
    keep = {
        "schedule_steps": train.schedule_steps if train.schedule_steps is not None else saved["total_steps"],
        "warmup_steps": train.warmup_steps if train.warmup_steps is not None else saved["warmup_steps"],
    }
    return settings.model_copy(update={"train": train.model_copy(update=keep)})


def build_model(
    settings: Settings,
    device: torch.device,
    resume_from: Path | None,
    lora: LoraRun | None = None,
    precision: Precision | None = None,
) -> GPT2:
    """The model to train: the checkpoint resumed, the one `--init-from` names, or a fresh one (seeded); with
    `lora`, the frozen base with its adapters (new, or the resumed checkpoint's)."""
    train = settings.train
    torch.manual_seed(train.seed)
    if lora is not None:
        adapters = RunFolder.read_adapters(resume_from) if resume_from is not None else None
        model = lora.build_model(device, precision or Precision(device, None), adapters)
    elif resume_from is not None:
        model = load_model(resume_from / "model.safetensors", device=device, dtype=torch.float32)
        wanted = settings.model.to_config() if train.init_from is None else None
        if wanted is not None and dataclasses.replace(wanted, dropout=model.config.dropout) != model.config:
            raise UsageError(
                f"{resume_from.parent.parent}: the saved model's shape ({_shape(model.config)}) differs from the "
                f"settings' ({_shape(wanted)}); resume with the run's own settings"
            )
    elif train.init_from is not None:
        model = load_model(train.init_from, device=device, dtype=torch.float32)
    else:
        model = GPT2(settings.model.to_config()).to(device)
    model.set_dropout(settings.model.dropout)
    # Before compiling and sharding: the checkpoint is traced into the compiled block, inside FSDP2's unit.
    model.set_activation_checkpointing(train.activation_checkpointing)
    return model.train()


def prepare_trainer(
    settings: Settings,
    data: TokenData | ExampleData,
    out: Path,
    precision: Precision,
    world: World | None = None,
    report: Report | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    model_metadata: dict[str, str] | None = None,
) -> Trainer:
    """Check the run, then build (or restore) everything it trains with. A refused run leaves nothing behind.

    `model_metadata`: extra safetensors metadata of every checkpoint's weights (the chat template the run used)."""
    world = world or World()
    device = precision.device
    folder = RunFolder(out)
    resume_from = folder.checkpoint_to_resume(settings.train.resume)
    saved_state = RunFolder.read_state(resume_from) if resume_from is not None else None
    if saved_state is not None:
        settings = _with_saved_schedule(settings, saved_state)
    train = settings.train
    _check_optimizer(settings, world)
    _check_lora(settings, world)
    lora = prepare_lora(train, saved_state, out)

    model = build_model(settings, device, resume_from, lora, precision)
    seq_len = train.seq_len or model.config.block_size
    # Built once here and handed to the Trainer: the plan, the sampler and the loop read the same windows.
    train_windows: Windows | PackedRows
    val_windows: Windows | PackedRows
    if isinstance(data, ExampleData):
        train_windows, val_windows = PackedRows(data.train, seq_len), PackedRows(data.val, seq_len)
        if report is not None and world.is_main:
            report("notice", {"message": packing_summary(data, train_windows, val_windows)})
    else:
        train_windows, val_windows = Windows(data.train, seq_len), Windows(data.val, seq_len)
    plan = plan_run(train, model.config, len(train_windows), world.world_size)
    if data.val and len(val_windows) == 0:
        raise DataError(
            f"the validation data ({data.val_tokens} tokens) is shorter than one window of {seq_len + 1} tokens; "
            "raise --val-fraction, give --val-data, or lower --seq-len"
        )
    if saved_state is not None:
        _check_resumable(saved_state, data, plan.tokens_per_step, out)
    _check_early_stop(train, plan.total_steps)
    if device.type == "cpu" and train.memory_check:  # before the first step, not in it (the kernel's OOM killer)
        shape = run_step_shape(train, model, plan, precision, world)
        # The weights just built (whole, before any sharding) are resident already.
        check_training_memory(shape, already_resident=parameter_bytes(model), remedies=memory_remedies(train, shape))
    examples = read_multiple_choice(train.hellaswag, train.hellaswag_limit) if train.hellaswag else None
    steps_left = plan.total_steps - (saved_state or {}).get("step", 0)
    flops = model.flops_per_token(plan.seq_len) * plan.tokens_per_step * steps_left / world.world_size
    compiled = _choose_compile(train.compile, device, flops, report if world.is_main else None)
    # What auto chose is what config.toml records: a resumed run computes as the run it continues.
    settings = settings.model_copy(update={"train": train.model_copy(update={"compile": compiled})})
    if world.is_main:
        folder.open_for_writing(new=resume_from is None)  # only once everything checked out
    folder.model_metadata = model_metadata or {}  # in every checkpoint's model.safetensors (the chat template)

    if compiled:
        keep_compiled_code()
        compile_blocks(model.transformer.h)
    # What the step calls: the training module, its DDP wrapper, or (FSDP) the module with its weights sharded.
    trained = parallelize(TrainingModel(model, compiled_loss=compiled), world, train.parallel, device)
    root = getattr(trained, "module", trained)  # what DDP wraps, or FSDP's sharded root
    hellaswag = HellaSwag(examples, model, root, precision, world) if examples else None
    # After sharding: the optimizer holds the shards, and its moments are sharded alike.
    optimizer = _build_optimizer(settings, model, device)
    sharded = is_sharded(model.transformer.wte.weight)
    scaler = _grad_scaler(device, sharded) if precision.needs_scaler else None
    sampler = WindowSampler(len(train_windows), train.seed)
    progress = Progress()
    if saved_state is not None:
        progress = _restore(saved_state, resume_from, model, optimizer, scaler, device)  # type: ignore[arg-type]
        sampler.state = progress.sampler
        if world.is_main:
            folder.truncate_metrics(progress.step)
    keep_freed_memory(device)
    return Trainer(
        settings=settings,
        data=data,
        train_windows=train_windows,
        val_windows=val_windows,
        plan=plan,
        model=model,
        trained=trained,
        optimizer=optimizer,
        scaler=scaler,
        sampler=sampler,
        progress=progress,
        folder=folder,
        precision=precision,
        world=world,
        report=report,
        should_stop=should_stop,
        hellaswag=hellaswag,
        lora=lora,
    )


def _choose_compile(
    setting: bool | Literal["auto"], device: torch.device, training_flops: float, report: Report | None
) -> bool:
    """--compile, --no-compile, or auto's choice; auto staying eager says why (once, on the main process)."""
    choice = choose_compile(setting, device, training_flops)
    if choice.reason is not None and report is not None:
        report("notice", {"message": f"compile: off ({choice.reason})"})
    return choice.enabled


def _check_early_stop(train: TrainSettings, total_steps: int) -> None:
    """--early-stop N that can never stop the run (N or fewer evaluations in all) is a mistake, said before starting."""
    patience = train.early_stop
    evaluations = -(-total_steps // train.eval_interval)  # every eval_interval steps, and at the last step
    if patience is not None and evaluations <= patience:
        raise UsageError(
            f"--early-stop {patience} can never stop this run: it evaluates {evaluations} time(s) in {total_steps} "
            f"steps (--eval-interval {train.eval_interval}); lower --eval-interval or --early-stop"
        )


def _check_optimizer(settings: Settings, world: World) -> None:
    if settings.train.optimizer != "muon":
        return
    if not muon_available():
        raise UsageError(f"--optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")
    if world.distributed and settings.train.parallel == "fsdp":
        # Muon orthogonalises whole matrices; FSDP gives each process a slice of every one.
        raise UsageError("--optimizer muon needs whole matrices, which --parallel fsdp shards: use ddp or adamw")


def _check_lora(settings: Settings, world: World) -> None:
    if settings.train.lora_rank is not None and world.distributed and settings.train.parallel == "fsdp":
        # FSDP2 gathers each unit's parameters as one flat buffer of one dtype: the 16-bit frozen base and the
        # float32 adapters share every block. The base is frozen and small next to full training: use DDP.
        raise UsageError("--lora-rank does not support --parallel fsdp (a frozen base and float32 adapters); use ddp")


def _build_optimizer(settings: Settings, model: GPT2, device: torch.device) -> Optimizer:
    train = settings.train
    betas = (train.beta1, train.beta2)
    if train.optimizer == "muon":
        return build_muon(model, train.lr, train.muon_lr, train.muon_adjust_lr, train.weight_decay, betas, device)
    return build_optimizer(model, train.lr, train.weight_decay, betas, device)


def _check_resumable(state: dict[str, Any], data: TokenData, tokens_per_step: int, out: Path) -> None:
    if state["data"] != data.fingerprint():
        raise UsageError(
            f"{out}: the training data differs from the run's ({state['data']['train_tokens']:,} training "
            f"tokens from {len(state['data']['sources'])} source(s)); resume with the same data"
        )
    if state["plan"]["tokens_per_step"] != tokens_per_step:
        raise UsageError(
            f"{out}: the run used {state['plan']['tokens_per_step']} tokens per step, these settings "
            f"{tokens_per_step}; resume with the same batch"
        )


def _restore(
    state: dict[str, Any],
    checkpoint: Path,
    model: GPT2,
    optimizer: Optimizer,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
) -> Progress:
    """Put the optimizer, loss scaler and RNG back as they were saved; returns the saved progress."""
    load_optimizer_tensors(model, optimizer, RunFolder.read_optimizer(checkpoint))
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"], device)
    return Progress(
        step=state["step"],
        tokens=state["tokens"],
        elapsed_s=state["elapsed_s"],
        train_s=state.get("train_s", 0.0),  # absent from checkpoints written before it was recorded
        sampler=SamplerState(**state["sampler"]),
        last_val_loss=state.get("last_val_loss"),
        best_val_loss=state.get("best_val_loss"),  # absent from checkpoints written before --keep-best
        best_step=state.get("best_step"),
        evals_since_best=state.get("evals_since_best", 0),
    )


def _grad_scaler(device: torch.device, sharded: bool) -> torch.amp.GradScaler:
    """fp16 loss scaling; with sharded gradients every rank must agree on overflow, which the sharded scaler does."""
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


def loss_scope(data_format: str, loss_on: str) -> str:
    """What the loss of a fine-tune is over, in words."""
    if loss_on == "all":
        return "loss on all tokens"
    return "loss on the completions" if data_format != MESSAGES else "loss on the assistant turns"


def packing_summary(data: ExampleData, train: PackedRows, val: PackedRows) -> str:
    """The start-up line of a fine-tune: examples, rows, fill, and the examples cut to fit a window."""
    cut = train.cut + val.cut
    return (
        f"{data.recipe.format} records, {loss_scope(data.recipe.format, data.recipe.loss_on)}: "
        f"{len(data.train):,} training examples packed into "
        f"{len(train):,} windows ({train.fill:.0%} filled), {len(data.val):,} held out; "
        + (f"{cut:,} longer than a window of {train.seq_len + 1} tokens were cut" if cut else "none cut")
    )


def _shape(config: GPT2Config) -> str:
    return f"{config.n_layer} layers, {config.n_head} heads, width {config.n_embd}, block {config.block_size}"
