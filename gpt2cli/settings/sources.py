"""Configuration files: TOML with one table per settings section, or the seed project's YAML mapped onto them."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpt2cli.errors import UsageError

# The seed project's YAML: (section, key) -> (our section, our field).
_SEED_YAML_KEYS: dict[tuple[str, str], tuple[str, str]] = {
    ("model", "block_size"): ("model", "block_size"),
    ("model", "vocab_size"): ("model", "vocab_size"),
    ("model", "n_layer"): ("model", "n_layer"),
    ("model", "n_head"): ("model", "n_head"),
    ("model", "n_embd"): ("model", "n_embd"),
    ("training", "num_epochs"): ("train", "epochs"),
    ("training", "batch_size"): ("train", "batch_size"),
    ("training", "sequence_length"): ("train", "seq_len"),
    ("training", "learning_rate"): ("train", "lr"),
    ("training", "device"): ("train", "device"),
    ("data", "input_file"): ("data", "paths"),
    ("logging", "log_interval"): ("train", "log_interval"),
    ("logging", "save_interval"): ("train", "save_interval"),
    ("logging", "model_save_path"): ("train", "out"),
}


def _map_seed_yaml(raw: Mapping[str, Any], path: Path) -> dict[str, Any]:
    mapped: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if not isinstance(values, Mapping):
            raise UsageError(f"{path}: section {section!r} must be a mapping")
        for key, value in values.items():
            target = _SEED_YAML_KEYS.get((section, key))
            if target is None:
                raise UsageError(f"{path}: unknown key {section}.{key}")
            if target == ("data", "paths"):
                value = [value]
            elif target == ("train", "out") and isinstance(value, str) and Path(value).suffix:
                value = str(Path(value).with_suffix(""))  # a weights file name becomes its run folder
            mapped.setdefault(target[0], {})[target[1]] = value
    return mapped


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The values of a TOML file, or of the seed project's YAML file mapped onto our sections."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise UsageError(f"{path}: invalid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(raw, Mapping):
            raise UsageError(f"{path}: expected a mapping of sections")
        return _map_seed_yaml(raw, path)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{path}: invalid TOML ({error})") from None
