"""Every module of the package imports on every platform: none imports a POSIX-only module (`fcntl`, `resource`)
or a Windows-only one (`msvcrt`) at import time; those are imported inside the branch that runs on their platform.

Each platform's missing modules are simulated in a fresh interpreter (a None in `sys.modules` makes `import fcntl`
raise ImportError, as on Windows), so nothing this test process has imported already can hide an import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

UNAVAILABLE = {
    "windows": ["fcntl", "resource", "termios"],  # POSIX only
    "posix": ["msvcrt", "winreg", "_winapi"],  # Windows only
}

IMPORT_ALL = """
import importlib, json, sys
unavailable, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in unavailable:
    sys.modules[name] = None
try:
    importlib.import_module(unavailable[0])
    raise SystemExit(f"{unavailable[0]} is still importable: the simulation does not work")
except ImportError:
    pass
failures = {}
for module in modules:
    try:
        importlib.import_module(module)
    except Exception as error:
        failures[module] = f"{type(error).__name__}: {error}"
print(json.dumps(failures))
"""


def package_modules() -> list[str]:
    """Every module of gpt2cli from the file tree (`__main__` left out: importing it runs the CLI)."""
    names = []
    for path in sorted((REPO / "gpt2cli").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_the_module_list_is_the_whole_package():
    modules = package_modules()
    assert {"gpt2cli", "gpt2cli.training.run_folder", "gpt2cli.benchmark", "gpt2cli.cli.app"} <= set(modules)
    assert len(modules) > 50


@pytest.mark.parametrize("platform", sorted(UNAVAILABLE))
def test_every_module_imports_without_the_other_platforms_modules(platform):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    arguments = [json.dumps(UNAVAILABLE[platform]), json.dumps(package_modules())]
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, *arguments], capture_output=True, env=env, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout.decode().splitlines()[-1]) == {}
