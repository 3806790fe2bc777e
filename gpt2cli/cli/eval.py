"""`gpt2 eval`: how good is a checkpoint on this text (perplexity, bits per byte) or on multiple choice."""

from __future__ import annotations

import math
from typing import Annotated, Any

import typer

from gpt2cli.cli.options import (
    DATA,
    RUN,
    SPEED,
    ChatTemplateOption,
    CheckpointArgument,
    ConfigOption,
    DeviceOption,
    DtypeOption,
    FormatOption,
    JsonOption,
    LossOnOption,
    SectionSetting,
    TextFieldOption,
    overrides,
)
from gpt2cli.cli.output import print_json, progress_bar
from gpt2cli.settings.sections import DataSettings, EvalSettings
from gpt2cli.settings.types import Quantize, Task

_e = SectionSetting(EvalSettings, DATA)


def command(
    checkpoint: CheckpointArgument,
    data: Annotated[
        list[str],
        typer.Argument(
            metavar="DATA",
            help="Text, .jsonl, .parquet or .bin files, folders or quoted globs (lm); a HellaSwag-format .jsonl "
            "(hellaswag).",
            show_default=False,
        ),
    ],
    task: Annotated[Task | None, _e("task", RUN)] = None,
    context: Annotated[int | None, _e("context")] = None,
    stride: Annotated[int | None, _e("stride")] = None,
    max_tokens: Annotated[int | None, _e("max_tokens")] = None,
    batch_size: Annotated[int | None, _e("batch_size")] = None,
    limit: Annotated[int | None, _e("limit")] = None,
    text_field: TextFieldOption = None,
    data_format: FormatOption = None,
    loss_on: LossOnOption = None,
    chat_template: ChatTemplateOption = None,
    device: DeviceOption[EvalSettings] = None,
    dtype: DtypeOption[EvalSettings] = None,
    quantize: Annotated[Quantize | None, _e("quantize", SPEED)] = None,
    group_size: Annotated[int | None, _e("group_size", SPEED)] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Score a checkpoint: mean loss, perplexity, bits per byte and a 95% interval (lm), or accuracy (hellaswag).

    Windows of --context tokens start every --stride tokens; each token after the first is scored exactly once.
    --quantize int8|int4 scores the weights as `gpt2 sample --quantize` runs them: compare with `--quantize none`
    to see what quantization costs on your model.
    """
    from gpt2cli.settings.sections import load_settings

    # `data` here is the input files, not DataSettings' `paths`: text_field, format, loss_on and chat_template are
    # the data settings.
    settings = load_settings(
        config, overrides({**locals(), "format": data_format}, eval=EvalSettings, data=DataSettings)
    )
    run_evaluation(checkpoint, data, settings, json_output)


def run_evaluation(checkpoint: str, data: list[str], settings: Any, json_output: bool) -> None:
    from gpt2cli.cli.output import info
    from gpt2cli.data.encoding import EncodeOptions
    from gpt2cli.data.examples import EXAMPLE_FORMATS, data_format
    from gpt2cli.data.inputs import resolve_inputs
    from gpt2cli.data.tokenizer import get_tokenizer
    from gpt2cli.errors import UsageError
    from gpt2cli.evaluation import (
        evaluate_examples,
        evaluate_lm,
        evaluate_multiple_choice,
        load_eval_examples,
        load_eval_tokens,
        read_multiple_choice,
    )
    from gpt2cli.generation.loading import load_inference_model
    from gpt2cli.runtime.devices import resolve_device, resolve_precision

    options = settings.eval
    device = resolve_device(options.device)
    precision = resolve_precision(options.dtype, device)
    # The weights as stored, computed under autocast in `precision`; scoring passes only, no decode loop.
    model, summary = load_inference_model(
        checkpoint, device, None, options.quantize, options.group_size, decode=False, on_summary=info
    )
    block = model.config.block_size
    context = options.context or block
    if context > block:
        raise UsageError(f"--context {context} is larger than the model's block size {block}")
    stride = options.stride or context
    if stride > context:
        raise UsageError(f"--stride {stride} must not exceed --context {context}")

    with progress_bar("scoring") as bar:
        advance = bar.update
        if options.task == "hellaswag":
            if len(data) != 1:
                raise UsageError("--task hellaswag takes one .jsonl file")
            examples = read_multiple_choice(data[0], options.limit)
            result = evaluate_multiple_choice(model, get_tokenizer(), examples, precision, advance).as_dict()
        else:
            paths = resolve_inputs(data)  # folders and globs of shards or Parquet files
            kind = data_format(paths, settings.data.format, settings.data.text_field)
            if kind in EXAMPLE_FORMATS:  # fine-tuning records: the loss on the completions or assistant turns
                examples = load_eval_examples(checkpoint, paths, kind, settings.data)
                result = evaluate_examples(model, examples, precision, context, options.batch_size, advance).as_dict()
                result.update(format=kind, loss_on=settings.data.loss_on, examples=len(examples))
            else:
                files = [str(path) for path in paths]
                text = load_eval_tokens(files, EncodeOptions.from_settings(settings.data), options.max_tokens)
                result = evaluate_lm(
                    model, text.streams, precision, context, stride, options.batch_size, text.text_bytes, advance
                ).as_dict()
    if options.quantize != "none":
        result["quantize"] = summary.as_dict()
    if json_output:
        print_json(result)
    else:
        label = precision.name + ("" if options.quantize == "none" else f", {summary.describe()}")
        _print_table(result, checkpoint, options.task, context, stride, label)


def _scored(result: dict[str, Any]) -> str:
    """What the loss is over, for fine-tuning records."""
    if "format" not in result or result["loss_on"] == "all":
        return ""
    return " (completions only)" if result["format"] == "prompt-completion" else " (assistant turns only)"


def _print_table(result: dict[str, Any], checkpoint: str, task: str, context: int, stride: int, dtype: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{checkpoint} · {task}", show_header=False, title_justify="left")
    if task == "hellaswag":
        rows = [
            ("acc", f"{result['acc']:.4f}"),
            ("acc_norm", f"{result['acc_norm']:.4f}"),
            ("examples", str(result["n"])),
        ]
    else:
        ci = result["ci95"]
        rows = [
            ("loss (nats/token)", f"{result['loss']:.4f}" + _scored(result)),
            ("perplexity", f"{result['perplexity']:.3f}" if math.isfinite(result["perplexity"]) else "inf"),
            ("bits per byte", f"{result['bits_per_byte']:.4f}" if result["bits_per_byte"] is not None else "-"),
            ("tokens scored", f"{result['tokens']:,}"),
            ("95% interval of the loss", f"{ci[0]:.4f} – {ci[1]:.4f}" if ci else "- (one window)"),
            ("windows", f"{result['windows']:,} (context {context}, stride {stride}, {dtype})"),
        ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
