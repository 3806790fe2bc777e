"""Drawing the panels and bar charts of `curves`: in the terminal (plotext), as PNG/SVG/PDF (matplotlib's
Agg canvas, no display needed), or as one self-contained HTML file (the SVG inline, the data as JSON beside it).

Both libraries come from the optional `plot` extra and are imported only here, only when drawing.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt2cli.errors import Gpt2Error, UsageError
from gpt2cli.observe.curves import BarGroup, Panel
from gpt2cli.runtime.extras import import_extra
from gpt2cli.runtime.files import atomic_path

FILE_FORMATS = ("png", "svg", "pdf", "html")
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def output_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in FILE_FORMATS:
        raise UsageError(f"-o {path}: unknown format {suffix or '(none)'!r}; use .png, .svg, .pdf or .html")
    return suffix


# ---------------------------------------------------------------- terminal


def _plotext(rows: int, width: int, height: int) -> Any:
    """plotext (5.x: the 6.x series changed the whole API), cleared, with `rows` stacked charts in the given size."""
    plt = import_extra("plotext", "plot", "drawing in the terminal")
    if not hasattr(plt, "build"):
        raise UsageError("drawing in the terminal needs plotext 5: pip install 'gpt2cli[plot]'")
    plt.main()  # plotext keeps one global figure: select the whole of it, not the last subplot drawn, and clear it
    plt.clear_figure()
    plt.subplots(rows, 1)
    plt.plotsize(width, height)  # before a subplot is selected: the size of the whole figure
    return plt


def terminal_lines(panels: Sequence[Panel], width: int, height: int, log_y: bool = False, color: bool = True) -> str:
    """The panels stacked as text `width` columns wide and about `height` rows tall (plotext)."""
    plt = _plotext(len(panels), width, height)
    for row, panel in enumerate(panels, start=1):
        plt.subplot(row, 1)
        runs = list(dict.fromkeys(series.run for series in panel.series))
        for series in panel.series:
            plt.plot(
                series.x.tolist(),
                series.y.tolist(),
                label=series.label,
                color=_TERMINAL_COLORS[runs.index(series.run) % len(_TERMINAL_COLORS)],
                marker="dot" if series.metric == "val_loss" else "braille",
            )
        plt.ylabel(panel.ylabel)
        plt.xlabel(panel.xlabel)
        if log_y:
            plt.yscale("log")
    return _build(plt, color)


def terminal_bars(
    charts: dict[str, list[BarGroup]], width: int, height: int, log_y: bool = False, color: bool = True
) -> str:
    """One grouped bar chart per test: a group per file, a bar per case (plotext)."""
    plt = _plotext(len(charts), width, height)
    for row, (test, groups) in enumerate(charts.items(), start=1):
        plt.subplot(row, 1)
        cases = list(dict.fromkeys(label for group in groups for label, _, _ in group.bars))
        heights = [[_bar_height(group, case) for group in groups] for case in cases]
        plt.multiple_bar([group.name for group in groups], heights, labels=cases)
        plt.title(f"{test}: tokens/s")
        if log_y:
            plt.yscale("log")
    return _build(plt, color)


_TERMINAL_COLORS = ["blue+", "red+", "green+", "orange+", "magenta+", "cyan+"]


def _bar_height(group: BarGroup, case: str) -> float:
    return next((value for label, value, _ in group.bars if label == case), 0.0)


def _build(plt: Any, color: bool) -> str:
    text = plt.build()
    return text if color else _ANSI.sub("", text)


# ---------------------------------------------------------------- files


def _figure(rows: int, width_in: float, row_height_in: float) -> Any:
    """A matplotlib Figure on the Agg canvas, made without pyplot (no global state, no display backend)."""
    import_extra("matplotlib", "plot", "drawing to a file")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, row_height_in * rows), dpi=130, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _style(axes: Any) -> None:
    axes.grid(True, color="#e6e6e6", linewidth=0.8)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    axes.tick_params(labelsize=8, length=3)


def curves_figure(panels: Sequence[Panel], log_y: bool = False) -> Any:
    figure = _figure(len(panels), 6.4, 3.0)
    for axes, panel in zip(figure.subplots(len(panels), 1, squeeze=False)[:, 0], panels, strict=True):
        runs = list(dict.fromkeys(series.run for series in panel.series))
        for series in panel.series:
            # One run: train and validation in two colours; several: a colour per run, validation dashed.
            color = _PALETTE[(runs.index(series.run) + (series.alone and series.metric == "val_loss")) % len(_PALETTE)]
            if series.metric == "val_loss":  # few points: dashed with markers, so each evaluation shows
                axes.plot(
                    series.x,
                    series.y,
                    color=color,
                    linestyle="--",
                    marker="o",
                    markersize=3,
                    linewidth=1.3,
                    label=series.label,
                )
            else:
                axes.plot(series.x, series.y, color=color, linewidth=1.1, alpha=0.9, label=series.label)
        _style(axes)
        axes.set_xlabel(panel.xlabel, fontsize=9)
        axes.set_ylabel(panel.ylabel, fontsize=9)
        if log_y:
            axes.set_yscale("log")
        axes.legend(fontsize=8, frameon=False)
    return figure


def bars_figure(charts: dict[str, list[BarGroup]], log_y: bool = False) -> Any:
    figure = _figure(len(charts), 6.4, 2.8)
    for axes, (test, groups) in zip(figure.subplots(len(charts), 1, squeeze=False)[:, 0], charts.items(), strict=True):
        cases = list(dict.fromkeys(label for group in groups for label, _, _ in group.bars))
        width = 0.8 / max(1, len(cases))
        for index, case in enumerate(cases):
            xs, heights, errors = [], [], []
            for position, group in enumerate(groups):
                for label, value, std in group.bars:
                    if label == case:
                        xs.append(position + (index - (len(cases) - 1) / 2) * width)
                        heights.append(value)
                        errors.append(std)
            bars = axes.bar(
                xs,
                heights,
                width * 0.92,
                yerr=errors,
                capsize=2,
                label=case,
                color=_PALETTE[index % len(_PALETTE)],
                error_kw={"linewidth": 0.8},
            )
            axes.bar_label(bars, labels=[_short_number(value) for value in heights], fontsize=7, padding=2)
        axes.set_xticks(range(len(groups)), [group.name for group in groups], fontsize=8)
        axes.set_title(test, fontsize=9, loc="left")
        axes.set_ylabel("tokens/s", fontsize=9)
        _style(axes)
        axes.grid(False, axis="x")
        if log_y:
            axes.set_yscale("log")
        else:
            axes.set_ylim(0, axes.get_ylim()[1] * 1.2)  # room for the value labels and the legend above the bars
        axes.legend(fontsize=8, frameon=False, ncols=len(cases), loc="upper left")
    return figure


def _short_number(value: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def save_figure(figure: Any, path: Path, data: dict[str, Any]) -> None:
    """Write the figure as PNG/SVG/PDF, or as an HTML page holding the SVG and `data`; atomically."""
    fmt = output_format(path)
    try:
        with atomic_path(path) as temporary:
            if fmt == "html":
                temporary.write_text(_html_page(figure, path.stem, data), encoding="utf-8")
            else:
                figure.savefig(temporary, format=fmt, metadata=_metadata(fmt))
    except OSError as error:
        raise Gpt2Error(f"-o {path}: cannot write ({error.strerror or error})") from None


def _metadata(fmt: str) -> dict[str, Any] | None:
    # No creation dates in the files: the same runs give the same bytes (diffable docs pictures).
    return {"svg": {"Date": None}, "pdf": {"CreationDate": None}, "png": {"Software": None}}.get(fmt)


def _html_page(figure: Any, title: str, data: dict[str, Any]) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]  # drop the XML prolog: the SVG is inline
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}svg{max-width:100%;height:auto}</style>"
        f"</head><body><h3>{html.escape(title)}</h3>\n{svg}\n"
        f'<script type="application/json" id="gpt2-plot-data">{payload}</script>\n</body></html>\n'
    )


def curves_data(panels: Sequence[Panel]) -> dict[str, Any]:
    """The points drawn, for the HTML page: per run and metric, the x and y values (finite ones)."""
    return {
        "x": panels[0].xlabel,
        "series": [
            {"run": series.run, "metric": series.metric, "points": _finite_pairs(series.x, series.y)}
            for panel in panels
            for series in panel.series
        ],
    }


def bars_data(charts: dict[str, list[BarGroup]]) -> dict[str, Any]:
    return {
        "bars": [
            {"test": test, "file": group.name, "case": label, "tokens_per_s": value, "tokens_per_s_std": std}
            for test, groups in charts.items()
            for group in groups
            for label, value, std in group.bars
        ]
    }


def _finite_pairs(xs: Any, ys: Any) -> list[list[float]]:
    return [[float(x), float(y)] for x, y in zip(xs.tolist(), ys.tolist(), strict=True) if math.isfinite(y)]
