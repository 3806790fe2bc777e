"""`gpt2 train`: pretrain or fine-tune GPT-2; with no arguments, a small model on the bundled Shakespeare."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from gpt2cli.cli.options import (
    BlockSizeOption,
    ConfigOption,
    JsonOption,
    NEmbdOption,
    NHeadOption,
    NLayerOption,
    PresetOption,
    TextFieldOption,
    overrides,
    setting_help,
)
from gpt2cli.cli.output import info, print_json
from gpt2cli.settings import ModelSettings, TrainSettings


def _t(field: str) -> str:
    return setting_help(TrainSettings, field)


def command(
    data: Annotated[
        list[str] | None,
        typer.Argument(
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
    dropout: Annotated[
        float | None, typer.Option(help=setting_help(ModelSettings, "dropout"), show_default=False)
    ] = None,
    init_from: Annotated[str | None, typer.Option(help=_t("init_from"), show_default=False)] = None,
    val_data: Annotated[list[str] | None, typer.Option(help=_t("val_data"), show_default=False)] = None,
    val_fraction: Annotated[float | None, typer.Option(help=_t("val_fraction"), show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(help=_t("batch_size"), show_default=False)] = None,
    seq_len: Annotated[int | None, typer.Option(help=_t("seq_len"), show_default=False)] = None,
    total_batch_tokens: Annotated[int | None, typer.Option(help=_t("total_batch_tokens"), show_default=False)] = None,
    lr: Annotated[float | None, typer.Option(help=_t("lr"), show_default=False)] = None,
    min_lr: Annotated[float | None, typer.Option(help=_t("min_lr"), show_default=False)] = None,
    warmup_steps: Annotated[int | None, typer.Option(help=_t("warmup_steps"), show_default=False)] = None,
    schedule: Annotated[str | None, typer.Option(help=_t("schedule"), show_default=False)] = None,
    schedule_steps: Annotated[int | None, typer.Option(help=_t("schedule_steps"), show_default=False)] = None,
    max_steps: Annotated[int | None, typer.Option(help=_t("max_steps"), show_default=False)] = None,
    epochs: Annotated[float | None, typer.Option(help=_t("epochs"), show_default=False)] = None,
    max_tokens: Annotated[int | None, typer.Option(help=_t("max_tokens"), show_default=False)] = None,
    weight_decay: Annotated[float | None, typer.Option(help=_t("weight_decay"), show_default=False)] = None,
    beta1: Annotated[float | None, typer.Option(help=_t("beta1"), show_default=False)] = None,
    beta2: Annotated[float | None, typer.Option(help=_t("beta2"), show_default=False)] = None,
    grad_clip: Annotated[float | None, typer.Option(help=_t("grad_clip"), show_default=False)] = None,
    device: Annotated[str | None, typer.Option(help=_t("device"), show_default=False)] = None,
    dtype: Annotated[str | None, typer.Option(help=_t("dtype"), show_default=False)] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help=_t("compile"), show_default=False)
    ] = None,
    parallel: Annotated[str | None, typer.Option(help=_t("parallel"), show_default=False)] = None,
    out: Annotated[str | None, typer.Option(help=_t("out"), show_default=False)] = None,
    log_interval: Annotated[int | None, typer.Option(help=_t("log_interval"), show_default=False)] = None,
    eval_interval: Annotated[int | None, typer.Option(help=_t("eval_interval"), show_default=False)] = None,
    eval_tokens: Annotated[int | None, typer.Option(help=_t("eval_tokens"), show_default=False)] = None,
    save_interval: Annotated[int | None, typer.Option(help=_t("save_interval"), show_default=False)] = None,
    keep: Annotated[int | None, typer.Option(help=_t("keep"), show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(help=_t("seed"), show_default=False)] = None,
    resume: Annotated[bool | None, typer.Option("--resume/--no-resume", help=_t("resume"), show_default=False)] = None,
    text_field: TextFieldOption = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Train GPT-2 from scratch or fine-tune a checkpoint; resumable exactly, Ctrl-C saves before stopping.

    With no DATA it trains a small model on the bundled Shakespeare corpus (about five minutes on two CPU
    cores) and prints the command that samples from it.
    """
    flags = overrides(
        model=dict(
            preset=preset, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, dropout=dropout
        ),
        data=dict(text_field=text_field, paths=data or None),
        train=dict(
            init_from=init_from,
            val_data=val_data or None,
            val_fraction=val_fraction,
            batch_size=batch_size,
            seq_len=seq_len,
            total_batch_tokens=total_batch_tokens,
            lr=lr,
            min_lr=min_lr,
            warmup_steps=warmup_steps,
            schedule=schedule,
            schedule_steps=schedule_steps,
            max_steps=max_steps,
            epochs=epochs,
            max_tokens=max_tokens,
            weight_decay=weight_decay,
            beta1=beta1,
            beta2=beta2,
            grad_clip=grad_clip,
            device=device,
            dtype=dtype,
            compile=compile,
            parallel=parallel,
            out=out,
            log_interval=log_interval,
            eval_interval=eval_interval,
            eval_tokens=eval_tokens,
            save_interval=save_interval,
            keep=keep,
            seed=seed,
            resume=resume,
        ),
    )
    run_training_command(config, flags, json_output)


def run_training_command(config: Path | None, flags: dict[str, dict[str, Any]], json_output: bool) -> None:
    from gpt2cli.devices import resolve_device
    from gpt2cli.distributed import barrier, from_environment, start, stop
    from gpt2cli.run_folder import new_run_folder
    from gpt2cli.training import Interrupted
    from gpt2cli.training_setup import resolve_settings

    settings, bundled = resolve_settings(config, flags)
    world = from_environment()
    out = Path(settings.train.out) if settings.train.out else new_run_folder(world.distributed)

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
    from gpt2cli.cli.train_display import TrainingDisplay, print_summary
    from gpt2cli.corpus import bundled_corpus, default_cache_dir, load_token_data
    from gpt2cli.data import EncodeOptions
    from gpt2cli.devices import resolve_precision
    from gpt2cli.training_setup import prepare_trainer, with_absolute_paths

    precision = resolve_precision(settings.train.dtype, device)
    options = EncodeOptions(
        text_field=settings.data.text_field, errors=settings.data.errors, allow_special=settings.data.allow_special
    )
    started = time.perf_counter()
    data = load_token_data(
        [str(bundled_corpus())] if bundled else settings.data.paths,
        settings.train.val_data,
        settings.train.val_fraction,
        options,
        Path(settings.data.cache_dir) if settings.data.cache_dir else default_cache_dir(),
        settings.data.workers,
    )
    settings = with_absolute_paths(settings, out)  # once found: errors name the paths as given
    source = "the bundled Shakespeare corpus" if bundled else f"{len(data.sources)} source(s)"
    processes = f", {world.world_size} processes" if world.distributed else ""
    display = TrainingDisplay(
        f"tokens: {data.train_tokens:,} for training, {data.val_tokens:,} for validation, from {source} "
        f"({time.perf_counter() - started:.1f} s){processes}"
    )
    with _graceful_interrupt(announce=world.is_main) as should_stop:
        trainer = prepare_trainer(
            settings, data, out, precision, world=world, report=display.report, should_stop=should_stop
        )
        try:
            summary = trainer.run()
        finally:
            display.close()
    if world.is_main:
        print_summary(summary)
        if json_output:
            print_json(summary)


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
