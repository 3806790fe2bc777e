"""Model checkpoints: one safetensors file with Hugging Face `GPT2LMHeadModel` names and layout.

Our file is a valid transformers checkpoint, and we read transformers' own files and folders.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gpt2cli import __version__
from gpt2cli.errors import CheckpointError, ConfigError, UsageError
from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.runtime.files import atomic_path, atomic_write_bytes

CONFIG_METADATA_KEY = "gpt2cli.config"
VERSION_METADATA_KEY = "gpt2cli.version"
WEIGHTS_NAME = "model.safetensors"
# transformers' Conv1D stores these as [in, out]; our nn.Linear holds [out, in].
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers that old transformers versions saved with the weights.
_MASK_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP/FSDP wrappers
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _is_conv1d(name: str) -> bool:
    return name.startswith("transformer.h.") and name.endswith(CONV1D_WEIGHTS)


def unwrap(model: torch.nn.Module) -> GPT2:
    """The GPT2 inside torch.compile / DDP wrappers."""
    while not isinstance(model, GPT2):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"expected a GPT2 model, got {type(model).__name__}")
        model = inner
    return model


# ---------------------------------------------------------------- state dict <-> file layout


def to_checkpoint_tensors(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names and layout (tied lm_head stored once)."""
    return checkpoint_layout(unwrap(model).state_dict(), dtype)


