"""The domain errors of gpt2cli: raised by the core, rendered as one line by the CLI."""

from __future__ import annotations


class Gpt2Error(Exception):
    """A failure the user can act on; the CLI prints its message alone and exits with `exit_code`."""

    exit_code = 1


class UsageError(Gpt2Error, ValueError):
    """Invalid settings, arguments or paths: the command was asked for something it cannot do."""

    exit_code = 2


class ConfigError(UsageError):
    """A model shape or configuration that cannot work."""


class CheckpointError(Gpt2Error):
    """A checkpoint that cannot be read or does not match its model."""


class DataError(Gpt2Error):
    """Input data that cannot be read, decoded or tokenized."""


class ChatTemplateError(UsageError):
    """A chat template that cannot be compiled or rendered, or messages it cannot render."""
