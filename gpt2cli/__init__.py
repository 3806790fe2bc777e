"""gpt2cli: train, sample, evaluate, convert and benchmark GPT-2 from one command.

The public API is imported lazily so that `import gpt2cli` (and `gpt2 --help`) stays fast:
torch is loaded only when a model-facing name is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["GPT2", "GPT2Config", "__version__", "get_tokenizer", "load_model", "save_model", "train"]

_LAZY = {
    "GPT2": "gpt2cli.model.gpt2",
    "GPT2Config": "gpt2cli.model.gpt2",
    "load_model": "gpt2cli.formats.checkpoint",
    "save_model": "gpt2cli.formats.checkpoint",
    "get_tokenizer": "gpt2cli.data.tokenizer",
    "train": "gpt2cli.training.run",
}

if TYPE_CHECKING:
    from gpt2cli.data.tokenizer import get_tokenizer
    from gpt2cli.formats.checkpoint import load_model, save_model
    from gpt2cli.model.gpt2 import GPT2, GPT2Config
    from gpt2cli.training.run import train


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'gpt2cli' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
