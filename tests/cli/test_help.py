"""`--help` a user can trust, and every flag declared once: in-process through the real app."""

from __future__ import annotations

import re
from typing import Literal, get_args, get_origin

import pytest

from gpt2cli.cli.app import reflow, run
from gpt2cli.cli.options import overrides
from gpt2cli.model.presets import PRESETS
from gpt2cli.settings.sections import (
    DEFAULT_RUN,
    BenchSettings,
    ChatSettings,
    DataSettings,
    EvalSettings,
    ModelSettings,
    SampleSettings,
    TrainSettings,
)

COMMANDS = ("train", "sample", "eval", "bench", "tokenize", "convert")


@pytest.fixture(autouse=True)
def wide_clean_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one option per line, so a line holds a flag's whole help
    for key in list(__import__("os").environ):
        if key.startswith("GPT2_"):
            monkeypatch.delenv(key)


def help_text(capsys, command: str) -> str:
    assert run([command, "--help"]) == 0
    return capsys.readouterr().out


def option_line(text: str, flag: str) -> str:
    lines = [line for line in text.splitlines() if re.search(rf"│ {re.escape(flag)}\b(?!-)", line)]
    assert len(lines) == 1, f"{flag}: {lines}"
    return lines[0]


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


# The sections each command's flags come from, and flags spelt differently from their field.
SECTIONS = {
    "train": (TrainSettings, ModelSettings),
    "sample": (SampleSettings,),
    "chat": (ChatSettings,),
    "eval": (EvalSettings,),
    "bench": (BenchSettings,),
    "tokenize": (DataSettings,),
}
SPELLED = {
    "batch_sizes": "--batch-size",
    "seq_lens": "--seq-len",
    "output_format": "--format",
    "allow_special": "--special",
    "ignore_eot": "--ignore-eot",
    "token_limit": "--max-tokens",  # tokenize's; train and eval have their own max_tokens
}
NOT_FLAGS = {"paths", "vocab_size", "cache_dir"}  # FIXTURES arguments, or settings only a file or the environment sets
NOT_FLAGS_OF = {"chat": {"num_samples", "ignore_eot"}}  # inherited from sample; a chat has one value for them


@pytest.mark.parametrize("command", SECTIONS)
def test_each_default_and_choice_is_shown_from_the_settings(capsys, command):
    text = help_text(capsys, command)
    for section in SECTIONS[command]:
        for field, info in section.model_fields.items():
            if field in NOT_FLAGS | NOT_FLAGS_OF.get(command, set()) or (
                section is DataSettings and command != "tokenize"
            ):
                continue
            line = option_line(text, SPELLED.get(field, _flag(field)))
            default = info.get_default(call_default_factory=True)
            if isinstance(default, bool):
                spelling = line.split()[1 if default else 2].lstrip("-")  # `│ --compile --no-compile ...`
                assert f"[default: {spelling}]" in line, line
            elif default not in (None, []):
                assert f"[default: {_shown(default)}]" in line, line
            if get_origin(info.annotation) is Literal:  # a closed choice: listed, from the Literal itself
                assert "[" + "|".join(get_args(info.annotation)) + "]" in line, line


def test_train_help_lists_the_default_runs_own_values(capsys):
    text = " ".join(help_text(capsys, "train").split())  # the paragraph wraps; compare without line breaks
    for values in DEFAULT_RUN.values():
        for field, value in values.items():
            assert f"{_flag(field)} {value}" in text


def test_train_help_groups_options_in_panels(capsys):
    text = help_text(capsys, "train")
    for panel in ("Model", "Data", "Optimizer", "Schedule", "Speed", "Run", "Output"):
        assert f"╭─ {panel} ─" in text
    assert re.search(r"╭─ Schedule ─.*?--schedule .*?╰", text, re.S)


@pytest.mark.parametrize("command", COMMANDS)
def test_conventional_metavars_and_none_for_flags(capsys, command):
    text = help_text(capsys, command)
    assert "<" not in re.sub(r"<\|endoftext\|>", "", text)  # no Typer-style <int>, <list[str]>, <bool>
    for line in text.splitlines():
        if re.search(r"│ --(json|help|force|count|decode|compile|resume|special|ignore-eot)\b", line):
            words = line.split("│")[1].split()
            after_flags = words[len([word for word in words[:3] if word.startswith("-")])]
            assert after_flags not in ("BOOL", "BOOLEAN", "TEXT", "INTEGER") and after_flags[0] != "[", line
    if command == "train":
        assert re.search(r"--lr +FLOAT", text) and re.search(r"--max-steps +INTEGER", text)
        assert re.search(r"--out +TEXT", text) and re.search(r"--config +PATH", text)
        assert re.search(r"--device +auto\|cpu\|cuda\|cuda:N\|mps", text)  # open: the kinds, no closed choice


