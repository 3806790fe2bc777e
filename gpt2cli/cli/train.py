"""`gpt2 train`: pretrain or fine-tune GPT-2; with no arguments, a small model on the bundled Shakespeare."""

from __future__ import annotations

import inspect
import os
import signal
import sys
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
from gpt2cli.settings import DEFAULT_RUN, DataSettings, ModelSettings, Parallel, Schedule, TrainSettings

SAMPLE_PROMPT = "ROMEO:"


def _t(field: str, panel: str, *declarations: str) -> Any:
    return setting(TrainSettings, field, *declarations, panel=panel)


def command(
    data: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="DATA",
            help="Text, .jsonl or .gz files, llm.c .bin shards, folders of shards, or quoted globs. "
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
    lr: Annotated[float | None, _t("lr", OPTIMIZER)] = None,
    min_lr: Annotated[float | None, _t("min_lr", OPTIMIZER)] = None,
    weight_decay: Annotated[float | None, _t("weight_decay", OPTIMIZER)] = None,
    beta1: Annotated[float | None, _t("beta1", OPTIMIZER)] = None,
    beta2: Annotated[float | None, _t("beta2", OPTIMIZER)] = None,
    grad_clip: Annotated[float | None, _t("grad_clip", OPTIMIZER)] = None,
    schedule: Annotated[Schedule | None, _t("schedule", SCHEDULE)] = None,
    warmup_steps: Annotated[int | None, _t("warmup_steps", SCHEDULE)] = None,
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
    save_interval: Annotated[int | None, _t("save_interval", OUTPUT)] = None,
    keep: Annotated[int | None, _t("keep", OUTPUT)] = None,
    json_output: JsonOption = False,
) -> None:
    """Train GPT-2 from scratch or fine-tune a checkpoint; resumable exactly, Ctrl-C saves before stopping.

    With no DATA it trains a small model on the bundled Shakespeare corpus (about five minutes on two CPU
    cores) and prints the command that samples from it.
    """
    flags = overrides({**locals(), "paths": data}, model=ModelSettings, data=DataSettings, train=TrainSettings)
    run_training_command(config, flags, json_output)


# The default run's own values replace the settings' defaults shown beside each option: say so, once, in the help.
command.__doc__ = f"{inspect.cleandoc(command.__doc__ or '')}\n\n{profile_help(DEFAULT_RUN)}"


def run_training_command(config: Path | None, flags: dict[str, dict[str, Any]], json_output: bool) -> None:
    from gpt2cli.devices import resolve_device
    from gpt2cli.distributed import barrier, from_environment, start, stop
    from gpt2cli.training import Interrupted

    settings, bundled = _resolve_settings(config, flags)
    world = from_environment()
    out = Path(settings.train.out or _new_run_folder(world.distributed))
    settings.train.out = str(out)

    device = start(world, resolve_device(settings.train.device))
    try:
        _train(settings, bundled, out, world, device, json_output)
        # Leave together: a rank tearing the group down while rank 0 still writes could abort in gloo's threads.
        barrier(world)
    except Interrupted:
        if world.is_main:
            raise
        raise SystemExit(Interrupted.exit_code) from None  # every rank stops together; rank 0 tells the user
    finally:
        stop()


def _train(settings: Any, bundled: bool, out: Path, world: Any, device: Any, json_output: bool) -> None:
    from gpt2cli.devices import resolve_precision
    from gpt2cli.text_encoding import EncodeOptions
    from gpt2cli.training import Trainer
    from gpt2cli.training_data import bundled_corpus, default_cache_dir, load_token_data

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
    )
    _make_paths_absolute(settings)  # once found (errors name the paths as given), so a resume finds them anywhere
    source = "the bundled Shakespeare corpus" if bundled else f"{len(data.sources)} source(s)"
    processes = f", {world.world_size} processes" if world.distributed else ""
    display = TrainingDisplay(
        f"tokens: {data.train_tokens:,} for training, {data.val_tokens:,} for validation, from {source} "
        f"({time.perf_counter() - started:.1f} s){processes}"
    )
    with _graceful_interrupt(announce=world.is_main) as should_stop:
        trainer = Trainer(settings, data, out, precision, report=display.report, should_stop=should_stop, world=world)
        try:
            summary = trainer.run()
        finally:
            display.close()
    if world.is_main:
        _print_summary(summary)
        if json_output:
            print_json(summary)


def _resolve_settings(config: Path | None, flags: dict[str, dict[str, Any]]) -> tuple[Any, bool]:
    """The run's settings, and whether it is the embedded default run (no data given anywhere).

    `--resume` reads the run's own saved settings (unless --config is given); flags given now still win.
    """
    from gpt2cli.errors import UsageError
    from gpt2cli.settings import load_settings

    probe = load_settings(config, flags)
    bundled = not probe.data.paths
    if probe.train.resume:
        if probe.train.out is None:
            raise UsageError("--resume needs --out, the folder of the run to continue")
        saved = Path(probe.train.out) / "config.toml"
        if config is None and saved.is_file():
            config = saved
            bundled = not load_settings(config, flags).data.paths
    return load_settings(config, flags, profile=DEFAULT_RUN if bundled else None), bundled


