"""The public Python API: `gpt2cli.train(...)` is `gpt2 train` as a call (settings in, summary out, errors raised)."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading

import pytest

import gpt2cli
from conftest import shakespeare_text
from gpt2cli.errors import UsageError
from gpt2cli.settings.sections import SettingsError, load_settings
from gpt2cli.training.trainer import Interrupted, TrainingSummary

TINY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}
EXACT = {"device": "cpu", "dtype": "float32", "batch_size": 4, "log_interval": 1}


@pytest.fixture
def text(tmp_path, monkeypatch):
    """A small corpus, with no GPT2_* variable of the developer's shell leaking into the settings."""
    for name in [name for name in os.environ if name.startswith("GPT2_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("GPT2_DATA__CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "book.txt"
    path.write_text(shakespeare_text()[:30_000])
    return path


def test_train_returns_the_summary_and_writes_the_run_folder(tmp_path, text, capsys):
    out = tmp_path / "run"
    events = []
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    summary = gpt2cli.train(
        text,
        model=TINY_MODEL,
        train={**EXACT, "max_steps": 3, "out": out},
        report=lambda event, payload: events.append(event),
    )
    assert isinstance(summary, TrainingSummary)
    assert (summary.steps, summary.tokens, summary.out) == (3, 3 * 4 * 32, out)
    assert summary.model == out / "model.safetensors"
    assert summary.train_loss > 9.0 and summary.val_loss is not None and summary.dtype == "float32"
    assert {"model.safetensors", "config.toml", "metrics.jsonl", "checkpoints"} <= {p.name for p in out.iterdir()}
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert events[0] == "data" and events.count("start") == events.count("checkpoint") == 1
    assert events.count("log") == 3
    document = summary.to_dict()  # what `gpt2 train --json` prints
    assert document["out"] == str(out) and document["steps"] == 3 and "hellaswag_acc" not in document
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    assert capsys.readouterr().out == ""  # a library call prints nothing on stdout


def test_train_in_a_thread_with_a_settings_object_installs_no_signal_handler(tmp_path, text):
    settings = load_settings(None, {"model": TINY_MODEL, "data": {"paths": [str(text)]}, "train": EXACT})
    before = signal.getsignal(signal.SIGINT)
    during, results = [], []

    def report(event, payload):
        if event == "log":
            during.append(signal.getsignal(signal.SIGINT))

    def target():
        try:
            overrides = {"max_steps": 2, "out": tmp_path / "run"}
            results.append(gpt2cli.train(settings=settings, train=overrides, report=report))
        except BaseException as error:  # shown by the assertion below, not lost in the thread
            results.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=600)
    (result,) = results
    assert isinstance(result, TrainingSummary), result
    assert result.steps == 2  # the keyword section laid over the given settings
    assert during == [before, before] and signal.getsignal(signal.SIGINT) is before


def test_should_stop_saves_and_raises_interrupted_then_the_run_resumes(tmp_path, text, caplog):
    out = tmp_path / "run"
    steps = []

    def report(event, payload):
        if event == "log":
            steps.append(payload["step"])

    with pytest.raises(Interrupted, match=f"Resume with: gpt2 train --resume --out {out}") as stopped:
        gpt2cli.train(
            [text],
            model=TINY_MODEL,
            train={**EXACT, "max_steps": 6, "out": out},
            report=report,
            should_stop=lambda: len(steps) >= 2,
        )
    assert stopped.value.exit_code == 130
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    with caplog.at_level(logging.INFO, logger="gpt2cli.training"):  # without `report`, progress is logged
        summary = gpt2cli.train(train={"resume": True, "out": out})  # with the run's saved settings
    assert summary.steps == 6 and steps == [1, 2]
    logged = [message.split(":")[0] for message in caplog.messages if message.startswith("step ")]
    assert logged == ["step 3/6", "step 4/6", "step 5/6", "step 6/6"]


def test_a_bad_setting_raises_the_usage_error_and_writes_nothing(tmp_path, text):
    out = tmp_path / "run"
    with pytest.raises(SettingsError, match=r"train\.lr"):
        gpt2cli.train(text, train={"lr": -1, "out": out})
    with pytest.raises(SettingsError, match=r"model\.n_layers: unknown setting"):
        gpt2cli.train(text, model={"n_layers": 2}, train={"out": out})
    with pytest.raises(UsageError, match="settings or config, not both"):
        gpt2cli.train(settings=load_settings(), config=tmp_path / "run.toml")
    with pytest.raises(UsageError, match="--resume needs --out"):
        gpt2cli.train(text, train={"resume": True})
    assert not out.exists()
