"""Optional extras: imported only by the command that needs them, with the exact `pip install` when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from gpt2cli.errors import UsageError


def import_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module` from the optional extra `extra`; a missing one is a usage error naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{purpose} needs the {extra} extra: pip install 'gpt2cli[{extra}]'") from None