def _make_paths_absolute(settings: Any) -> None:
    """Input paths as absolute ones in the settings the run saves."""
    settings.data.paths = [os.path.abspath(path) for path in settings.data.paths]
    settings.train.val_data = [os.path.abspath(path) for path in settings.train.val_data]
    if settings.train.init_from is not None:
        settings.train.init_from = os.path.abspath(settings.train.init_from)


def _new_run_folder(distributed: bool = False) -> str:
    if distributed:  # every rank must name the same folder: torchrun gives the job one id
        return str(Path("runs") / f"torchrun-{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = Path("runs") / stamp, 1
    while candidate.exists():
        n += 1
        candidate = Path("runs") / f"{stamp}-{n}"
    return str(candidate)


class _graceful_interrupt:
    """First Ctrl-C: finish the step, save, exit 130. Second Ctrl-C: stop at once (the last checkpoint is intact)."""

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.announce = announce  # under torchrun every rank gets the signal; rank 0 alone says so
        self.previous: Any = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            info("stopping after this step to save a checkpoint (Ctrl-C again to stop at once)")

    def __enter__(self) -> Any:
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return lambda: self.requested

    def __exit__(self, *_: object) -> None:
        signal.signal(signal.SIGINT, self.previous)


def _print_settings(settings: dict[str, dict[str, Any]]) -> None:
    for section, values in settings.items():
        shown = " ".join(f"{key}={value}" for key, value in values.items() if value not in (None, []))
        info(f"{section}: {shown}")


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return (
        f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


class TrainingDisplay:
    """A live line on a terminal (Rich), plain log lines otherwise; both on stderr."""

    def __init__(self, data_line: str) -> None:
        self.data_line = data_line  # shown with the settings once the run is under way (errors come alone)
        self.interactive = sys.stderr.isatty()
        self.live: Any = None
        self.started_step = 0

    def report(self, event: str, payload: dict[str, Any]) -> None:
        if event == "start":
            _print_settings(payload["settings"])
            info(self.data_line)
            self.started_step = payload["resumed_at"]
            plan = payload["plan"]
            resumed = f", resuming at step {payload['resumed_at']}" if payload["resumed_at"] else ""
            info(
                f"model: {payload['parameters'] / 1e6:.2f}M parameters on {payload['device']} ({payload['dtype']}"
                f"{', compiled' if payload['compile'] else ''}); {plan['total_steps']} steps of "
                f"{plan['tokens_per_step']:,} tokens (batch {plan['batch_size']} × {plan['seq_len']}"
                f" × {plan['grad_accum']} accumulation){resumed}; run folder {payload['out']}"
            )
            if self.interactive:
                from rich.live import Live

                from gpt2cli.cli.output import stderr_console

                self.live = Live("", console=stderr_console(), transient=True, refresh_per_second=4)
                self.live.start()
        elif event == "log":
            line = self._line(payload)
            if self.live is not None:
                self.live.update(line)
                if "val_loss" in payload:
                    self.live.console.print(line, highlight=False)
            else:
                info(line)

    def _line(self, payload: dict[str, Any]) -> str:
        step, total = payload["step"], payload["total_steps"]
        done = step - self.started_step
        eta = payload["elapsed_s"] / max(done, 1) * (total - step) if done else 0.0
        parts = [
            f"step {step}/{total}",
            f"loss {payload['loss']:.4f}",
            f"val {payload['val_loss']:.4f}" if "val_loss" in payload else None,
            f"lr {payload['lr']:.2e}",
            f"{payload['tok_per_s']:,.0f} tok/s",
            f"MFU {payload['mfu'] * 100:.1f}%" if payload.get("mfu") is not None else None,
            f"{_format_duration(payload['elapsed_s'])} elapsed",
            f"ETA {_format_duration(eta)}",
        ]
        return " | ".join(part for part in parts if part)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    from gpt2cli.cli.output import stderr_console

    table = Table(title="training finished", show_header=False, title_justify="left")
    rows = [
        ("steps", f"{summary['steps']:,}"),
        ("tokens", f"{summary['tokens']:,}"),
        ("wall time", _format_duration(summary["elapsed_s"])),
        ("final train loss", f"{summary['train_loss']:.4f}" if summary["train_loss"] is not None else "-"),
        ("final val loss", f"{summary['val_loss']:.4f}" if summary["val_loss"] is not None else "-"),
        ("mean tokens/s", f"{summary['tokens_per_s']:,.0f}"),
        ("weights", summary["model"]),
    ]
    for name, value in rows:
        table.add_row(name, value)
    stderr_console().print(table)
    info(f'sample from it: gpt2 sample {summary["model"]} --prompt "{SAMPLE_PROMPT}"')
