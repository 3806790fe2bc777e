"""Shared fixtures: the real CLI (in this process, or in a subprocess where that matters), the bundled corpus, and
random-weight transformers models."""

from __future__ import annotations

import gzip
import importlib
import importlib.resources
import io
import os
import signal
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import cache
from pathlib import Path

import pytest

# Each xdist worker computes with one thread (read when torch starts, and inherited by the processes tests start):
# two workers on CI's two cores each spinning OpenMP threads over both cores took 11% longer in all.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@cache
def shakespeare_text() -> str:
    """The corpus bundled with the package (tests read only the repo)."""
    packed = importlib.resources.files("gpt2cli.assets").joinpath("shakespeare.txt.gz").read_bytes()
    return gzip.decompress(packed).decode("utf-8")


@pytest.fixture(scope="module")
def tokens():  # -> TokenData (imported lazily: conftest loads before any test needs torch)
    """About 5,000 tokens of the bundled corpus, the last 600 held out: enough for tiny in-process trainers."""
    import numpy as np

    from gpt2cli import get_tokenizer
    from gpt2cli.data.inputs import TokenData

    ids = np.array(get_tokenizer().encode(shakespeare_text()[:20_000]), dtype=np.uint16)
    return TokenData(train=[ids[:-600]], val=[ids[-600:]], sources=["shakespeare"])


@pytest.fixture
def one_thread():
    """One CPU thread for bit-for-bit comparisons (see exact_environment)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for CLI calls, without settings leaking in from the developer's shell."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GPT2_")}
    env.update(extra)
    return env


def run_cli(
    *args: str | os.PathLike[str],
    input: bytes | str | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """`gpt2 ARGS` called in this process (`gpt2cli.cli.app.run`), as `run_cli_process` would see it: the same exit
    code, stdout and stderr as bytes. Saves the ~1-2 s of imports a fresh interpreter pays on every call."""
    from gpt2cli.cli.app import run

    argv = [str(arg) for arg in args]
    stdin = input.encode() if isinstance(input, str) else (input or b"")
    stdout, stderr = io.BytesIO(), io.BytesIO()
    with _process_like(env if env is not None else cli_env(), cwd, stdin, stdout, stderr):
        try:
            code = run(argv)
        except SystemExit as exit_:  # what the interpreter would turn into an exit status
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:  # GPT2_DEBUG=1 re-raises: a process would print the traceback and exit 1
            traceback.print_exc(file=sys.stderr)
            code = 1
    return subprocess.CompletedProcess(["gpt2", *argv], code, stdout.getvalue(), stderr.getvalue())


def run_cli_process(
    *args: str | os.PathLike[str],
    input: bytes | str | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """`python -m gpt2cli ARGS` as a real process, for tests where the process boundary is the behaviour."""
    if isinstance(input, str):
        input = input.encode()
    return subprocess.run(
        [sys.executable, "-m", "gpt2cli", *map(str, args)],
        input=input if input is not None else b"",
        capture_output=True,
        env=env if env is not None else cli_env(),
        cwd=cwd,
        timeout=300,
    )


@contextmanager
def _process_like(
    env: dict[str, str], cwd: str | os.PathLike[str] | None, stdin: bytes, stdout: io.BytesIO, stderr: io.BytesIO
) -> Iterator[None]:
    """What a fresh process would give one CLI call, all restored afterwards."""
    with ExitStack() as stack:
        stack.enter_context(_standard_streams(stdin, stdout, stderr))
        stack.enter_context(_environment(env))
        stack.enter_context(_thread_count(env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS")))
        stack.enter_context(_import_path([entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]))
        stack.enter_context(_signal_handlers())
        stack.enter_context(_printed_warnings())
        stack.enter_context(_working_folder(cwd))
        yield


@contextmanager
def _standard_streams(stdin: bytes, stdout: io.BytesIO, stderr: io.BytesIO) -> Iterator[None]:
    """Pipes, as a process has them: text streams with `.buffer` for binary data, no terminal (`isatty()` false).
    The Rich console is cached with the stderr it first saw, so it is dropped on the way in and out."""
    from gpt2cli.cli.output import stderr_console

    saved = sys.stdin, sys.stdout, sys.stderr
    streams = (
        io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"),
        io.TextIOWrapper(stdout, encoding="utf-8", write_through=True),
        io.TextIOWrapper(stderr, encoding="utf-8", errors="backslashreplace", write_through=True),
    )
    sys.stdin, sys.stdout, sys.stderr = streams
    stderr_console.cache_clear()
    try:
        yield
    finally:
        for stream in streams:
            stream.flush()
            stream.detach()  # keeps the captured bytes readable once the wrapper is collected
        sys.stdin, sys.stdout, sys.stderr = saved
        stderr_console.cache_clear()


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """`env` replaces os.environ, as it would a child's environment (tests pass full ones, built by cli_env)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def _thread_count(threads: str | None) -> Iterator[None]:
    """OMP_NUM_THREADS is read once, when torch starts: in this process it becomes torch.set_num_threads."""
    if not threads:
        yield
        return
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextmanager
def _import_path(entries: list[str]) -> Iterator[None]:
    """PYTHONPATH at start-up: modules and entry points (plugins) are found there. Modules imported from there are
    forgotten afterwards, so a plugin of the same name in another test's folder is imported afresh."""
    if not entries:
        yield
        return
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    sys.path[:0] = entries
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if any(origin.startswith(entry) for entry in entries):
                del sys.modules[name]
        importlib.invalidate_caches()


