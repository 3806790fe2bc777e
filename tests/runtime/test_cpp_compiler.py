"""Inductor's C++ compiler per platform: the one `find_cpp_compiler` looks for is the one torch would call (MSVC's
`cl` on Windows, clang++ on macOS, g++ elsewhere, $CXX first), and the advice names what to install there."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from gpt2cli.errors import UsageError
from gpt2cli.runtime.compile import choose_compile, find_cpp_compiler

CPU = torch.device("cpu")
LONG_RUN = 1e18  # training FLOPs that repay any compilation


@pytest.fixture
def on_path(monkeypatch) -> list[str]:
    """PATH holds every compiler; records the names looked up."""
    asked: list[str] = []

    def which(name: str) -> str:
        asked.append(name)
        return f"/found/{name}"

    monkeypatch.setattr(shutil, "which", which)
    return asked


@pytest.mark.parametrize(
    ("platform", "cxx", "wanted"),
    [
        ("linux", None, "g++"),
        ("darwin", None, "clang++"),
        ("win32", None, "cl"),
        ("win32", "clang-cl", "clang-cl"),
        ("linux", "clang++", "clang++"),
    ],
)
def test_the_compiler_looked_for_per_platform(monkeypatch, on_path, platform, cxx, wanted):
    monkeypatch.setattr(sys, "platform", platform)
    if cxx is None:
        monkeypatch.delenv("CXX", raising=False)
    else:
        monkeypatch.setenv("CXX", cxx)
    assert find_cpp_compiler() == f"/found/{wanted}" and on_path == [wanted]


def test_a_missing_compiler_is_none(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert find_cpp_compiler() is None


@pytest.mark.parametrize(
    ("platform", "remedy"),
    [
        ("linux", "install g++ (or set CXX)"),
        ("darwin", "install Xcode's command line tools for clang++ (or set CXX)"),
        ("win32", "run gpt2 from a Developer Command Prompt, where cl is on PATH (or set CXX to cl or clang-cl)"),
    ],
)
def test_without_a_compiler_the_advice_names_the_platforms_compiler(monkeypatch, platform, remedy):
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    auto = choose_compile("auto", CPU, LONG_RUN)
    assert not auto.enabled and auto.reason is not None
    assert auto.reason.startswith("no C++ compiler found for Inductor; ") and remedy in auto.reason
    with pytest.raises(UsageError, match="--no-compile") as refused:
        choose_compile(True, CPU, LONG_RUN)
    assert remedy in str(refused.value)


def test_torch_picks_the_same_compiler_on_windows(monkeypatch):
    """Inductor's own choice on win32, with its checks that run the compiler left out: $CXX, else cl."""
    cpp_builder = pytest.importorskip("torch._inductor.cpp_builder")
    if not hasattr(cpp_builder, "get_cpp_compiler"):
        pytest.skip("this torch chooses its compiler elsewhere")
    monkeypatch.setattr(cpp_builder, "_IS_WINDOWS", True)
    monkeypatch.setattr(cpp_builder, "check_compiler_exist_windows", lambda compiler: None, raising=False)
    monkeypatch.setattr(cpp_builder, "check_msvc_cl_language_id", lambda compiler: None, raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(shutil, "which", lambda name: name)
    assert cpp_builder.get_cpp_compiler() == find_cpp_compiler() == "cl"
    monkeypatch.setenv("CXX", "clang-cl")
    assert cpp_builder.get_cpp_compiler() == find_cpp_compiler() == "clang-cl"


def test_torch_picks_the_same_compiler_here():
    import torch._inductor.config as inductor_config

    names = [name for name in inductor_config.cpp.cxx if name is not None]  # None: a conda download, off by default
    assert shutil.which(names[0]) == find_cpp_compiler()
