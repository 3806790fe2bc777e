"""What `gpt2 train` shows on stderr: the settings, a live progress line (plain log lines when not a terminal),
and the summary table at the end."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from gpt2cli.cli.loss_chart import LossChart
from gpt2cli.cli.output import info

if TYPE_CHECKING:
    from gpt2cli.training.trainer import TrainingSummary

SAMPLE_PROMPT = "ROMEO:"


TRAINING_SECTIONS = ("model", "data", "train")  # the other sections do not change a training run


def _print_settings(settings: dict[str, dict[str, Any]]) -> None:
    for section in TRAINING_SECTIONS:
        values = settings.get(section, {})
        shown = " ".join(f"{key}={value}" for key, value in values.items() if value not in (None, []))
        info(f"{section}: {shown}")


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return (
        f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


class TrainingDisplay:
    """A live line and loss chart on a terminal (Rich), plain log lines otherwise; both on stderr. `report` is the
    run's callback (`training.run`): it receives the events and payloads the core sends."""

    def __init__(self) -> None:
        self.data_line = ""  # shown with the settings once the run is under way (errors come alone)
        self.interactive = sys.stderr.isatty()
        self.live: Any = None
        self.chart: LossChart | None = None
        self.started_step = 0

    def report(self, event: str, payload: dict[str, Any]) -> None:
        if event == "data":
            self.data_line = _data_line(payload)
        elif event == "warning":
            from gpt2cli.cli.app import warn

            warn(payload["message"])
        elif event == "start":
            _print_settings(payload["settings"])
            info(self.data_line)
            self.started_step = payload["resumed_at"]
            plan = payload["plan"]
            resumed = f", resuming at step {payload['resumed_at']}" if payload["resumed_at"] else ""
            trainable = payload.get("trainable_parameters", payload["parameters"])
            adapters = f" ({trainable / 1e6:.2f}M trained: LoRA adapters)" if trainable != payload["parameters"] else ""
            info(
                f"model: {payload['parameters'] / 1e6:.2f}M parameters{adapters} on {payload['device']} "
                f"({payload['dtype']}"
                f"{', compiled' if payload['compile'] else ''}); {plan['total_steps']} steps of "
                f"{plan['tokens_per_step']:,} tokens (batch {plan['batch_size']} × {plan['seq_len']}"
                f" × {plan['grad_accum']} accumulation){resumed}; run folder {payload['out']}"
            )
            if self.interactive:
                from rich.live import Live

                from gpt2cli.cli.output import stderr_console

                console = stderr_console()
                # The sparklines beside their latest values ("train ▇▅▃▂  4.8123 (min 4.7990)") fit the terminal.
                self.chart = LossChart(width=max(10, min(60, console.width - 32)))
                if payload["resumed_at"]:
                    self.chart.add_history(payload["out"])
                self.live = Live("", console=console, transient=True, refresh_per_second=4)
                self.live.start()
        elif event == "notice":
            info(payload["message"])
        elif event == "log":
            line = self._line(payload)
            if self.live is not None and self.chart is not None:
                from rich.text import Text

                self.chart.add(payload)
                self.live.update(Text(f"{line}\n{self.chart.render()}"))
                if "val_loss" in payload or "hellaswag_acc" in payload:  # evaluation lines stay on screen
                    self.live.console.print(line, highlight=False)
            else:
                info(line)

    def _line(self, payload: dict[str, Any]) -> str:
        step, total = payload["step"], payload["total_steps"]
        done = step - self.started_step
        eta = payload["elapsed_s"] / max(done, 1) * (total - step) if done else 0.0
        parts = [
            f"step {step}/{total}",
            f"loss {payload['loss']:.4f}",
            f"val {payload['val_loss']:.4f}" if "val_loss" in payload else None,
            f"hellaswag {payload['hellaswag_acc_norm']:.4f}" if "hellaswag_acc_norm" in payload else None,
            f"lr {payload['lr']:.2e}",
            f"{payload['tok_per_s']:,.0f} tok/s",
            f"MFU {payload['mfu'] * 100:.1f}%" if payload.get("mfu") is not None else None,
            f"{_format_duration(payload['elapsed_s'])} elapsed",
            f"ETA {_format_duration(eta)}",
        ]
        return " | ".join(part for part in parts if part)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _data_line(payload: dict[str, Any]) -> str:
    source = "the bundled Shakespeare corpus" if payload["bundled"] else f"{payload['sources']} source(s)"
    processes = f", {payload['processes']} processes" if payload["processes"] > 1 else ""
    return (
        f"tokens: {payload['train_tokens']:,} for training, {payload['val_tokens']:,} for validation, from {source} "
        f"({payload['load_s']:.1f} s){processes}"
    )


def print_summary(summary: TrainingSummary) -> None:
    from rich.table import Table

    from gpt2cli.cli.output import stderr_console

    table = Table(title="training finished", show_header=False, title_justify="left")
    rows = [
        ("steps", f"{summary.steps:,}"),
        ("tokens", f"{summary.tokens:,}"),
        ("wall time", _format_duration(summary.elapsed_s)),
        ("final train loss", f"{summary.train_loss:.4f}" if summary.train_loss is not None else "-"),
        ("final val loss", f"{summary.val_loss:.4f}" if summary.val_loss is not None else "-"),
        *(
            [("final HellaSwag acc_norm", f"{summary.hellaswag_acc_norm:.4f}")]
            if summary.hellaswag_acc_norm is not None
            else []
        ),
        *(
            [("best val loss", f"{summary.best_val_loss:.4f} at step {summary.best_step:,}")]
            if summary.best_val_loss is not None and summary.best_step is not None
            else []
        ),
        *([("stopped early", f"at step {summary.steps:,} (--early-stop)")] if summary.stopped_early else []),
        ("mean tokens/s", f"{summary.tokens_per_s:,.0f}"),
        ("weights", str(summary.model)),
        *([("best weights", str(summary.best / "model.safetensors"))] if summary.best is not None else []),
    ]
    for name, value in rows:
        table.add_row(name, value)
    stderr_console().print(table)
    info(f'sample from it: gpt2 sample {summary.model} --prompt "{SAMPLE_PROMPT}"')
