"""A training run as one call: `train(...)` from Python is what `gpt2 train` runs.

Around the Trainer: the settings resolved as the command resolves them, joining and leaving a torchrun job, the data,
the run folder's writer lock, a graceful stop on Ctrl-C or SIGTERM, and the summary. Nothing here prints: progress
goes to a `report(event, payload)` callback (the CLI draws its live display from it; by default, Python's logging).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2cli.errors import UsageError
from gpt2cli.settings.sections import Settings, load_settings
from gpt2cli.training.trainer import Interrupted, Report, TrainingSummary

if TYPE_CHECKING:
    import torch

    from gpt2cli.runtime.distributed import World

logger = logging.getLogger("gpt2cli.training")

PathLike = str | os.PathLike[str]


def train(
    data: PathLike | Sequence[PathLike] | Mapping[str, Any] | None = None,
    *,
    settings: Settings | None = None,
    config: PathLike | None = None,
    model: Mapping[str, Any] | None = None,
    train: Mapping[str, Any] | None = None,
    report: Report | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainingSummary:
    """Train GPT-2 as `gpt2 train` does, with the same settings; returns the run's summary.

    `data` is the input files (one path or a list; none: the bundled Shakespeare with the small default run) or the
    whole `[data]` section as a mapping; `model` and `train` are fields of the `[model]` and `[train]` sections
    (`gpt2cli.settings.sections`), e.g. `train("book.txt", model={"n_layer": 2}, train={"max_steps": 10})`. They are
    laid over `config` (a TOML or seed-YAML file; else $GPT2_CONFIG) and the GPT2_* environment, as flags are, or
    over `settings`, a resolved `Settings` used as given (no file, environment or default-run profile).
    `train={"resume": True, "out": FOLDER}` continues a run with its saved settings, as `--resume` does.

    `report(event, payload)` receives the progress: "data", "start", "log" (each metrics.jsonl record), "checkpoint",
    "best" (a new lowest validation loss kept as checkpoints/best, with --keep-best), "notice", "warning"; without it
    they go to the "gpt2cli.training" logger. `should_stop()`, asked after every step,
    stops the run as Ctrl-C does. Called from the main thread, Ctrl-C and SIGTERM stop gracefully while the run lasts
    (a second Ctrl-C at once); from another thread no signal handler is installed.

    Raises `UsageError` (invalid settings: `SettingsError`), `DataError`, `Interrupted` after saving a checkpoint
    (`exit_code` 130, or 143 for SIGTERM), `TrainingDiverged`, or another `Gpt2Error`.
    """
    from gpt2cli.training.setup import resolve_settings

    sections = _sections(data, model, train)
    if settings is None:
        resolved = resolve_settings(config, sections)
    elif config is not None:
        raise UsageError("give settings or config, not both")
    elif sections:
        # Validated again as a whole: the given settings are the init values, below the keyword sections.
        base = settings.model_dump(mode="json")
        resolved = load_settings(None, {name: {**base[name], **sections.get(name, {})} for name in base})
    else:
        resolved = settings
    return run_training(resolved, report=report or log_event, should_stop=should_stop)


def _sections(
    data: PathLike | Sequence[PathLike] | Mapping[str, Any] | None,
    model: Mapping[str, Any] | None,
    train: Mapping[str, Any] | None,
) -> dict[str, dict[str, Any]]:
    """The keyword arguments as `{"section": {"field": value}}`, the shape flags take; paths become strings."""
    if data is None or isinstance(data, Mapping):
        data_section = dict(data or {})
    else:
        data_section = {"paths": [data] if isinstance(data, (str, os.PathLike)) else list(data)}
    given = {"data": data_section, "model": dict(model or {}), "train": dict(train or {})}
    return {name: {key: _plain(value) for key, value in values.items()} for name, values in given.items() if values}


def _plain(value: Any) -> Any:
    """`Path`s (alone or in a list) as the strings the settings hold."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def run_training(
    settings: Settings, report: Report | None = None, should_stop: Callable[[], bool] | None = None
) -> TrainingSummary:
    """Run training with resolved settings (see `setup.resolve_settings`): the body of `train` and `gpt2 train`.

    Under torchrun every rank calls it and gets the summary; only rank 0 reports and writes the run folder.
    """
    from gpt2cli.observe.trackers import check_trackers
    from gpt2cli.runtime.devices import resolve_device
    from gpt2cli.runtime.distributed import barrier, from_environment, start, stop
    from gpt2cli.training.run_folder import new_run_folder

    check_trackers(settings.train.log_to)  # a missing tracker package stops here, before any training starts
    world = from_environment()
    out = Path(settings.train.out) if settings.train.out else new_run_folder(world.distributed)
    device = start(world, resolve_device(settings.train.device))
    try:
        summary = _train(settings, out, world, device, report or _ignore, should_stop or _never)
        # Leave together: a rank tearing the group down while rank 0 still writes could abort in gloo's threads.
        barrier(world)
        return summary
    finally:
        stop()


