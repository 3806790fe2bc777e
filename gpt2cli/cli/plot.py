"""`gpt2 plot`: a run's curves (or several runs', to compare them) in the terminal or as PNG/SVG/PDF/HTML."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from gpt2cli.cli.options import OUTPUT, ConfigOption, SectionSetting, overrides
from gpt2cli.settings.sections import PlotSettings
from gpt2cli.settings.types import PlotX

_p = SectionSetting(PlotSettings, OUTPUT)


def command(
    runs: Annotated[
        list[str],
        typer.Argument(
            metavar="RUN",
            help="Run folders or metrics.jsonl files (one line per run), or gpt2 bench --json files (bars).",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Write .png, .svg, .pdf or .html instead of drawing in the terminal.",
            show_default=False,
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    metrics: Annotated[str | None, _p("metrics", OUTPUT, "--metric")] = None,
    x: Annotated[PlotX | None, _p("x", OUTPUT, "--x")] = None,
    smooth: Annotated[int | None, _p("smooth")] = None,
    log_y: Annotated[bool | None, _p("log_y", OUTPUT, "--log-y/--no-log-y")] = None,
    width: Annotated[int | None, _p("width")] = None,
    height: Annotated[int | None, _p("height")] = None,
    config: ConfigOption = None,
) -> None:
    """Draw training curves: loss and validation loss by default, one line per run, labelled by folder name.

    Reads runs that are still being written. Without -o the chart is drawn in the terminal (plotext); -o writes
    a picture (matplotlib) or one self-contained HTML file. Both need: pip install 'gpt2cli\\[plot]'. Long runs
    are downsampled to what a figure can show (each bucket keeps its lowest and highest point, so spikes stay).
    """
    from gpt2cli.settings.sections import load_settings

    settings = load_settings(config, overrides(locals(), plot=PlotSettings)).plot
    if output is not None and str(output) == "-":
        output = None
    if output is not None:
        _check_writable(output)
    paths = [Path(run) for run in runs]
    from gpt2cli.observe.curves import is_bench_file

    bench = [is_bench_file(path) for path in paths]
    if any(bench) and not all(bench):
        from gpt2cli.errors import UsageError

        raise UsageError("give either run folders / metrics files or gpt2 bench --json files, not both")
    if all(bench):
        _plot_bench(paths, settings, output)
    else:
        _plot_runs(paths, settings, output)


def _check_writable(output: Path) -> None:
    """Refuse a bad -o before reading and drawing anything."""
    from gpt2cli.errors import UsageError
    from gpt2cli.observe.plotting import output_format

    output_format(output)
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"-o {output}: no such folder {folder}")
    if output.is_dir():
        raise UsageError(f"-o {output}: is a folder")
    if not os.access(folder, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise UsageError(f"-o {output}: cannot write there (permission denied)")


def _plot_runs(paths: list[Path], settings: Any, output: Path | None) -> None:
    from gpt2cli.cli.output import warn
    from gpt2cli.observe.curves import DEFAULT_POINTS, build_panels
    from gpt2cli.observe.metrics import read_metrics

    logs = [read_metrics(path) for path in paths]
    for log in logs:
        if (message := log.warning()) is not None:
            warn(message)
    _unique_names(logs)
    if output is None:
        from gpt2cli.observe.plotting import terminal_lines

        width, height, color = _terminal_size(settings)
        panels = build_panels(logs, settings.metrics, settings.x, settings.smooth, max_points=4 * width)
        _draw_in_terminal(terminal_lines(panels, width, height * len(panels), settings.log_y, color))
        return
    from gpt2cli.observe.plotting import curves_data, curves_figure, save_figure

    panels = build_panels(logs, settings.metrics, settings.x, settings.smooth, max_points=DEFAULT_POINTS)
    save_figure(curves_figure(panels, settings.log_y), output, curves_data(panels))
    _wrote(output, f"{len(logs)} run(s), {sum(len(panel.series) for panel in panels)} line(s)")


def _plot_bench(paths: list[Path], settings: Any, output: Path | None) -> None:
    from gpt2cli.observe.curves import bench_groups, read_bench

    charts = bench_groups([read_bench(path) for path in paths])
    if output is None:
        from gpt2cli.observe.plotting import terminal_bars

        width, height, color = _terminal_size(settings)
        _draw_in_terminal(terminal_bars(charts, width, height * len(charts), settings.log_y, color))
        return
    from gpt2cli.observe.plotting import bars_data, bars_figure, save_figure

    save_figure(bars_figure(charts, settings.log_y), output, bars_data(charts))
    _wrote(output, f"{len(paths)} file(s), {len(charts)} test(s)")


def _unique_names(logs: list[Any]) -> None:
    """Runs in different parents can share a folder name: label those by their path instead."""
    names = [log.name for log in logs]
    for log in logs:
        if names.count(log.name) > 1:
            log.label = str(log.path.parent if log.path.name == "metrics.jsonl" else log.path)


def _terminal_size(settings: Any) -> tuple[int, int, bool]:
    """Width, height per chart, and whether to colour: a terminal's size, or 100 × 20 plain text into a pipe."""
    interactive = sys.stdout.isatty()
    columns, lines = shutil.get_terminal_size((100, 24)) if interactive else (100, 24)
    width = settings.width or columns
    height = settings.height or max(10, min(20, lines - 4))
    return width, height, interactive


def _draw_in_terminal(text: str) -> None:
    from gpt2cli.cli.output import write_stdout

    write_stdout([text.rstrip("\n") + "\n"])


def _wrote(output: Path, what: str) -> None:
    from gpt2cli.cli.output import info

    info(f"wrote {output} ({what})")
