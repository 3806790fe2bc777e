"""`gpt2 plot` on real short runs and real bench files: PNG/SVG/PDF/HTML and terminal charts, and bad input."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from conftest import cli_env, run_cli, write_corpus
from gpt2cli.cli.loss_chart import LossChart
from gpt2cli.observe.curves import METRICS, downsample, moving_average, step_sparkline
from gpt2cli.observe.metrics import read_metrics
from gpt2cli.settings.sections import load_settings
from gpt2cli.settings.types import PlotMetric

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4"]
SHORT = [*TINY, "--device", "cpu", "--dtype", "float32", "--log-interval", "1", "--eval-interval", "3"]
SHORT += ["--eval-tokens", "256"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two real 6-step runs with different learning rates."""
    folder = tmp_path_factory.mktemp("runs")
    corpus = write_corpus(folder)
    env = cli_env(GPT2_DATA__CACHE_DIR=str(folder / "cache"))
    made = []
    for name, lr in (("lr-high", "3e-3"), ("lr-low", "1e-4")):
        out = folder / name
        result = run_cli("train", corpus, *SHORT, "--max-steps", "6", "--lr", lr, "--out", out, env=env)
        assert result.returncode == 0, result.stderr.decode()
        made.append(out)
    return made


def plot(*args) -> tuple[int, str, str]:
    """`gpt2 plot ARGS`: exit code, stdout, stderr."""
    result = run_cli("plot", *args)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def html_points(page: str) -> dict[tuple[str, str], list[list[float]]]:
    data = re.search(r'<script type="application/json" id="gpt2-plot-data">(.*?)</script>', page, re.S)
    assert data is not None
    return {(s["run"], s["metric"]): s["points"] for s in json.loads(data.group(1))["series"]}


def test_png_svg_pdf_from_two_runs(runs, tmp_path):
    for suffix, header in ((".png", b"\x89PNG\r\n\x1a\n"), (".svg", b"<?xml"), (".pdf", b"%PDF-")):
        out = tmp_path / f"curves{suffix}"
        code, _, err = plot(*runs, "-o", out)
        assert code == 0, err
        assert out.read_bytes().startswith(header) and out.stat().st_size > 1000
        assert f"wrote {out} (2 run(s), 4 line(s))" in err
    assert b"lr-high" in (tmp_path / "curves.svg").read_bytes()  # the legend names the runs (text as paths: in ids)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_html_holds_both_runs_points_and_needs_no_network(runs, tmp_path):
    out = tmp_path / "curves.html"
    code, _, err = plot(*runs, "-o", out, "--metric", "loss,val_loss,lr")
    assert code == 0, err
    page = out.read_text()
    points = html_points(page)
    for run in runs:
        logged = records(run)
        assert points[(run.name, "loss")] == [[r["step"], r["loss"]] for r in logged]
        assert points[(run.name, "val_loss")] == [[r["step"], r["val_loss"]] for r in logged if "val_loss" in r]
        assert points[(run.name, "lr")] == [[r["step"], r["lr"]] for r in logged]
    assert "<svg" in page and not re.search(r"(src|href)=\"https?:", page)  # self-contained


def test_x_axis_and_smoothing_change_the_points(runs, tmp_path):
    out = tmp_path / "curves.html"
    assert plot(runs[0], "-o", out, "--x", "tokens", "--smooth", "3", "--metric", "loss")[0] == 0
    logged = records(runs[0])
    losses = np.array([r["loss"] for r in logged])
    expected = [[r["tokens"], pytest.approx(v)] for r, v in zip(logged, moving_average(losses, 3), strict=True)]
    assert html_points(out.read_text())[(runs[0].name, "loss")] == expected
    assert expected[2][1] == pytest.approx(losses[:3].mean())


def test_terminal_plot_renders_to_the_requested_width(runs):
    code, out, err = plot(*runs, "--width", "72", "--height", "14")
    assert code == 0, err
    lines = out.rstrip("\n").splitlines()
    assert len(lines) >= 10 and {len(line) for line in lines} == {72}
    assert "\x1b[" not in out  # stdout is not a terminal here: plain text
    assert "lr-high" in out and "lr-low (val)" in out and "step" in out


def test_bench_files_as_grouped_bars(tmp_path):
    result = run_cli(
        "bench",
        *TINY[:8],
        "--device",
        "cpu",
        "--tests",
        "train,tg4",
        "--batch-size",
        "1,2",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--json",
    )
    assert result.returncode == 0, result.stderr.decode()
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    before.write_bytes(result.stdout)
    document = json.loads(result.stdout)
    for row in document["results"]:
        row["tokens_per_s"] *= 2
    after.write_text(json.dumps(document))
    out = tmp_path / "bench.html"
    code, _, err = plot(before, after, "-o", out)
    assert code == 0, err
    bars = json.loads(re.search(r'id="gpt2-plot-data">(.*?)</script>', out.read_text(), re.S).group(1))["bars"]
    assert {(b["test"], b["file"], b["case"]) for b in bars} == {
        (test, file, f"batch {batch}") for test in ("train", "tg4") for file in ("before", "after") for batch in (1, 2)
    }
    speed = {(b["test"], b["file"], b["case"]): b["tokens_per_s"] for b in bars}
    assert speed[("tg4", "after", "batch 2")] == pytest.approx(2 * speed[("tg4", "before", "batch 2")])
    assert plot(before, after, "-o", tmp_path / "bench.png")[0] == 0
    code, text, _ = plot(before, after, "--width", "80")
    assert code == 0 and "train: tokens/s" in text and {len(line) for line in text.splitlines()} == {80}


