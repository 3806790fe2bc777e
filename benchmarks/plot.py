"""Time `gpt2 plot` on a generated 100,000-line metrics.jsonl, and the live loss chart's render against a step.

Targets (issue #16): the plot draws in under 2 s; the live chart's rendering takes under 1% of the step time.
Whole `gpt2 plot` processes (start-up included), wall clock and CPU time (user + system: on a shared, loaded
machine the wall clock also counts other people's work). The live chart: the mean time of `LossChart.render` and
of Rich rendering its text (what a Live refresh does), for a run's worth of history, per log event; then a real
short training run of the default model with the live display forced on, timing the display's log calls against
the steps.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def write_metrics(path: Path, lines: int) -> None:
    """A plausible long run: a decaying, noisy loss every step, validation every 250 steps."""
    rng = random.Random(0)
    with open(path, "w") as handle:
        for step in range(1, lines + 1):
            record = {
                "step": step,
                "loss": round(3.3 + 7.6 * math.exp(-step / 4000) + rng.gauss(0, 0.04), 6),
                "lr": 6e-4 * min(1.0, step / 700),
                "grad_norm": round(0.3 + rng.random() * 0.2, 6),
                "tokens": step * 524288,
                "tok_per_s": round(1.1e6 + rng.gauss(0, 1e4), 1),
                "mfu": 0.41,
                "elapsed_s": round(step * 0.47, 3),
            }
            if step % 250 == 0:
                record["val_loss"] = round(3.35 + 7.6 * math.exp(-step / 4000), 6)
            handle.write(json.dumps(record) + "\n")


def time_process(args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def time_plot(folder: Path, lines: int, reps: int) -> dict[str, dict[str, float]]:
    metrics = folder / "metrics.jsonl"
    write_metrics(metrics, lines)
    gpt2 = [sys.executable, "-m", "gpt2cli", "plot", str(metrics)]
    targets = {
        "png": ["-o", str(folder / "c.png")],
        "svg": ["-o", str(folder / "c.svg")],
        "html": ["-o", str(folder / "c.html")],
        "terminal": ["--width", "100"],
    }
    results = {}
    for name, extra in targets.items():
        time_process([*gpt2, *extra])  # warm-up: the page cache, Python's bytecode cache, matplotlib's font cache
        runs = [time_process([*gpt2, *extra]) for _ in range(reps)]
        results[name] = {
            "wall_s": statistics.median(wall for wall, _ in runs),
            "cpu_s": statistics.median(cpu for _, cpu in runs),
        }
        print(
            f"gpt2 plot ({name}): {results[name]['wall_s']:.2f} s wall, {results[name]['cpu_s']:.2f} s CPU",
            file=sys.stderr,
        )
    return results


def time_live_chart(points: int, log_interval: int, eval_every: int) -> dict[str, float]:
    """Mean seconds per log event: building the chart's text, and Rich rendering it (one Live refresh)."""
    from rich.console import Console
    from rich.text import Text

    from gpt2cli.cli.loss_chart import LossChart

    chart = LossChart()
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    for index in range(1, points + 1):
        step = index * log_interval
        record = {"step": step, "loss": 3.3 + 7.6 * math.exp(-step / 4000)}
        if step % eval_every == 0:
            record["val_loss"] = record["loss"] + 0.05
        chart.add(record)
    chart.render()
    chart.render_seconds, chart.renders = 0.0, 0
    refresh = 0.0
    for _ in range(50):
        text = chart.render()
        started = time.perf_counter()
        console.print(Text(text))
        refresh += time.perf_counter() - started
    return {"render_s": chart.render_seconds / chart.renders, "refresh_s": refresh / 50}


def time_live_training(steps: int, folder: Path) -> dict[str, float]:
    """The default run's model for `steps` steps with a log line every step (the chart's worst case), the Rich live
    display forced on (into a string): the time of the display's log calls and of the chart's renders in them,
    against the run's time per step."""
    from rich.console import Console

    import gpt2cli.cli.output as output
    import gpt2cli.cli.train_display as train_display
    from gpt2cli.cli.train import run_training_command

    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    output.stderr_console = lambda: console  # the display's Live draws here, as on a 120-column terminal
    timings = {"report_s": 0.0, "reports": 0}
    shown: list[Any] = []

    class OnATerminal(train_display.TrainingDisplay):
        def __init__(self) -> None:
            super().__init__()
            self.interactive = True
            shown.append(self)

        def report(self, event: str, payload: dict[str, Any]) -> None:
            started = time.perf_counter()
            super().report(event, payload)
            if event == "log":
                timings["report_s"] += time.perf_counter() - started
                timings["reports"] += 1

    train_display.TrainingDisplay = OnATerminal
    flags = {
        "train": {
            "max_steps": steps,
            "log_interval": 1,
            "eval_interval": 10,
            "eval_tokens": 4096,
            "save_interval": 10**6,
            "device": "cpu",
            "out": str(folder / "run"),
        }
    }
    started = time.perf_counter()
    run_training_command(None, flags, json_output=False)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    step_s = (records[-1]["elapsed_s"] - records[0]["elapsed_s"]) / (len(records) - 1)
    chart = shown[0].chart
    return {
        "steps": steps,
        "step_s": step_s,
        "log_call_s": timings["report_s"] / timings["reports"],
        "chart_render_s": chart.render_seconds / chart.renders,
        "log_call_share_of_step": timings["report_s"] / timings["reports"] / step_s,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=30, help="steps of the live-display run (0: skip)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        plot = time_plot(Path(folder), args.lines, args.reps)
    # The default run (600 steps, a log line every 10) and a long GPU run (100,000 steps, every 10).
    live = {f"{points} log lines": time_live_chart(points, 10, 250) for points in (60, 10_000)}
    for name, numbers in live.items():
        print(
            f"live chart, {name}: render {numbers['render_s'] * 1e3:.3f} ms, Rich refresh "
            f"{numbers['refresh_s'] * 1e3:.3f} ms",
            file=sys.stderr,
        )
    report = {"plot": plot, "live_chart": live, "cpu": os.cpu_count(), "python": sys.version.split()[0]}
    if args.train_steps:
        with tempfile.TemporaryDirectory() as folder:
            training = time_live_training(args.train_steps, Path(folder))
        print(
            f"live display in a {args.train_steps}-step default-model run, a log line every step: "
            f"{training['step_s'] * 1e3:.0f} ms per step, {training['log_call_s'] * 1e3:.3f} ms per display log "
            f"call ({training['log_call_share_of_step']:.3%} of a step), of which the chart "
            f"{training['chart_render_s'] * 1e3:.3f} ms",
            file=sys.stderr,
        )
        report["live_training"] = training
    print(json.dumps(report, indent=2) if args.json else json.dumps(report))


if __name__ == "__main__":
    main()
