"""`--compile` auto (the default): compile where Inductor works and the run repays it, else eager with one line."""

from __future__ import annotations

import tomllib

import pytest
import torch

from conftest import assert_one_line_error, cli_env, run_cli
from gpt2cli.runtime import compile as compile_policy
from gpt2cli.runtime.compile import choose_compile
from gpt2cli.settings.sections import load_settings

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4"]
SHORT = [*TINY, "--device", "cpu", "--dtype", "float32", "--max-steps", "2", "--val-fraction", "0"]
CPU = torch.device("cpu")
LONG_RUN = 1e18  # training FLOPs that repay any compilation


@pytest.fixture
def env(tmp_path):
    return cli_env(GPT2_DATA__CACHE_DIR=str(tmp_path / "cache"))


@pytest.fixture
def no_compiler(monkeypatch):
    monkeypatch.setattr(compile_policy, "find_cpp_compiler", lambda: None)


def saved_compile(out) -> object:
    return tomllib.loads((out / "config.toml").read_text())["train"]["compile"]


def test_a_short_run_stays_eager_and_says_why(tmp_path, corpus, env):
    result = run_cli("train", corpus, *SHORT, "--out", tmp_path / "run", env=env)
    assert result.returncode == 0, result.stderr.decode()
    lines = [line for line in result.stderr.decode().splitlines() if line.startswith("compile:")]
    assert len(lines) == 1 and lines[0].startswith("compile: off (run too short to repay compiling: ~0 s"), lines
    assert saved_compile(tmp_path / "run") is False  # the run records what auto chose


def test_auto_without_a_compiler_falls_back_to_eager_with_its_message(tmp_path, corpus, env, no_compiler, monkeypatch):
    monkeypatch.setattr(compile_policy, "too_short_to_compile", lambda device, flops: None)  # as if long enough
    result = run_cli("train", corpus, *SHORT, "--out", tmp_path / "run", env=env)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "compile: off (no C++ compiler found for Inductor; install g++ (or set CXX) or pass --no-compile" in stderr
    assert saved_compile(tmp_path / "run") is False


def test_an_explicit_compile_without_a_compiler_is_one_clear_error(tmp_path, corpus, env, no_compiler):
    result = run_cli("train", corpus, *SHORT, "--compile", "--out", tmp_path / "run", env=env)
    assert_one_line_error(result, 2, "--compile: no C++ compiler found for Inductor", "--no-compile")
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_no_compile_says_nothing(tmp_path, corpus, env, no_compiler):
    result = run_cli("train", corpus, *SHORT, "--no-compile", "--out", tmp_path / "run", env=env)
    assert result.returncode == 0 and "compile:" not in result.stderr.decode()


def test_the_decision_rule(no_compiler):
    assert choose_compile(False, CPU, LONG_RUN).enabled is False
    assert choose_compile("auto", CPU, LONG_RUN).reason.startswith("no C++ compiler found")  # type: ignore[union-attr]
    assert "too short" in choose_compile("auto", CPU, 1e12).reason  # type: ignore[operator]
    mps = torch.device("mps")  # Inductor's MPS backend: auto leaves it alone, --compile tries it
    assert "mps" in choose_compile("auto", mps, LONG_RUN).reason  # type: ignore[operator]
    assert choose_compile(True, mps, 1.0).enabled


def test_auto_compiles_a_long_run_where_a_compiler_is_found(monkeypatch):
    monkeypatch.setattr(compile_policy, "find_cpp_compiler", lambda: "/usr/bin/g++")
    assert choose_compile("auto", CPU, LONG_RUN) == compile_policy.CompileChoice(True)
    assert choose_compile(True, CPU, 1.0) == compile_policy.CompileChoice(True)  # told to: however short


@pytest.mark.parametrize(("text", "expected"), [('"auto"', "auto"), ("true", True), ("false", False)])
def test_compile_from_toml(tmp_path, text, expected):
    config = tmp_path / "run.toml"
    config.write_text(f"[train]\ncompile = {text}\n")
    assert load_settings(config, {}).train.compile == expected


@pytest.mark.parametrize(("text", "expected"), [("auto", "auto"), ("true", True), ("0", False)])
def test_compile_from_the_environment(monkeypatch, text, expected):
    monkeypatch.setenv("GPT2_TRAIN__COMPILE", text)
    assert load_settings(None, {}).train.compile == expected


def test_auto_is_the_default():
    assert load_settings(None, {}).train.compile == "auto"


def test_a_bad_value_is_one_line_exit_2(tmp_path, corpus, env):
    config = tmp_path / "run.toml"
    config.write_text('[train]\ncompile = "sometimes"\n')
    assert_one_line_error(run_cli("train", corpus, "--config", config, env=env), 2, "compile")