@contextmanager
def _signal_handlers() -> Iterator[None]:
    """A command that installs a handler (train's Ctrl-C) must not leave it behind for the next test."""
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


@contextmanager
def _printed_warnings() -> Iterator[None]:
    """Warnings printed on stderr under a fresh interpreter's filters (the Python docs' "Default Warning Filter"),
    where pytest would record them instead; catch_warnings also resets which were already shown."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        warnings.showwarning = _print_warning
        yield


def _print_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextmanager
def _working_folder(cwd: str | os.PathLike[str] | None) -> Iterator[None]:
    saved = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved)


def assert_one_line_error(result: subprocess.CompletedProcess[bytes], code: int, *fragments: str) -> str:
    """A failure rendered as the CLI promises: the exit code, one `gpt2: error:` line, no traceback."""
    stderr = result.stderr.decode()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert result.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("gpt2: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr
    return lines[0]


def write_corpus(folder: Path) -> Path:
    """120 kB of the bundled Shakespeare as a training text file."""
    path = folder / "corpus.txt"
    path.write_text(shakespeare_text()[:120_000])
    return path


def exact_environment(folder: Path) -> dict[str, str]:
    """One thread and a private token cache: multi-threaded CPU kernels can round differently when the machine is
    busy (CI runs tests beside other work), and the tests using this compare losses bit for bit or to 1e-6."""
    return cli_env(GPT2_DATA__CACHE_DIR=str(folder / "cache"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path)


@pytest.fixture
def exact_env(tmp_path: Path) -> dict[str, str]:
    return exact_environment(tmp_path)


def build_hf_model(root: Path, seed: int = 0, **shape: int):
    """A random-weight transformers GPT2LMHeadModel saved with save_pretrained under `root`: (model, folder)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=shape.get("vocab_size", 50257),
        n_positions=shape.get("n_positions", 64),
        n_embd=shape.get("n_embd", 64),
        n_layer=shape.get("n_layer", 2),
        n_head=shape.get("n_head", 4),
    )
    model = GPT2LMHeadModel(config).eval()
    folder = root / f"hf-{seed}-{'-'.join(f'{k}{v}' for k, v in sorted(shape.items()))}"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture
def hf_model_factory(tmp_path: Path):
    """Build a random-weight transformers model in this test's folder (the test may change its files)."""
    return lambda seed=0, **shape: build_hf_model(tmp_path, seed, **shape)


@pytest.fixture(scope="session")
def shared_hf_model_factory(tmp_path_factory: pytest.TempPathFactory):
    """The same, built once per shape for the whole session, for tests that only read the model and its folder."""
    root, built = tmp_path_factory.mktemp("shared-hf"), {}

    def build(seed: int = 0, **shape: int):
        key = (seed, *sorted(shape.items()))
        if key not in built:
            built[key] = build_hf_model(root, seed, **shape)
        return built[key]

    return build


def biased_model(path: Path, tokens: set[int], block_size: int = 64, metadata: dict[str, str] | None = None) -> Path:
    """A tiny model whose every prediction strongly favours `tokens`: a constant final hidden state (LayerNorm gain
    zero, bias fixed) aligned with those tokens' embeddings, so their logits dwarf the others'. `metadata`: more
    safetensors metadata (a chat template)."""
    import torch

    from gpt2cli import save_model
    from gpt2cli.model.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=block_size))
    with torch.no_grad():
        direction = torch.ones(16) / 4.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        for token in tokens:
            model.transformer.wte.weight[token] = direction * 40.0
    return save_model(model, path, metadata=metadata)
