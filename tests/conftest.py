"""Shared fixtures: the real CLI in a subprocess, the bundled corpus, and random-weight transformers models."""

from __future__ import annotations

import gzip
import importlib.resources
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


@cache
def shakespeare_text() -> str:
    """The corpus bundled with the package (tests read only the repo)."""
    packed = importlib.resources.files("gpt2cli.assets").joinpath("shakespeare.txt.gz").read_bytes()
    return gzip.decompress(packed).decode("utf-8")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for CLI subprocesses, without settings leaking in from the developer's shell."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GPT2_")}
    env.update(extra)
    return env


def run_cli(
    *args: str | os.PathLike[str],
    input: bytes | str | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """`python -m gpt2cli ARGS` as a real process; stdout and stderr captured as bytes."""
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


@pytest.fixture
def hf_model_factory(tmp_path: Path):
    """Build a random-weight transformers GPT2LMHeadModel, save it with save_pretrained, return (model, dir)."""

    def build(seed: int = 0, **shape: int):
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
        folder = tmp_path / f"hf-{seed}-{'-'.join(f'{k}{v}' for k, v in sorted(shape.items()))}"
        model.save_pretrained(folder)
        return model, folder

    return build


def biased_model(path: Path, tokens: set[int], block_size: int = 64) -> Path:
    """A tiny model whose every prediction strongly favours `tokens`: a constant final hidden state (LayerNorm gain
    zero, bias fixed) aligned with those tokens' embeddings, so their logits dwarf the others'."""
    import torch

    from gpt2cli import save_model
    from gpt2cli.model import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=block_size))
    with torch.no_grad():
        direction = torch.ones(16) / 4.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        for token in tokens:
            model.transformer.wte.weight[token] = direction * 40.0
    return save_model(model, path)
