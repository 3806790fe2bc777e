"""`gpt2 sample`: generate text from any GPT-2 checkpoint, streamed to stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from gpt2cli.cli.options import (
    DATA,
    OUTPUT,
    SPEED,
    CheckpointArgument,
    CompileOption,
    ConfigOption,
    DeviceOption,
    DtypeOption,
    SectionSetting,
    SeedOption,
    overrides,
)
from gpt2cli.cli.output import info, write_stdout
from gpt2cli.settings.sections import SampleSettings
from gpt2cli.settings.types import Quantize

DECODING = "Decoding"
_s = SectionSetting(SampleSettings, DECODING)


def command(
    checkpoint: CheckpointArgument,
    prompt: Annotated[
        str | None,
        typer.Option(
            help="The prompt text (none: start from <|endoftext|>).", show_default=False, rich_help_panel=DATA
        ),
    ] = None,
    prompt_file: Annotated[
        str | None,
        typer.Option(help="Read the prompt from this file (- for stdin).", show_default=False, rich_help_panel=DATA),
    ] = None,
    prompts_file: Annotated[
        str | None,
        typer.Option(
            help="One prompt per line (- for stdin); prompts are generated in batches.",
            show_default=False,
            rich_help_panel=DATA,
        ),
    ] = None,
    max_new_tokens: Annotated[int | None, _s("max_new_tokens")] = None,
    temperature: Annotated[float | None, _s("temperature")] = None,
    top_k: Annotated[int | None, _s("top_k")] = None,
    top_p: Annotated[float | None, _s("top_p")] = None,
    min_p: Annotated[float | None, _s("min_p")] = None,
    repetition_penalty: Annotated[float | None, _s("repetition_penalty")] = None,
    num_samples: Annotated[int | None, _s("num_samples")] = None,
    stop: Annotated[list[str] | None, _s("stop")] = None,
    ignore_eot: Annotated[bool | None, _s("ignore_eot", DECODING, "--ignore-eot/--stop-at-eot")] = None,
    prompt_lookup: Annotated[int | None, _s("prompt_lookup", SPEED, "--prompt-lookup", metavar="N")] = None,
    device: DeviceOption[SampleSettings] = None,
    dtype: DtypeOption[SampleSettings] = None,
    quantize: Annotated[Quantize | None, _s("quantize", SPEED)] = None,
    group_size: Annotated[int | None, _s("group_size", SPEED)] = None,
    compile: CompileOption[SampleSettings] = None,
    seed: SeedOption[SampleSettings] = None,
    config: ConfigOption = None,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="One JSON object per sample, one per line, on stdout.", rich_help_panel=OUTPUT),
    ] = False,
) -> None:
    """Generate text from a GPT-2 checkpoint: streamed to stdout as it is produced, timings on stderr.

    Prints the completion only (not the prompt). It stops at <|endoftext|> unless --ignore-eot, and just before any
    --stop text. Prompts longer than the context are cut from the left (with a warning); generation past the
    context re-encodes the last half of it and goes on.
    """
    from gpt2cli.settings.sections import load_settings

    settings = load_settings(config, overrides(locals(), sample=SampleSettings)).sample
    prompts = _read_prompts(prompt, prompt_file, prompts_file)
    run_sampling(checkpoint, prompts, settings, json_output)


def _read_text(name: str) -> str:
    from gpt2cli.errors import UsageError

    if name == "-":
        return sys.stdin.read()
    path = Path(name)
    if not path.is_file():
        raise UsageError(f"{name}: no such file")
    return path.read_text(encoding="utf-8", errors="replace")


def _read_prompts(prompt: str | None, prompt_file: str | None, prompts_file: str | None) -> list[str]:
    from gpt2cli.errors import UsageError

    if sum(option is not None for option in (prompt, prompt_file, prompts_file)) > 1:
        raise UsageError("give only one of --prompt, --prompt-file, --prompts-file")
    if prompt_file is not None:
        return [_read_text(prompt_file)]
    if prompts_file is not None:
        prompts = _read_text(prompts_file).splitlines()
        if not prompts:
            raise UsageError(f"{prompts_file}: no prompts in it")
        return prompts
    return [prompt or ""]


def run_sampling(checkpoint: str, prompts: list[str], settings: Any, json_output: bool) -> None:
    import torch

    from gpt2cli.data.tokenizer import get_tokenizer
    from gpt2cli.generation.drafting import PromptLookup
    from gpt2cli.generation.generator import TextGenerator
    from gpt2cli.generation.loading import load_generation_model
    from gpt2cli.generation.records import SamplingOptions, Timing

    model = load_generation_model(checkpoint, settings, info)
    text_generator = TextGenerator(
        model,
        get_tokenizer(),
        compile=settings.compile,
        drafting=None if settings.prompt_lookup is None else PromptLookup(settings.prompt_lookup),
    )
    options = SamplingOptions.from_settings(settings)
    rng = None if settings.seed is None else torch.Generator(text_generator.device).manual_seed(settings.seed)

    encoded = []
    for text in prompts:
        ids, cut = text_generator.prepare_prompt(text)
        if cut:
            info(
                f"warning: the prompt was cut from the left to the last {len(ids)} tokens (the context is "
                f"{model.config.block_size})"
            )
        encoded.append(ids)

    streaming = not json_output and len(encoded) == 1 and settings.num_samples == 1
    on_text = (lambda row, piece: write_stdout([piece])) if streaming else None
    timing = Timing()
    first_output, generated = True, 0
    for index, completion, batch_timing in text_generator.generate_grouped(
        encoded, options, settings.num_samples, rng, on_text, timing
    ):
        generated += len(completion.token_ids)
        if json_output:
            record = {
                "prompt": prompts[index],
                "completion": completion.text,
                "token_ids": completion.token_ids,
                "finish_reason": completion.finish_reason,
                "tokens_per_s": round(batch_timing.decode_tokens_per_s, 2),
                "compile_s": round(batch_timing.warmup_s, 3),  # before the decode clock: not in tokens_per_s
            }
            if settings.prompt_lookup is not None:  # the batch's draft statistics
                record.update(_lookup_summary(batch_timing))
            write_stdout([json.dumps(record) + "\n"])
        elif streaming:
            write_stdout(["" if completion.text.endswith("\n") else "\n"])
        else:
            write_stdout([("" if first_output else "---\n") + completion.text + "\n"])
        first_output = False
    lookup = (
        ""
        if settings.prompt_lookup is None
        else f" | prompt lookup: {timing.accepted}/{timing.drafted} draft tokens accepted "
        f"({timing.acceptance_rate:.0%}), {timing.tokens_per_pass:.2f} tokens per pass"
    )
    info(
        f"generated {generated} tokens | prompt: {timing.prefill_tokens} tokens in {timing.prefill_s * 1000:.0f} ms "
        f"({timing.prefill_tokens_per_s:,.1f} tok/s), time to first token {timing.prefill_s * 1000:.0f} ms | "
        f"decode: {timing.decode_tokens} tokens in {timing.decode_s:.2f} s ({timing.decode_tokens_per_s:,.1f} tok/s)"
        + lookup
    )
    if timing.warmup_s:
        info(f"compile and warm-up: {timing.warmup_s:.2f} s before decoding (not counted in the decode rate)")


def _lookup_summary(timing: Any) -> dict[str, Any]:
    """Prompt lookup's numbers for `--json`."""
    return {
        "drafted_tokens": timing.drafted,
        "accepted_tokens": timing.accepted,
        "acceptance_rate": round(timing.acceptance_rate, 4),
        "tokens_per_pass": round(timing.tokens_per_pass, 4),
    }
