"""`gpt2 train`: pretrain or fine-tune GPT-2; with no arguments, a small model on the bundled Shakespeare."""

from __future__ import annotations

import contextlib
import inspect
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from gpt2cli.cli.options import (
    DATA,
    MODEL,
    OPTIMIZER,
    OUTPUT,
    RUN,
    SCHEDULE,
    SPEED,
    BlockSizeOption,
    CompileOption,
    ConfigOption,
    DeviceOption,
    DtypeOption,
    JsonOption,
    NEmbdOption,
    NHeadOption,
    NLayerOption,
    PresetOption,
    SeedOption,
    TextFieldOption,
    overrides,
    profile_help,
    setting,
)
from gpt2cli.cli.output import info, print_json
from gpt2cli.settings.sections import DEFAULT_RUN, DataSettings, ModelSettings, TrainSettings
from gpt2cli.settings.types import MuonAdjustLr, OptimizerName, Parallel, Schedule


def _t(field: str, panel: str, *declarations: str) -> Any:
    return setting(TrainSettings, field, *declarations, panel=panel)


def command(
    data: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="DATA",
            help="Text, .jsonl, .gz or .parquet files, llm.c .bin shards, folders of shards (*_val_* left out) or "
            "of .parquet files, or quoted globs. "
            "None: the bundled Shakespeare corpus with a small model (the default run).",
            show_default=False,
        ),
    ] = None,
    preset: PresetOption = None,
    n_layer: NLayerOption = None,
    n_head: NHeadOption = None,
    n_embd: NEmbdOption = None,
    block_size: BlockSizeOption = None,
    dropout: Annotated[float | None, setting(ModelSettings, "dropout", panel=MODEL)] = None,
    init_from: Annotated[str | None, _t("init_from", MODEL)] = None,
    val_data: Annotated[list[str] | None, _t("val_data", DATA)] = None,
    val_fraction: Annotated[float | None, _t("val_fraction", DATA)] = None,
    batch_size: Annotated[int | None, _t("batch_size", DATA)] = None,
    seq_len: Annotated[int | None, _t("seq_len", DATA)] = None,
    total_batch_tokens: Annotated[int | None, _t("total_batch_tokens", DATA)] = None,
    text_field: TextFieldOption = None,
    optimizer: Annotated[OptimizerName | None, _t("optimizer", OPTIMIZER)] = None,
    lr: Annotated[float | None, _t("lr", OPTIMIZER)] = None,
    muon_lr: Annotated[float | None, _t("muon_lr", OPTIMIZER)] = None,
    muon_adjust_lr: Annotated[MuonAdjustLr | None, _t("muon_adjust_lr", OPTIMIZER)] = None,
    min_lr: Annotated[float | None, _t("min_lr", OPTIMIZER)] = None,
    weight_decay: Annotated[float | None, _t("weight_decay", OPTIMIZER)] = None,
    beta1: Annotated[float | None, _t("beta1", OPTIMIZER)] = None,
    beta2: Annotated[float | None, _t("beta2", OPTIMIZER)] = None,
    grad_clip: Annotated[float | None, _t("grad_clip", OPTIMIZER)] = None,
    schedule: Annotated[Schedule | None, _t("schedule", SCHEDULE)] = None,
    warmup_steps: Annotated[int | None, _t("warmup_steps", SCHEDULE)] = None,
    decay_fraction: Annotated[float | None, _t("decay_fraction", SCHEDULE)] = None,
    schedule_steps: Annotated[int | None, _t("schedule_steps", SCHEDULE)] = None,
    max_steps: Annotated[int | None, _t("max_steps", SCHEDULE)] = None,
    epochs: Annotated[float | None, _t("epochs", SCHEDULE)] = None,
    max_tokens: Annotated[int | None, _t("max_tokens", SCHEDULE)] = None,
    device: DeviceOption[TrainSettings] = None,
    dtype: DtypeOption[TrainSettings] = None,
    compile: CompileOption[TrainSettings] = None,
    parallel: Annotated[Parallel | None, _t("parallel", SPEED)] = None,
    out: Annotated[str | None, _t("out", RUN)] = None,
    resume: Annotated[bool | None, _t("resume", RUN, "--resume/--no-resume")] = None,
    seed: SeedOption[TrainSettings] = None,
    config: ConfigOption = None,
    log_interval: Annotated[int | None, _t("log_interval", OUTPUT)] = None,
    eval_interval: Annotated[int | None, _t("eval_interval", OUTPUT)] = None,
    eval_tokens: Annotated[int | None, _t("eval_tokens", OUTPUT)] = None,
    hellaswag: Annotated[str | None, _t("hellaswag", OUTPUT)] = None,
    hellaswag_limit: Annotated[int | None, _t("hellaswag_limit", OUTPUT)] = None,
    save_interval: Annotated[int | None, _t("save_interval", OUTPUT)] = None,
    keep: Annotated[int | None, _t("keep", OUTPUT)] = None,
    log_to: Annotated[str | None, _t("log_to", OUTPUT)] = None,
    memory_check: Annotated[bool | None, _t("memory_check", RUN, "--memory-check/--no-memory-check")] = None,
    json_output: JsonOption = False,
) -> None:
    """Train GPT-2 from scratch or fine-tune a checkpoint; resumable exactly, Ctrl-C or SIGTERM saves before stopping.

    With no DATA it trains a small model on the bundled Shakespeare corpus (about six minutes on two CPU cores;
    Muon with AdamW, warmup-stable-decay) and prints the command that samples from it.
    """
    flags = overrides({**locals(), "paths": data}, model=ModelSettings, data=DataSettings, train=TrainSettings)
    run_training_command(config, flags, json_output)