def checkpoint_layout(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A GPT2 state dict under transformers' names and layout, on the CPU (tied lm_head stored once)."""
    tensors = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach()
        if _is_conv1d(name):
            tensor = tensor.t()
        if dtype is not None:
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous().cpu()
    return tensors


def normalize_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept unprefixed (`h.0...`), compiled (`_orig_mod.`) and wrapped (`module.`) names."""
    normalized = {}
    for name, tensor in tensors.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix) :], True
        if not name.startswith("transformer.") and name != "lm_head.weight":
            name = "transformer." + name
        if _MASK_BUFFER.match(name):
            continue
        normalized[name] = tensor
    return normalized


def from_checkpoint_tensors(
    tensors: dict[str, torch.Tensor], config: GPT2Config, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Check names and shapes against `config` and return a state dict for `GPT2`."""
    tensors = normalize_names(tensors)
    lm_head = tensors.pop("lm_head.weight", None)
    expected = {name: tuple(shape) for name, shape in _expected_shapes(config).items() if name != "lm_head.weight"}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensors: {_summarize(missing)}")
    if extra:
        raise CheckpointError(f"{source}: unexpected tensors: {_summarize(extra)}")
    state = {}
    for name, tensor in tensors.items():
        if _is_conv1d(name):
            tensor = tensor.t()
        if tuple(tensor.shape) != expected[name]:
            shape = tuple(tensor.t().shape) if _is_conv1d(name) else tuple(tensor.shape)
            want = tuple(reversed(expected[name])) if _is_conv1d(name) else expected[name]
            raise CheckpointError(f"{source}: tensor {name} has shape {list(shape)} but the config needs {list(want)}")
        state[name] = tensor
    if lm_head is not None and not torch.equal(
        lm_head.to(state["transformer.wte.weight"].dtype), state["transformer.wte.weight"]
    ):
        raise CheckpointError(f"{source}: lm_head.weight differs from transformer.wte.weight; GPT-2 ties them")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def _expected_shapes(config: GPT2Config) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {name: tensor.shape for name, tensor in GPT2(config).state_dict().items()}


def _summarize(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------- transformers' config.json


def hf_config_dict(config: GPT2Config) -> dict[str, Any]:
    """A transformers `GPT2Config` as the dict `config.json` holds."""
    if not config.bias:
        raise ConfigError("a model without biases has no transformers GPT2 equivalent")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    }


def config_from_hf(values: dict[str, Any], source: str = "config.json") -> GPT2Config:
    """Our config from transformers' `config.json`, refusing variants our model does not implement."""
    model_type = values.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise CheckpointError(f"{source}: model_type {model_type!r} is not GPT-2")
    unsupported = {
        "activation_function": (values.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": values.get("n_inner") not in (None, 4 * values.get("n_embd", 768)),
        "scale_attn_weights": values.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": bool(values.get("scale_attn_by_inverse_layer_idx", False)),
        "reorder_and_upcast_attn": bool(values.get("reorder_and_upcast_attn", False)),
        "tie_word_embeddings": values.get("tie_word_embeddings", True) is not True,
        "add_cross_attention": bool(values.get("add_cross_attention", False)),
    }
    bad = [f"{key}={values.get(key)!r}" for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise CheckpointError(f"{source}: unsupported GPT-2 variant ({', '.join(bad)})")
    try:
        return GPT2Config(
            block_size=int(values.get("n_positions", values.get("n_ctx", 1024))),
            vocab_size=int(values.get("vocab_size", 50257)),
            n_layer=int(values.get("n_layer", 12)),
            n_head=int(values.get("n_head", 12)),
            n_embd=int(values.get("n_embd", 768)),
            layer_norm_eps=float(values.get("layer_norm_epsilon", 1e-5)),
            dropout=0.0,  # dropout is a training choice, not a property of the weights
        )
    except ConfigError as error:
        raise CheckpointError(f"{source}: {error}") from None


# ---------------------------------------------------------------- reading files


def _check_safetensors_file(path: Path) -> None:
    """Explain a file that is not safetensors, or is cut short, before the library's own error would."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file")
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header)")
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_size + max(ends, default=0)
    if size < expected:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} of {expected} bytes)")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of one safetensors file."""
    _check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as error:  # the library raises its own exception types
        raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from None
    return tensors, metadata


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise CheckpointError(f"{path}: not a loadable PyTorch weights file ({str(error).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return state


def _read_config_json(path: Path) -> GPT2Config:
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable config ({error})") from None
    return config_from_hf(values, source=str(path))


def _locate(path: Path) -> tuple[list[Path], Path | None]:
    """The weight files and the config.json (if any) that `path` stands for."""
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    if path.is_file():
        config_json = path.parent / "config.json"
        return [path], config_json if config_json.is_file() else None
    config_json = path / "config.json"
    config = config_json if config_json.is_file() else None
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME], config
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{index}: unreadable shard index ({error})") from None
        return [path / name for name in sorted(set(weight_map.values()))], config
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"], config
    raise CheckpointError(
        f"{path}: no {WEIGHTS_NAME}, model.safetensors.index.json or pytorch_model.bin in this folder"
    )


def weight_files(path: str | Path) -> list[Path]:
    """The files holding the weights of anything `load_model` accepts (what identifies a model's content)."""
    return _locate(Path(path))[0]


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], GPT2Config]:
    """The raw tensors (file layout) and config of anything `load_model` accepts."""
    path = Path(path)
    weight_files, config_json = _locate(path)
    tensors: dict[str, torch.Tensor] = {}
    config: GPT2Config | None = None
    for weight_file in weight_files:
        if not weight_file.is_file():
            raise CheckpointError(f"{weight_file}: missing shard")
        if weight_file.suffix == ".safetensors":
            file_tensors, metadata = read_safetensors(weight_file)
            if CONFIG_METADATA_KEY in metadata and config is None:
                try:
                    config = GPT2Config.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
                except (json.JSONDecodeError, TypeError, ConfigError) as error:
                    raise CheckpointError(f"{weight_file}: bad {CONFIG_METADATA_KEY} metadata ({error})") from None
        else:
            file_tensors = _read_torch_file(weight_file)
        tensors.update(file_tensors)
    if config is None:
        if config_json is None:
            raise CheckpointError(f"{path}: no model config (neither gpt2cli metadata nor a config.json beside it)")
        config = _read_config_json(config_json)
    return tensors, config


def load_model(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> GPT2:
    """A `GPT2` in eval mode from our file, a run folder, or a transformers file or folder.

    `dtype` defaults to the stored one; `device` to the CPU.
    """
    tensors, config = read_checkpoint(path)
    state = from_checkpoint_tensors(tensors, config, source=str(path))
    with torch.device("meta"):  # skip the random init: every weight is about to be replaced
        model = GPT2(config)
    if dtype is None:
        dtype = state["transformer.wte.weight"].dtype
    # Fresh contiguous copies: Conv1D weights arrive transposed (views), and a parameter left as a strided view of
    # the file's buffer computes (and updates) differently from one the model allocated itself.
    state = {
        name: torch.empty(tensor.shape, dtype=dtype, device=device or "cpu").copy_(tensor)
        for name, tensor in state.items()
    }
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model.eval()


def save_model(
    model: torch.nn.Module,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `model` as one safetensors file, atomically; returns the path written."""
    gpt2 = unwrap(model)
    return write_checkpoint(to_checkpoint_tensors(gpt2, dtype), gpt2.config, path, metadata=metadata)


def write_checkpoint(
    tensors: dict[str, torch.Tensor], config: GPT2Config, path: str | Path, *, metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors already in the file layout (`checkpoint_layout`) with the config in the metadata."""
    path = Path(path)
    full_metadata = {
        "format": "pt",
        CONFIG_METADATA_KEY: json.dumps(config.to_dict()),
        VERSION_METADATA_KEY: __version__,
        **(metadata or {}),
    }
    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=full_metadata)
    return path


def write_hf_config(config: GPT2Config, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `config.json` (atomically) so transformers' `from_pretrained(folder)` can read our weights file;
    `dtype`: the weights' dtype, recorded as `torch_dtype` where it is known."""
    values = hf_config_dict(config)
    if dtype is not None:
        values["torch_dtype"] = str(dtype).removeprefix("torch.")
    path = Path(folder) / "config.json"
    atomic_write_bytes(path, (json.dumps(values, indent=2) + "\n").encode())
    return path
