"""`gpt2 cache info|verify|clear`: the token cache (text tokenized once by `gpt2 train`, under `data.cache_dir`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from gpt2cli.cli.app import Command, Group
from gpt2cli.cli.options import DATA, ConfigOption, JsonOption, overrides, setting
from gpt2cli.cli.output import info, print_json, write_stdout
from gpt2cli.settings.sections import DataSettings

command = typer.Typer(
    name="cache",
    cls=Group,
    no_args_is_help=True,
    help="The token cache: text that `gpt2 train` tokenized once, kept by content under data.cache_dir.",
)

CacheDirOption = Annotated[str | None, setting(DataSettings, "cache_dir", "--cache-dir", panel=DATA)]


def _cache(config: Path | None, cache_dir: str | None) -> Any:
    from gpt2cli.data.token_cache import TokenCache
    from gpt2cli.runtime.files import default_cache_dir
    from gpt2cli.settings.sections import load_settings

    settings = load_settings(config, overrides({"cache_dir": cache_dir}, data=DataSettings)).data
    return TokenCache(Path(settings.cache_dir) if settings.cache_dir else default_cache_dir())


def _show(cache: Any, verify: bool, json_output: bool) -> list[Any]:
    reports = cache.report(verify=verify)
    if json_output:
        print_json(
            {
                "folder": str(cache.folder),
                "bytes": cache.size(),
                "entries": [report.as_dict() for report in reports],
            }
        )
    else:
        lines = [f"{r.name}  {r.bytes / 2**20:10.1f} MiB  {_count(r.tokens):>15} tokens  {r.status}\n" for r in reports]
        write_stdout(lines)
        info(f"{cache.folder}: {len(reports)} entries, {cache.size() / 2**20:.1f} MiB")
    return reports


def _count(tokens: int | None) -> str:
    return "?" if tokens is None else f"{tokens:,}"


@command.command("info", cls=Command)
def info_command(
    config: ConfigOption = None, cache_dir: CacheDirOption = None, json_output: JsonOption = False
) -> None:
    """The cache's folder, size and entries (size and header checked; `verify` checks the contents)."""
    _show(_cache(config, cache_dir), verify=False, json_output=json_output)


@command.command("verify", cls=Command)
def verify_command(
    config: ConfigOption = None, cache_dir: CacheDirOption = None, json_output: JsonOption = False
) -> None:
    """Check every entry against its checksum; a damaged one is removed (the next run tokenizes it again).

    Exits 1 when an entry was damaged."""
    from gpt2cli.cli.output import warn

    reports = _show(_cache(config, cache_dir), verify=True, json_output=json_output)
    damaged = [report for report in reports if report.status.startswith("damaged")]
    for report in damaged:
        warn(f"token cache entry {report.name} was {report.status}; removed, it is tokenized again when next needed")
    if damaged:
        raise typer.Exit(1)


@command.command("clear", cls=Command)
def clear_command(
    config: ConfigOption = None, cache_dir: CacheDirOption = None, json_output: JsonOption = False
) -> None:
    """Remove every entry."""
    cache = _cache(config, cache_dir)
    entries, size = cache.clear()
    if json_output:
        print_json({"folder": str(cache.folder), "removed_entries": entries, "removed_bytes": size})
    else:
        info(f"removed {entries} entries ({size / 2**20:.1f} MiB) from {cache.folder}")
