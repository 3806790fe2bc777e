"""`gpt2 tokenize`: text to GPT-2 token ids, token shards or counts, and back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from gpt2cli.cli.options import DATA, OUTPUT, ConfigOption, JsonOption, TextFieldOption, overrides, setting
from gpt2cli.cli.output import info, print_json, progress_bar, write_stdout
from gpt2cli.errors import UsageError
from gpt2cli.settings.sections import DataSettings
from gpt2cli.settings.types import EncodingErrors


def command(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="INPUTS",
            help="Text files (one document each), .jsonl files (one document per line), .parquet files (one per "
            "row), folders or quoted globs of .parquet files, or - for stdin. "
            "With --decode: .bin shards or files of ids.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Write an llm.c token shard (.bin) instead of printing ids.",
            show_default=False,
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    decode: Annotated[
        bool,
        typer.Option("--decode", help="Turn ids (stdin, files) or .bin shards back into text.", rich_help_panel=OUTPUT),
    ] = False,
    count: Annotated[
        bool, typer.Option("--count", help="Print only the number of tokens.", rich_help_panel=OUTPUT)
    ] = False,
    text_field: TextFieldOption = None,
    workers: Annotated[int | None, setting(DataSettings, "workers", panel=DATA)] = None,
    shard_size: Annotated[int | None, setting(DataSettings, "shard_size", panel=OUTPUT)] = None,
    token_limit: Annotated[int | None, setting(DataSettings, "token_limit", "--max-tokens", panel=OUTPUT)] = None,
    val_tokens: Annotated[int | None, setting(DataSettings, "val_tokens", panel=OUTPUT)] = None,
    errors: Annotated[EncodingErrors | None, setting(DataSettings, "errors", panel=DATA)] = None,
    special: Annotated[
        bool | None, setting(DataSettings, "allow_special", "--special/--no-special", panel=DATA)
    ] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Encode text with GPT-2's tokenizer: ids on stdout, a token shard with -o, or a count.

    Examples:
      printf 'Hello world' | gpt2 tokenize          # 15496 995
      gpt2 tokenize corpus.txt -o corpus.bin        # an llm.c token shard
      gpt2 tokenize corpus.bin --decode | head      # back to text
      gpt2 tokenize 'fineweb/*.parquet' -o fw.bin --shard-size 100000000 --val-tokens 100000000
    """
    from gpt2cli.data.encoding import EncodeOptions, check_sources
    from gpt2cli.data.tokenize_jobs import count_tokens, decode_sources, ids_as_lines, tokenize_to_shards
    from gpt2cli.settings.sections import load_settings

    flags = overrides({**locals(), "allow_special": special}, data=DataSettings)
    settings = load_settings(config, flags).data
    names = inputs or ["-"]
    to_stdout = output is None or str(output) == "-"
    if sum((decode, count)) > 1:
        raise UsageError("--decode and --count cannot be combined")
    if (decode or count) and not to_stdout:
        raise UsageError("-o writes token shards; it does not go with --decode or --count")
    if json_output and to_stdout and not count:
        raise UsageError("--json reports --count or -o results; ids are already machine-readable")
    if to_stdout and (settings.token_limit or settings.val_tokens):
        raise UsageError("--max-tokens and --val-tokens cut token shards: give -o OUT.bin")

    if decode:
        check_sources(names)
        write_stdout(decode_sources(names))
        return
    sources = check_sources(_expand(names))

    options = EncodeOptions.from_settings(settings)
    total = sum(size for source in sources if (size := source.size()) is not None) or None
    started = time.perf_counter()
    with progress_bar("tokenizing", total, unit="bytes") as bar:
        advance = bar.advance
        if count:
            summary = count_tokens(sources, options, settings.workers, advance)
        elif to_stdout:
            write_stdout(ids_as_lines(sources, options, settings.workers, advance))
            return
        else:
            assert output is not None
            summary = tokenize_to_shards(
                sources,
                output,
                options,
                settings.shard_size,
                settings.workers,
                advance,
                max_tokens=settings.token_limit,
                val_tokens=settings.val_tokens,
            )
    seconds = time.perf_counter() - started

    result = {
        "tokens": summary.tokens,
        "documents": summary.documents,
        "bytes": summary.bytes,
        "seconds": round(seconds, 3),
        "null_rows": summary.null_rows,
    }
    if summary.null_rows:
        info(f"skipped {summary.null_rows:,} null row" + ("s" if summary.null_rows != 1 else "") + " (no text)")
    if summary.shards:
        result["shards"] = [str(path) for path in summary.shards]
        result["shard_tokens"] = summary.shard_tokens
        where = summary.shards[0] if len(summary.shards) == 1 else f"{len(summary.shards)} shards ({output} …)"
        documents = f"{summary.documents:,} document" + ("s" if summary.documents != 1 else "")
        info(f"wrote {summary.tokens:,} tokens from {documents} to {where} in {seconds:.2f} s")
    if json_output:
        print_json(result)
    elif count:
        write_stdout([f"{summary.tokens}\n"])


def _expand(names: list[str]) -> list[str]:
    """Folders and quoted globs of .parquet files, as files; other names (and - for stdin) as given."""
    from gpt2cli.data.inputs import resolve_inputs
    from gpt2cli.data.parquet import PARQUET_SUFFIX

    expanded = []
    for name in names:
        if name == "-" or Path(name).is_file():
            expanded.append(name)
        else:
            expanded.extend(str(path) for path in resolve_inputs([name], folder_suffixes=(PARQUET_SUFFIX,)))
    return expanded
