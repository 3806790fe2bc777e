"""The root `gpt2` command: plugin discovery, `--version`, and the one place errors are rendered.

Command modules are loaded through the `gpt2cli.commands` entry-point group and must import
torch (and anything heavy) inside their functions, so `gpt2 --help` stays fast.
"""

from __future__ import annotations

import inspect
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from gpt2cli import __version__
from gpt2cli.cli.output import PROG, OutputClosed, warn
from gpt2cli.errors import Gpt2Error

PLUGIN_GROUP = "gpt2cli.commands"
EXIT_INTERRUPTED = 130


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"{PROG} {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """The root command: its options only; the subcommands do the work."""


ROOT_HELP = (
    "From raw text to a trained GPT-2, and from any GPT-2 checkpoint to samples, scores and speed numbers.\n\n"
    "Data goes to stdout; progress, logs and warnings to stderr. Exit codes: 0 success, 1 failure, "
    "2 invalid usage or settings, 130 interrupted. Set GPT2_DEBUG=1 for full tracebacks."
)


# The metavars click users know (`--lr FLOAT`), instead of Typer's `<float>`; flags that take no value show none.
_CONVENTIONAL_METAVARS = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH"}


def conventional_metavar(param: Any, ctx: Any) -> str:
    """`INTEGER`, `FLOAT`, `TEXT`, `PATH`, `[a|b|c]` for a choice, "" for an on/off flag."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    if param.metavar is not None and not isinstance(param, TyperArgument):  # an argument's metavar is its name
        return param.metavar  # set on purpose (e.g. --device's kinds)
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None:  # a Typer that still uses click's types
        return param.type.name.upper()
    if descriptor.choices is not None:
        return "[" + "|".join(str(choice) for choice in descriptor.choices) + "]"
    annotation = descriptor.annotation
    element = get_args(annotation)[0] if descriptor.is_list and get_args(annotation) else annotation
    if descriptor.is_path:
        return "PATH"
    return _CONVENTIONAL_METAVARS.get(element, param.display_type(ctx))


class _ConventionalMetavars:
    """Mixed into the root group and every command: each parameter shows a conventional metavar in `--help`."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            label = conventional_metavar(param, ctx)
            if isinstance(param, TyperArgument):  # an argument's metavar is its name: replace only the type shown
                param.display_type_rich = lambda ctx, label=label: label
            else:
                param.metavar = label
        return params


class Command(_ConventionalMetavars, TyperCommand):
    pass


class Group(_ConventionalMetavars, TyperGroup):
    pass


def reflow(docstring: str | None) -> str | None:
    """A docstring whose paragraphs Rich wraps to the terminal: line breaks inside a paragraph are dropped.

    Paragraphs with indented lines (examples) keep their lines as written.
    """
    if docstring is None:
        return None
    paragraphs = inspect.cleandoc(docstring).split("\n\n")
    return "\n\n".join(
        paragraph if any(line.startswith(" ") for line in paragraph.splitlines()) else " ".join(paragraph.split("\n"))
        for paragraph in paragraphs
    )


def _register(app: typer.Typer, name: str, command: Any) -> None:
    if isinstance(command, typer.Typer):
        app.add_typer(command, name=name)
    elif callable(command):
        app.command(name=name, help=reflow(command.__doc__), cls=Command)(command)
    else:
        raise TypeError(f"entry point must be a function or a typer.Typer, got {type(command).__name__}")


def build_app(only: str | None = None) -> typer.Typer:
    """The root app with every installed command (or just `only`); a broken plugin is skipped with one warning."""
    app = typer.Typer(
        name=PROG,
        cls=Group,
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback(help=ROOT_HELP)(_root)
    commands = sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name)
    if only is not None and any(ep.name == only for ep in commands):
        commands = [ep for ep in commands if ep.name == only]  # importing the other commands is wasted start-up
    for entry_point in commands:
        try:
            _register(app, entry_point.name, entry_point.load())
        except Exception as error:  # a third-party plugin can fail in any way; the rest must still work
            warn(f"command {entry_point.name!r} ({entry_point.value}) failed to load: {type(error).__name__}: {error}")
    return app


def _fail(message: str, code: int) -> int:
    for line in message.splitlines() or [""]:
        print(f"{PROG}: error: {line}", file=sys.stderr)
    return code


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _command_line_error_types() -> tuple[type[BaseException], ...]:
    """Typer's parse errors: its own (typer >= 0.20 vendors click) and click's (older typer)."""
    types: list[type[BaseException]] = []
    if hasattr(typer, "TyperException"):
        types.append(typer.TyperException)
    try:
        import click

        types.append(click.ClickException)
    except ImportError:
        pass
    return tuple(types)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (errors rendered on stderr)."""
    debug = os.environ.get("GPT2_DEBUG", "") not in ("", "0")
    args = sys.argv[1:] if argv is None else argv
    requested = args[0] if args and not args[0].startswith("-") else None
    command = typer.main.get_command(build_app(only=requested))
    try:
        result = command.main(args=args, prog_name=PROG, standalone_mode=False)
        return result if isinstance(result, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OutputClosed, BrokenPipeError):
        _silence_stdout()  # the reader went away (`| head`): not an error
        return 0
    except Gpt2Error as error:
        if debug:
            raise
        return _fail(str(error), error.exit_code)
    except Exception as error:
        if debug:
            raise
        if isinstance(error, _command_line_error_types()):
            return _render_command_line_error(error)
        if type(error).__name__ == "Abort":  # typer's / click's Ctrl-C at a prompt
            print(f"{PROG}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        return _fail(f"{type(error).__name__}: {error} (set GPT2_DEBUG=1 for the traceback)", 1)


def _render_command_line_error(error: Any) -> int:
    ctx = getattr(error, "ctx", None)
    if type(error).__name__ == "NoArgsIsHelpError":  # a bare `gpt2`: show what is available
        help_text = ctx.get_help() if ctx else ""  # Rich help prints itself and returns ""
        if help_text:
            print(help_text)
        return 2
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    message = error.format_message().replace("Value error, ", "")  # Typer's wording for a choice not offered
    return _fail(f"{message}{hint}", getattr(error, "exit_code", 2))


def main() -> None:
    sys.exit(run())
