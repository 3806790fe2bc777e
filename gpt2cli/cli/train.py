"""`gpt2 train`: pretrain or fine-tune GPT-2; with no arguments, a small model on the bundled Shakespeare."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from gpt2cli.cli.options import (
    DATA,
    MEMORY,
    MODEL,
    OPTIMIZER,
    OUTPUT,
    RUN,
    SCHEDULE,
    SPEED,
    BlockSizeOption,
    ChatTemplateOption,
    CompileOption,
    ConfigOption,
    DeviceOption,
    DtypeOption,
    FormatOption,
    JsonOption,
    LossOnOption,
    NEmbdOption,
    NHeadOption,
    NLayerOption,
    PresetOption,
    SectionSetting,
    SeedOption,
    TextFieldOption,
    overrides,
    profile_help,
    setting,
)
from gpt2cli.cli.output import print_json
from gpt2cli.settings.sections import DEFAULT_RUN, DataSettings, ModelSettings, TrainSettings
from gpt2cli.settings.types import MuonAdjustLr, OptimizerName, Parallel, Schedule

_t = SectionSetting(TrainSettings, RUN)  # every flag names its panel


def command(
    data: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="DATA",
            help="Text, .jsonl, .gz or .parquet files (text, prompt-completion or messages records), llm.c .bin "
            "shards, folders of shards (*_val_* left out) or of .parquet files, or quoted globs. "
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
    data_format: FormatOption = None,
    loss_on: LossOnOption = None,
    chat_template: ChatTemplateOption = None,
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
    keep_best: Annotated[bool | None, _t("keep_best", OUTPUT, "--keep-best/--no-keep-best")] = None,
    early_stop: Annotated[int | None, _t("early_stop", OUTPUT)] = None,
    log_to: Annotated[str | None, _t("log_to", OUTPUT)] = None,
    memory_check: Annotated[bool | None, _t("memory_check", RUN, "--memory-check/--no-memory-check")] = None,
    activation_checkpointing: Annotated[
        bool | None, _t("activation_checkpointing", MEMORY, "--activation-checkpointing/--no-activation-checkpointing")
    ] = None,
    lora_rank: Annotated[int | None, _t("lora_rank", MEMORY)] = None,
    lora_alpha: Annotated[float | None, _t("lora_alpha", MEMORY)] = None,
    lora_dropout: Annotated[float | None, _t("lora_dropout", MEMORY)] = None,
    lora_targets: Annotated[str | None, _t("lora_targets", MEMORY)] = None,
    save_adapters: Annotated[bool | None, _t("save_adapters", MEMORY, "--save-adapters/--no-save-adapters")] = None,
    json_output: JsonOption = False,
) -> None:
    """Train GPT-2 from scratch or fine-tune a checkpoint; resumable exactly, Ctrl-C or SIGTERM saves before stopping.

    With no DATA it trains a small model on the bundled Shakespeare corpus (about six minutes on two CPU cores;
    Muon with AdamW, warmup-stable-decay) and prints the command that samples from it.
    """
    flags = overrides(
        {**locals(), "paths": data, "format": data_format}, model=ModelSettings, data=DataSettings, train=TrainSettings
    )
    run_training_command(config, flags, json_output)


# The default run's own values replace the settings' defaults shown beside each option: say so, once, in the help.
command.__doc__ = f"{inspect.cleandoc(command.__doc__ or '')}\n\n{profile_help(DEFAULT_RUN)}"


def run_training_command(config: Path | None, flags: Mapping[str, Mapping[str, Any]], json_output: bool) -> None:
    """Resolve the settings, train (`training.run`) with the live display, then print the summary (rank 0 only)."""
    from gpt2cli.cli.train_display import TrainingDisplay, print_summary
    from gpt2cli.runtime.distributed import from_environment
    from gpt2cli.training.run import run_training
    from gpt2cli.training.setup import resolve_settings
    from gpt2cli.training.trainer import Interrupted

    settings = resolve_settings(config, flags)
    main = from_environment().is_main
    display = TrainingDisplay()
    try:
        summary = run_training(settings, report=display.report)
    except Interrupted as interrupted:
        if main:
            raise
        raise SystemExit(interrupted.exit_code) from None  # every rank stops together; rank 0 tells the user
    finally:
        display.close()
    if main:
        print_summary(summary)
        if json_output:
            print_json(summary.to_dict())