def _train(
    settings: Settings,
    out: Path,
    world: World,
    device: torch.device,
    report: Report,
    should_stop: Callable[[], bool],
) -> TrainingSummary:
    from gpt2cli.data.encoding import EncodeOptions
    from gpt2cli.data.examples import EXAMPLE_FORMATS, ExampleData, ExampleRecipe, data_format, load_example_data
    from gpt2cli.data.inputs import TokenData, bundled_corpus, load_token_data, resolve_inputs
    from gpt2cli.formats.chat_template import chat_template_metadata
    from gpt2cli.runtime.devices import resolve_precision
    from gpt2cli.runtime.files import default_cache_dir
    from gpt2cli.training.run_folder import RunFolder
    from gpt2cli.training.setup import prepare_trainer, run_chat_template, with_absolute_paths

    precision = resolve_precision(settings.train.dtype, device)
    bundled = not settings.data.paths  # the default run: the corpus shipped with the package
    started = time.perf_counter()
    train_patterns = [str(bundled_corpus())] if bundled else settings.data.paths
    train_paths = resolve_inputs(train_patterns, skip_val_shards=True)
    val_paths = resolve_inputs(settings.train.val_data) if settings.train.val_data else []
    text_field = settings.data.text_field
    kind = data_format(train_paths + val_paths, settings.data.format, text_field)
    template = run_chat_template(settings, kind)
    cache_dir = Path(settings.data.cache_dir) if settings.data.cache_dir else default_cache_dir()
    warn = lambda message: report("warning", {"message": message})  # noqa: E731
    data: TokenData | ExampleData
    if kind in EXAMPLE_FORMATS:
        recipe = ExampleRecipe(kind, settings.data.loss_on, template)
        data = load_example_data(
            train_paths, val_paths, settings.train.val_fraction, recipe, cache_dir, text_field, warn
        )
    else:
        data = load_token_data(
            train_patterns,
            settings.train.val_data,
            settings.train.val_fraction,
            EncodeOptions.from_settings(settings.data),
            cache_dir,
            settings.data.workers,
            warn=warn,
        )
    settings = with_absolute_paths(settings, out)  # once found: errors name the paths as given
    if world.is_main:
        report(
            "data",
            {
                "train_tokens": data.train_tokens,
                "val_tokens": data.val_tokens,
                "sources": len(data.sources),
                "bundled": bundled,
                "load_s": time.perf_counter() - started,
                "processes": world.world_size,
                "format": kind,
            },
        )
    # One writer per run folder: rank 0 holds its lock from before the first file is touched until the process ends.
    # Taken after tokenizing, so the forked tokenizer workers never inherit it.
    writer = RunFolder(out).writer_lock() if world.is_main else contextlib.nullcontext()
    # Under torchrun every rank gets the signal; rank 0 alone says so.
    with writer, GracefulInterrupt(announce=report if world.is_main else None) as interrupt:
        trainer = prepare_trainer(
            settings,
            data,
            out,
            precision,
            world=world,
            report=report,
            should_stop=lambda: interrupt.requested() or should_stop(),
            model_metadata=chat_template_metadata(template),
        )
        try:
            return trainer.run()
        except Interrupted as interrupted:
            # The shell's convention, 128 + the signal: 130 for Ctrl-C (or should_stop), 143 for SIGTERM. Under
            # torchrun a rank may stop because another one was signalled.
            interrupted.exit_code = 128 + (interrupt.signal or signal.SIGINT)
            raise


class GracefulInterrupt:
    """First Ctrl-C or SIGTERM (what Slurm and Kubernetes send before killing a job): finish the step, save, exit
    128 + the signal (130, 143). A second one: stop at once (the last checkpoint is intact).

    Signal handlers belong to the main thread: entered from any other, it installs none (and `requested()` stays
    false)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: Report | None = None) -> None:
        self.signal = 0
        self.announce = announce
        self.previous: dict[int, Any] = {}

    def requested(self) -> bool:
        return self.signal != 0

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signum
        if self.announce is not None:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            message = f"{name}: stopping after this step to save a checkpoint (Ctrl-C again to stop at once)"
            self.announce("notice", {"message": message})

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *_: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}


def log_event(event: str, payload: dict[str, Any]) -> None:
    """The default `report` of `train`: warnings as logging warnings, the rest as info lines."""
    if event == "warning":
        logger.warning(payload["message"])
    elif event == "notice":
        logger.info(payload["message"])
    elif event == "start":
        plan = payload["plan"]
        logger.info(
            "training %d steps of %d tokens in %s", plan["total_steps"], plan["tokens_per_step"], payload["out"]
        )
    elif event == "log":
        evaluated = f", val {payload['val_loss']:.4f}" if "val_loss" in payload else ""
        logger.info("step %d/%d: loss %.4f%s", payload["step"], payload["total_steps"], payload["loss"], evaluated)
    elif event == "checkpoint":
        logger.info("checkpoint at step %d: %s", payload["step"], payload["path"])
    elif event == "best":
        logger.info("best so far at step %d (val %.4f): %s", payload["step"], payload["val_loss"], payload["path"])


def _ignore(event: str, payload: dict[str, Any]) -> None:
    pass


def _never() -> bool:
    return False