# ---------------------------------------------------------------- reading runs that are still being written


def test_half_written_last_line_is_normal_and_a_corrupt_middle_line_is_skipped_once(runs, tmp_path):
    run_folder = tmp_path / "live"
    shutil.copytree(runs[0], run_folder)
    lines = (run_folder / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # step 3 cut in the middle of the file
    (run_folder / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "loss": 4.')  # still being written
    out = tmp_path / "live.html"
    code, _, err = plot(run_folder, "-o", out)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == [f"gpt2: warning: {run_folder / 'metrics.jsonl'}: skipped 1 unreadable line (line 3)"]
    steps = [step for step, _ in html_points(out.read_text())[("live", "loss")]]
    assert steps == [1, 2, 4, 5, 6]


def test_a_whole_last_line_without_newline_counts(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}')
    log = read_metrics(path)
    assert [r["step"] for r in log.records] == [1, 2] and log.warning() is None


# ---------------------------------------------------------------- bad input


def test_folder_without_metrics_is_a_usage_error(tmp_path):
    code, _, err = plot(tmp_path)
    assert code == 2 and err == f"gpt2: error: {tmp_path}: no metrics.jsonl in this folder (is it a run folder?)\n"


def test_unknown_metric_is_a_usage_error(runs):
    code, _, err = plot(runs[0], "--metric", "loss,perplexity")
    assert code == 2 and err.startswith("gpt2: error: plot.metrics.1: Input should be 'loss', 'val_loss'")


def test_unwritable_output_is_refused_before_drawing(runs, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    (tmp_path / "taken.png").mkdir()
    for target, message in (
        (blocker / "curves.png", f"no such folder {blocker}"),
        (tmp_path / "missing" / "curves.png", "no such folder"),
        (tmp_path / "taken.png", "is a folder"),
        (tmp_path / "curves.gif", "unknown format 'gif'"),
    ):
        code, _, err = plot(runs[0], "-o", target)
        assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize(("module", "args"), [("matplotlib", ["-o", "x.png"]), ("plotext", [])])
def test_missing_plot_extra_names_the_install(runs, module, args, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    code, _, err = plot(runs[0], *args)
    assert code == 2 and "pip install 'gpt2cli[plot]'" in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- the pieces


def test_downsampling_keeps_every_extreme_and_both_ends():
    x = np.arange(100_000, dtype=float)
    y = np.sin(x / 700) + np.where(x == 54_321, 5.0, 0.0)  # one spike
    xs, ys = downsample(x, y, 2000)
    assert len(xs) <= 2002 and xs[0] == 0 and xs[-1] == 99_999 and np.all(np.diff(xs) > 0)
    assert ys.max() == y.max() and ys.min() == y.min() and 54_321 in xs
    short = x[:50]
    assert downsample(short, y[:50], 2000)[0] is short  # short series are left alone


def test_plot_metric_names_match_the_curves_table():
    assert set(get_args(PlotMetric)) == set(METRICS)


def test_plot_settings_from_environment(monkeypatch):
    monkeypatch.setenv("GPT2_PLOT__METRICS", "loss,lr")
    monkeypatch.setenv("GPT2_TRAIN__LOG_TO", "tensorboard,wandb")
    settings = load_settings()
    assert settings.plot.metrics == ["loss", "lr"] and settings.train.log_to == ["tensorboard", "wandb"]


def test_step_sparklines_line_up_train_and_validation():
    assert step_sparkline(list(range(8)), [1, 2, 3, 4, 5, 6, 7, 8], 0, 7, 8, 1.0, 8.0) == "▁▂▃▄▅▆▇█"
    assert step_sparkline(list(range(100)), list(range(100)), 0, 99, 10, 4.5, 94.5) == "▁▂▃▃▄▅▆▆▇█"  # column means
    assert step_sparkline([0, 1], [5.0, 5.0], 0, 1, 4, 0.0, 10.0) == "▅▅"
    assert step_sparkline([], [], 0, 10, 10, 0.0, 1.0) == ""
    assert step_sparkline([50, 100], [8.0, 6.0], 10, 100, 10, 5.0, 10.0) == "    ▅    ▂"
    chart = LossChart(width=10)
    for step in range(10, 110, 10):
        validation = {"val_loss": 10.0 - step / 25} if step % 50 == 0 else {}
        chart.add({"step": step, "loss": 11.0 - step / 20, **validation})
    train, val = chart.render().splitlines()
    assert train == "train █▇▆▆▅▄▃▃▂▁  6.0000 (min 6.0000)"  # one scale: 6.0 (▁) to 10.5 (█)
    assert val == "val       ▄    ▁  6.0000 (min 6.0000)"  # steps 50 and 100, under theirs
    assert chart.renders == 1 and chart.render_seconds > 0