def test_docstring_paragraphs_reflow_to_the_terminal(capsys):
    text = help_text(capsys, "sample")
    line = next(line for line in text.splitlines() if "Prints the completion only" in line)
    assert "and goes on." in line  # the whole paragraph on one 300-column line, not broken at 80
    docstring = "Title.\n\n    One\n    two.\n\n    Keep:\n      a  # b\n      c\n"
    assert reflow(docstring) == "Title.\n\nOne two.\n\nKeep:\n  a  # b\n  c"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["train", "--schedule", "bogus"], ["--schedule", "'bogus'", "'cosine', 'linear', 'constant', 'wsd'"]),
        (["train", "--dtype", "x"], ["--dtype", "'x'", "'bfloat16'"]),
        (["train", "--preset", "gpt5"], ["--preset", "'gpt2-medium'"]),
        (["sample", "m.safetensors", "--dtype", "auto"], ["--dtype", "'auto'"]),
        (["eval", "m.safetensors", "x.txt", "--task", "mmlu"], ["--task", "'hellaswag'"]),
        (["bench", "--format", "xml"], ["--format", "'md'"]),
        (["train", "--device", "tpu"], ["train.device", "'tpu'"]),  # open, so the settings' pattern checks it
    ],
)
def test_bad_choices_are_one_line_usage_errors(capsys, args, fragments):
    assert run(args) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt2: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Value error" not in lines[0]


def test_bad_choices_from_a_file_and_the_environment(capsys, tmp_path, monkeypatch):
    config = tmp_path / "bad.toml"
    config.write_text('[train]\nschedule = "bogus"\n')
    assert run(["train", "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("gpt2: error: train.schedule: Input should be 'cosine'")
    monkeypatch.setenv("GPT2_SAMPLE__QUANTIZE", "int2")
    assert run(["sample", "m.safetensors"]) == 2
    assert capsys.readouterr().err.startswith("gpt2: error: sample.quantize: Input should be 'none', 'int8' or 'int4'")


def test_overrides_keep_only_given_flags_that_are_fields():
    values = {"lr": 0.01, "seed": None, "val_data": [], "n_layer": 2, "data": ["x"], "json_output": True}
    expected = {"model": {"n_layer": 2}, "train": {"lr": 0.01}}
    assert overrides(values, model=ModelSettings, train=TrainSettings) == expected
    assert overrides({"lr": None}, train=TrainSettings) == {}


def test_train_flags_reach_the_settings_by_field_name(monkeypatch):
    import gpt2cli.cli.train as train

    calls = []
    monkeypatch.setattr(train, "run_training_command", lambda *args: calls.append(args))
    argv = ["train", "a.txt", "b.txt", "--lr", "0.01", "--schedule", "wsd", "--no-compile", "--n-layer", "2"]
    argv += ["--text-field", "body", "--val-data", "v.txt", "--resume", "--out", "run", "--json"]
    assert run(argv) == 0
    ((config, flags, json_output),) = calls
    assert config is None and json_output is True
    assert flags == {
        "model": {"n_layer": 2},
        "data": {"paths": ["a.txt", "b.txt"], "text_field": "body"},
        "train": {
            "lr": 0.01,
            "schedule": "wsd",
            "compile": False,
            "val_data": ["v.txt"],
            "resume": True,
            "out": "run",
        },
    }


def test_sample_eval_and_bench_flags_reach_their_sections(monkeypatch):
    import gpt2cli.cli.bench as bench
    import gpt2cli.cli.eval as evaluation
    import gpt2cli.cli.sample as sample

    seen = {}
    monkeypatch.setattr(sample, "run_sampling", lambda checkpoint, prompts, settings, json: seen.update(s=settings))
    monkeypatch.setattr(evaluation, "run_evaluation", lambda checkpoint, data, settings, json: seen.update(e=settings))
    monkeypatch.setattr(bench, "run_bench", lambda settings: seen.update(b=settings))
    sample_args = ["--top-k", "5", "--stop", "\n", "--stop", ".", "--quantize", "int8", "--seed", "3"]
    assert run(["sample", "m.safetensors", "--prompt", "Hi", *sample_args]) == 0
    assert run(["eval", "m.safetensors", "x.txt", "--task", "hellaswag", "--limit", "7", "--text-field", "q"]) == 0
    assert run(["bench", "--preset", "gpt2-xl", "--batch-size", "1,2", "--tests", "pp8,tg4", "--json"]) == 0
    assert (seen["s"].top_k, seen["s"].stop, seen["s"].quantize, seen["s"].seed) == (5, ["\n", "."], "int8", 3)
    assert (seen["e"].eval.task, seen["e"].eval.limit, seen["e"].data.text_field) == ("hellaswag", 7, "q")
    bench_settings = seen["b"]
    assert bench_settings.model.preset == "gpt2-xl"
    assert (bench_settings.bench.batch_sizes, bench_settings.bench.tests) == ([1, 2], ["pp8", "tg4"])
    assert bench_settings.bench.output_format == "json"


def test_presets_are_one_table_that_settings_validate_against():
    assert set(get_args(ModelSettings.model_fields["preset"].annotation)) == set(PRESETS)
    for name, shape in PRESETS.items():
        assert ModelSettings(preset=name).preset == name
        assert shape.n_embd % shape.n_head == 0