# The default run's own values replace the settings' defaults shown beside each option: say so, once, in the help.
command.__doc__ = f"{inspect.cleandoc(command.__doc__ or '')}\n\n{profile_help(DEFAULT_RUN)}"


def run_training_command(config: Path | None, flags: dict[str, dict[str, Any]], json_output: bool) -> None:
    from gpt2cli.observe.trackers import check_trackers
    from gpt2cli.runtime.devices import resolve_device
    from gpt2cli.runtime.distributed import barrier, from_environment, start, stop
    from gpt2cli.training.run_folder import new_run_folder
    from gpt2cli.training.setup import resolve_settings
    from gpt2cli.training.trainer import Interrupted

    settings, bundled = resolve_settings(config, flags)
    check_trackers(settings.train.log_to)  # a missing tracker package stops here, before any training starts
    world = from_environment()
    out = Path(settings.train.out) if settings.train.out else new_run_folder(world.distributed)

    device = start(world, resolve_device(settings.train.device))
    try:
        _train(settings, bundled, out, world, device, json_output)
        # Leave together: a rank tearing the group down while rank 0 still writes could abort in gloo's threads.
        barrier(world)
    except Interrupted as interrupted:
        if world.is_main:
            raise
        raise SystemExit(interrupted.exit_code) from None  # every rank stops together; rank 0 tells the user
    finally:
        stop()


def _train(settings: Any, bundled: bool, out: Path, world: Any, device: Any, json_output: bool) -> None:
    from gpt2cli.cli.app import warn
    from gpt2cli.cli.train_display import TrainingDisplay, print_summary
    from gpt2cli.data.encoding import EncodeOptions
    from gpt2cli.data.inputs import bundled_corpus, load_token_data
    from gpt2cli.runtime.devices import resolve_precision
    from gpt2cli.runtime.files import default_cache_dir
    from gpt2cli.training.run_folder import RunFolder
    from gpt2cli.training.setup import prepare_trainer, with_absolute_paths
    from gpt2cli.training.trainer import Interrupted

    precision = resolve_precision(settings.train.dtype, device)
    options = EncodeOptions.from_settings(settings.data)
    started = time.perf_counter()
    data = load_token_data(
        [str(bundled_corpus())] if bundled else settings.data.paths,
        settings.train.val_data,
        settings.train.val_fraction,
        options,
        Path(settings.data.cache_dir) if settings.data.cache_dir else default_cache_dir(),
        settings.data.workers,
        warn=warn,
    )
    settings = with_absolute_paths(settings, out)  # once found: errors name the paths as given
    source = "the bundled Shakespeare corpus" if bundled else f"{len(data.sources)} source(s)"
    processes = f", {world.world_size} processes" if world.distributed else ""
    display = TrainingDisplay(
        f"tokens: {data.train_tokens:,} for training, {data.val_tokens:,} for validation, from {source} "
        f"({time.perf_counter() - started:.1f} s){processes}"
    )
    # One writer per run folder: rank 0 holds its lock from before the first file is touched until the process ends.
    # Taken after tokenizing, so the forked tokenizer workers never inherit it.
    writer = RunFolder(out).writer_lock() if world.is_main else contextlib.nullcontext()
    with writer, GracefulInterrupt(announce=world.is_main) as stop:
        trainer = prepare_trainer(
            settings, data, out, precision, world=world, report=display.report, should_stop=stop.requested
        )
        try:
            summary = trainer.run()
        except Interrupted as interrupted:
            # The shell's convention, 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM. Under torchrun a rank may stop
            # because another one was signalled.
            interrupted.exit_code = 128 + (stop.signal or signal.SIGINT)
            raise
        finally:
            display.close()
    if world.is_main:
        print_summary(summary)
        if json_output:
            print_json(summary)


class GracefulInterrupt:
    """First Ctrl-C or SIGTERM (what Slurm and Kubernetes send before killing a job): finish the step, save, exit
    128 + the signal (130, 143). A second one: stop at once (the last checkpoint is intact)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True) -> None:
        self.signal = 0
        self.announce = announce  # under torchrun every rank gets the signal; rank 0 alone says so
        self.previous: dict[int, Any] = {}

    def requested(self) -> bool:
        return self.signal != 0

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signum
        if self.announce:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            info(f"{name}: stopping after this step to save a checkpoint (Ctrl-C again to stop at once)")

    def __enter__(self) -> GracefulInterrupt:
        self.previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *_: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
