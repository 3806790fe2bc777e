"""Settings: defaults < config file < environment < flags, validated with one line per problem."""

from __future__ import annotations

import json
import tomllib

import pytest

from conftest import FIXTURES, assert_one_line_error, cli_env, run_cli, shakespeare_text
from gpt2cli import load_model
from gpt2cli.errors import UsageError
from gpt2cli.settings.sections import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("GPT2_"):
            monkeypatch.delenv(key)


def test_defaults_are_gpt2_124m_and_the_llmc_recipe():
    settings = load_settings()
    config = settings.model.to_config()
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size) == (
        12,
        12,
        768,
        1024,
        50257,
    )
    assert (settings.train.lr, settings.train.beta2, settings.train.weight_decay, settings.train.grad_clip) == (
        6e-4,
        0.95,
        0.1,
        1.0,
    )
    assert settings.data.text_field == "text"


def test_precedence_in_process(tmp_path, monkeypatch):
    config = tmp_path / "gpt2.toml"
    config.write_text(
        '[data]\ntext_field = "from_file"\nworkers = 3\nshard_size = 7\n[model]\npreset = "gpt2-medium"\n'
    )
    monkeypatch.setenv("GPT2_DATA__TEXT_FIELD", "from_env")
    monkeypatch.setenv("GPT2_DATA__WORKERS", "5")
    settings = load_settings(config, {"data": {"text_field": "from_flag"}})
    assert settings.data.text_field == "from_flag"  # flag beats environment
    assert settings.data.workers == 5  # environment beats file
    assert settings.data.shard_size == 7  # file beats default
    assert settings.data.errors == "strict"  # default
    assert settings.model.to_config().n_layer == 24  # preset from the file


def test_config_file_from_environment_variable(tmp_path, monkeypatch):
    config = tmp_path / "gpt2.toml"
    config.write_text("[train]\nlr = 0.001\n")
    monkeypatch.setenv("GPT2_CONFIG", str(config))
    assert load_settings().train.lr == 0.001


def test_preset_with_explicit_overrides():
    model = load_settings(overrides={"model": {"preset": "gpt2-xl", "n_layer": 2}}).model.to_config()
    assert (model.n_layer, model.n_head, model.n_embd) == (2, 25, 1600)


def test_seed_yaml_maps_onto_the_same_models():
    settings = load_settings(FIXTURES / "default_config.yaml")
    config = settings.model.to_config()
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (4, 4, 256, 128)
    train = settings.train
    assert (train.epochs, train.batch_size, train.seq_len, train.lr, train.device) == (3, 16, 128, 3e-4, "cpu")
    assert (train.log_interval, train.save_interval, train.out) == (50, 500, "checkpoints/gpt2_model")
    assert settings.data.paths == ["data/input.txt"]


def test_seed_yaml_unknown_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  num_epochs: 1\n  momentum: 0.9\n")
    with pytest.raises(UsageError, match=r"unknown key training\.momentum"):
        load_settings(path)


def test_every_problem_is_reported_with_its_field(tmp_path, monkeypatch):
    config = tmp_path / "bad.toml"
    config.write_text('[data]\nworkerz = 2\nerrors = "ignore"\n[train]\nlr = -1\n[sampling]\ntop_k = 5\n')
    with pytest.raises(SettingsError) as caught:
        load_settings(config)
    lines = str(caught.value).splitlines()
    assert len(lines) == 4
    assert any(line.startswith("data.workerz: unknown setting") for line in lines)
    assert any(line.startswith("data.errors: ") and "'ignore'" in line for line in lines)
    assert any(line.startswith("train.lr: ") and "greater than 0" in line for line in lines)
    assert any(line.startswith("sampling: unknown setting") for line in lines)


def test_cross_field_rules():
    with pytest.raises(SettingsError, match="divisible by n_head"):
        load_settings(overrides={"model": {"n_embd": 100, "n_head": 3}})
    with pytest.raises(SettingsError, match="only one of max_steps, epochs, max_tokens"):
        load_settings(overrides={"train": {"max_steps": 10, "epochs": 1}})
    with pytest.raises(SettingsError, match=r"train\.device"):
        load_settings(overrides={"train": {"device": "tpu"}})


# ---------------------------------------------------------------- through the real CLI


def _jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"a": "Hello", "b": "Hello world", "c": "world"}) + "\n")
    return path


