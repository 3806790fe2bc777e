"""`gpt2 convert`: move GPT-2 checkpoints between gpt2cli, transformers, nanoGPT, llm.c and llama.cpp (GGUF)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gpt2cli.cli.options import JsonOption
from gpt2cli.cli.output import info, print_json
from gpt2cli.settings.types import StorageDtype


def command(
    source: Annotated[
        Path, typer.Argument(metavar="SRC", help="The checkpoint to read (format detected from its content).")
    ],
    destination: Annotated[
        Path,
        typer.Argument(
            metavar="DST", help="Where to write: .safetensors (ours), a folder (transformers), .bin (llm.c), .gguf."
        ),
    ],
    source_format: Annotated[
        str, typer.Option("--from", help="Source format: auto, native, hf, nanogpt or llmc.")
    ] = "auto",
    to: Annotated[
        str | None,
        typer.Option(help="Target format: native, hf, llmc or gguf (default: from DST's suffix).", show_default=False),
    ] = None,
    dtype: Annotated[
        StorageDtype | None, typer.Option(help="Store weights in this dtype (default: as read).", show_default=False)
    ] = None,
    quant: Annotated[str | None, typer.Option(help="GGUF only: q8_0 for 8-bit weights.", show_default=False)] = None,
    chat_template: Annotated[
        str | None,
        typer.Option(
            "--chat-template",
            metavar="FILE|default",
            help="Attach a chat template (Jinja, with {% generation %} marking replies) or the default one; "
            "without it, the template SRC carries goes along.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace DST if it exists.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Convert a GPT-2 checkpoint: ours ⇄ transformers, nanoGPT → ours, ours ⇄ llm.c, ours → GGUF (llama.cpp).

    A transformers folder gets config.json, generation_config.json, model.safetensors and the GPT-2 tokenizer files,
    so it loads offline with from_pretrained; a chat template goes into chat_template.jinja and
    tokenizer_config.json, and into the metadata of our own .safetensors files. nanoGPT pickles are read with
    torch.load(weights_only=True): anything but tensors and plain values is refused. Nothing is left at DST after
    an error.
    """
    from gpt2cli.errors import UsageError
    from gpt2cli.formats.conversion import convert
    from gpt2cli.runtime.devices import DTYPES

    if quant is not None and quant != "q8_0":
        raise UsageError(f"--quant {quant}: only q8_0 is supported")
    summary = convert(
        source, destination, source_format, to, DTYPES[dtype] if dtype else None, quant, force, chat_template
    )
    template = f", chat template {summary.chat_template}" if summary.chat_template else ""
    info(
        f"converted {summary.source_format} → {summary.target_format}: {summary.parameters / 1e6:.2f}M parameters, "
        f"{summary.dtype}, {summary.tensors} tensors, {summary.bytes / 2**20:.1f} MiB{template} → {summary.destination}"
    )
    if json_output:
        print_json(summary.as_dict())
