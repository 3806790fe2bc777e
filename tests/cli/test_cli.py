"""The root command: help without torch, version, plugins through real entry points, error rendering."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import assert_one_line_error, cli_env, run_cli, run_cli_process
from gpt2cli import __version__


def test_help_does_not_import_torch():
    probe = textwrap.dedent(
        """
        import sys
        from gpt2cli.cli.app import run
        code = run(["--help"])
        heavy = sorted(m for m in ("torch", "numpy", "tiktoken", "safetensors") if m in sys.modules)
        print("HEAVY:" + ",".join(heavy), file=sys.stderr)
        sys.exit(code)
        """
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, env=cli_env(), timeout=60)
    assert result.returncode == 0
    assert b"tokenize" in result.stdout
    assert result.stderr.decode().strip().endswith("HEAVY:")


@pytest.mark.parametrize(("command", "option"), [("tokenize", "--shard-size"), ("train", "--schedule")])
def test_subcommand_help_does_not_import_torch(command, option):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "gpt2cli", command, "--help"],
        capture_output=True,
        env=cli_env(),
        timeout=60,
    )
    assert result.returncode == 0
    imported = {line.split("|")[-1].strip() for line in result.stderr.decode().splitlines() if "|" in line}
    assert "torch" not in imported and option in result.stdout.decode()


def test_version_and_module_entry_point():
    assert run_cli_process("--version").stdout.decode().strip() == f"gpt2 {__version__}"
    script = os.path.join(os.path.dirname(sys.executable), "gpt2")
    if os.path.exists(script):
        console = subprocess.run([script, "--version"], capture_output=True, env=cli_env(), timeout=60)
        assert console.stdout == run_cli("--version").stdout


def test_unknown_command_and_option_are_usage_errors():
    assert_one_line_error(run_cli("frobnicate"), 2, "No such command")
    assert_one_line_error(run_cli("tokenize", "--frobnicate"), 2, "--frobnicate", "gpt2 tokenize --help")


def test_bare_command_shows_help_and_exits_2():
    result = run_cli()
    assert result.returncode == 2
    assert b"tokenize" in result.stdout + result.stderr


def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.txt"
    quiet = run_cli("tokenize", missing)
    assert b"Traceback" not in quiet.stderr
    loud = run_cli("tokenize", missing, env=cli_env(GPT2_DEBUG="1"))
    assert loud.returncode != 0 and b"Traceback" in loud.stderr and b"UsageError" in loud.stderr


# ---------------------------------------------------------------- plugins: a real second distribution


def _install_plugin(site: os.PathLike[str], name: str, entry_points: str, module_source: str) -> None:
    """A minimal installed distribution: a module and a .dist-info with entry_points.txt."""
    dist_info = os.path.join(site, f"{name}-0.1.dist-info")
    os.makedirs(dist_info)
    with open(os.path.join(dist_info, "METADATA"), "w") as handle:
        handle.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    with open(os.path.join(dist_info, "entry_points.txt"), "w") as handle:
        handle.write(entry_points)
    with open(os.path.join(site, f"{name}.py"), "w") as handle:
        handle.write(textwrap.dedent(module_source))


@pytest.fixture
def plugin_site(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _install_plugin(
        site,
        "gpt2_hello",
        "[gpt2cli.commands]\nhello = gpt2_hello:hello\n",
        '''
        import typer

        def hello(name: str = typer.Option("world", help="Whom to greet.")) -> None:
            """Say hello (a third-party command)."""
            print(f"hello {name}")
        ''',
    )
    return site


def test_plugin_command_is_discovered_and_runs(plugin_site):
    env = cli_env(PYTHONPATH=str(plugin_site))
    assert b"hello" in run_cli("--help", env=env).stdout
    result = run_cli("hello", "--name", "gpt", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello gpt\n"
    assert run_cli("tokenize", env=env, input="Hello world").stdout == b"15496 995\n"


def test_broken_plugin_warns_once_and_the_rest_works(plugin_site):
    _install_plugin(
        plugin_site,
        "gpt2_broken",
        "[gpt2cli.commands]\nbroken = gpt2_broken:command\n",
        "raise ImportError('needs a package that is not installed')\n",
    )
    env = cli_env(PYTHONPATH=str(plugin_site))
    listing = run_cli("--help", env=env)
    assert listing.returncode == 0
    assert b"tokenize" in listing.stdout and b"hello" in listing.stdout
    warnings = listing.stderr.decode().splitlines()
    assert len(warnings) == 1
    assert warnings[0].startswith("gpt2: warning: command 'broken'") and "not installed" in warnings[0]
    # Only the command asked for is imported, so the broken one costs the others nothing.
    result = run_cli("tokenize", env=env, input="Hello world")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"15496 995\n", b"")
    assert run_cli("hello", env=env).stdout == b"hello world\n"
    broken = run_cli("broken", env=env)
    assert broken.returncode == 2
    assert broken.stderr.decode().splitlines()[0].startswith("gpt2: warning: command 'broken'")