def test_precedence_through_the_cli(tmp_path):
    """text_field decides which field is tokenized, so the output shows which source won."""
    docs = _jsonl(tmp_path)
    config = tmp_path / "gpt2.toml"
    config.write_text('[data]\ntext_field = "b"\n')
    assert run_cli("tokenize", docs, env=cli_env(GPT2_DATA__TEXT_FIELD="a")).stdout == b"15496\n"  # env
    assert run_cli("tokenize", docs, "--config", config).stdout == b"15496 995\n"  # file
    assert run_cli("tokenize", docs, "--config", config, env=cli_env(GPT2_DATA__TEXT_FIELD="a")).stdout == b"15496\n"
    both = cli_env(GPT2_DATA__TEXT_FIELD="a", GPT2_CONFIG=str(config))
    assert run_cli("tokenize", docs, "--text-field", "c", env=both).stdout == b"6894\n"  # flag wins


def test_invalid_flag_value_exits_2_naming_the_field():
    assert_one_line_error(run_cli("tokenize", "--workers", "-3", input="x"), 2, "data.workers", "-3")
    # A closed choice is checked by the command line itself, which names the flag and the choices.
    assert_one_line_error(run_cli("tokenize", "--errors", "ignore", input="x"), 2, "--errors", "'ignore'", "'strict'")


def test_invalid_environment_value_exits_2():
    result = run_cli("tokenize", input="x", env=cli_env(GPT2_DATA__SHARD_SIZE="0"))
    assert_one_line_error(result, 2, "data.shard_size")


def test_unknown_key_in_file_exits_2(tmp_path):
    config = tmp_path / "typo.toml"
    config.write_text("[data]\ntext_feild = 'x'\n")
    assert_one_line_error(run_cli("tokenize", "--config", config, input="x"), 2, "data.text_feild: unknown setting")


def test_several_problems_give_one_line_each(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[data]\nworkers = -1\nshard_size = 0\n")
    result = run_cli("tokenize", "--config", config, input="x")
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 2 and all(line.startswith("gpt2: error: data.") for line in lines)


def test_missing_and_broken_config_files(tmp_path):
    assert_one_line_error(run_cli("tokenize", "--config", tmp_path / "none.toml", input="x"), 2, "not found")
    broken = tmp_path / "broken.toml"
    broken.write_text("[data\n")
    assert_one_line_error(run_cli("tokenize", "--config", broken, input="x"), 2, "invalid TOML")
    assert_one_line_error(run_cli("tokenize", input="x", env=cli_env(GPT2_CONFIG=str(tmp_path / "gone.toml"))), 2)


def test_seed_yaml_through_the_cli(tmp_path):
    """The seed YAML's values reach a `gpt2 train` run: its resolved config.toml, its model and its first step.

    Flags still win over the file: a batch of 1 for a twentieth of an epoch keeps the YAML's 16M-parameter model to
    one step. Its relative paths are the working folder's, as the seed project used them."""
    docs = _jsonl(tmp_path)  # a command that ignores the training sections accepts the file too
    assert run_cli("tokenize", docs, "--text-field", "a", "--config", FIXTURES / "default_config.yaml").returncode == 0

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "input.txt").write_text(shakespeare_text()[:9_000])  # ~2,600 tokens: 19 windows of 129
    env = cli_env(GPT2_DATA__CACHE_DIR=str(tmp_path / "cache"))
    flags = ["--batch-size", "1", "--epochs", "0.05"]
    result = run_cli("train", "--config", FIXTURES / "default_config.yaml", *flags, "--json", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)
    out = (tmp_path / "checkpoints" / "gpt2_model").resolve()  # model_save_path's file name becomes the run folder
    assert (tmp_path / summary["out"]).resolve() == out and summary["steps"] == 1 and summary["device"] == "cpu"
    resolved = tomllib.loads((out / "config.toml").read_text())
    model, train = resolved["model"], resolved["train"]
    shape = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
    assert [model[key] for key in shape] == [4, 4, 256, 128, 50257]
    assert (train["seq_len"], train["lr"], train["device"]) == (128, 3e-4, "cpu")
    assert (train["log_interval"], train["save_interval"]) == (50, 500) and (tmp_path / train["out"]).resolve() == out
    assert resolved["data"]["paths"] == [str(tmp_path / "data" / "input.txt")]
    assert (train["batch_size"], train["epochs"]) == (1, 0.05)  # the flags, over the file's 16 and 3
    config = load_model(out).config
    assert (config.n_layer, config.n_embd, config.block_size) == (4, 256, 128)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["tokens"] == 128 and first["lr"] == pytest.approx(3e-4)  # one window of sequence_length, no warmup
