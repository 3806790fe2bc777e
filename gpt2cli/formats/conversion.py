"""Checkpoint conversion between our format, transformers, nanoGPT, llm.c and GGUF (llama.cpp).

Every source is read into a `GPT2` (which checks names and shapes against the config), then written in the target
layout. Targets are written under a temporary name and moved into place only when complete.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt2cli.data.tokenizer import EOT_ID
from gpt2cli.errors import CheckpointError, UsageError
from gpt2cli.formats.chat_template import ChatTemplate, chat_template_metadata, read_chat_template
from gpt2cli.formats.checkpoint import (
    CONV1D_WEIGHTS,
    WEIGHTS_NAME,
    from_checkpoint_tensors,
    read_checkpoint,
    save_model,
    write_hf_config,
)
from gpt2cli.formats.gguf import GGUF_TYPES, write_gguf
from gpt2cli.formats.llmc import LLMC_MAGIC, read_llmc, write_llmc
from gpt2cli.formats.tokenizer_files import write_tokenizer_files
from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.runtime.files import flush_to_disk, storage_errors, temporary_sibling

SOURCE_FORMATS = ("native", "hf", "nanogpt", "llmc")
TARGET_FORMATS = ("native", "hf", "llmc", "gguf")


# ---------------------------------------------------------------- detection


def detect_format(path: Path) -> str:
    """The source format, from the content (not only the name)."""
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        if (path / WEIGHTS_NAME).is_file():
            return "native"
        raise CheckpointError(f"{path}: a folder without config.json or {WEIGHTS_NAME}: not a checkpoint folder")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if len(head) >= 4 and struct.unpack("<i", head[:4])[0] == LLMC_MAGIC:
        return "llmc"
    if head[:4] == b"GGUF":
        raise UsageError(f"{path}: a GGUF file; reading GGUF is not supported (it is an export format here)")
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip, or a bare pickle
        return "nanogpt" if _looks_like_nanogpt(path) else "hf"
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: 8-byte length, then the JSON header
        return "native"
    raise CheckpointError(
        f"{path}: unknown format (first bytes {head[:8].hex(' ')}); expected safetensors, a transformers folder, "
        f"a nanoGPT ckpt.pt or an llm.c model .bin"
    )


def _load_pickle(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).split("\n")[0]
        raise CheckpointError(
            f"{path}: refused: the pickle holds more than tensors and plain values ({reason})"
        ) from None
    except Exception as error:
        raise CheckpointError(f"{path}: unreadable PyTorch file ({str(error).splitlines()[0]})") from None


def _looks_like_nanogpt(path: Path) -> bool:
    content = _load_pickle(path)
    return isinstance(content, dict) and "model" in content and "model_args" in content


# ---------------------------------------------------------------- reading


@dataclass
class Loaded:
    model: GPT2
    source_format: str
    dtype: torch.dtype


def load_any(path: Path, source_format: str = "auto") -> Loaded:
    fmt = detect_format(path) if source_format == "auto" else source_format
    if fmt in ("native", "hf"):
        tensors, config = read_checkpoint(path)
    elif fmt == "nanogpt":
        tensors, config = _read_nanogpt(path)
    elif fmt == "llmc":
        tensors, config = read_llmc(path)
    else:
        raise UsageError(f"--from {fmt}: choose one of {', '.join(SOURCE_FORMATS)}")
    state = from_checkpoint_tensors(tensors, config, source=str(path))
    dtype = state["transformer.wte.weight"].dtype
    with torch.device("meta"):
        model = GPT2(config)
    model.load_state_dict({k: v.to(dtype).contiguous().clone() for k, v in state.items()}, assign=True)
    model.tie_weights()
    return Loaded(model.eval(), fmt, dtype)


def _read_nanogpt(path: Path) -> tuple[dict[str, torch.Tensor], GPT2Config]:
    content = _load_pickle(path)
    if not isinstance(content, dict) or "model" not in content or "model_args" not in content:
        raise CheckpointError(f"{path}: not a nanoGPT checkpoint (expected the keys 'model' and 'model_args')")
    args = content["model_args"]
    known = {"n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "dropout"}
    try:
        config = GPT2Config(**{key: value for key, value in args.items() if key in known})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: bad model_args ({error})") from None
    tensors = {}
    for name, tensor in content["model"].items():
        name = name.removeprefix("_orig_mod.").removeprefix("module.")
        if name.startswith("transformer.h.") and name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()  # nanoGPT's nn.Linear [out, in] -> transformers' Conv1D [in, out]
        tensors[name] = tensor
    return tensors, config


# ---------------------------------------------------------------- writing


def _write_hf(model: GPT2, folder: Path, dtype: torch.dtype | None, template: ChatTemplate | None) -> None:
    folder.mkdir()
    save_model(model, folder / WEIGHTS_NAME, dtype=dtype, metadata=chat_template_metadata(template))
    write_hf_config(model.config, folder, dtype or model.transformer.wte.weight.dtype)
    generation = {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer_files(folder, model.config.block_size, template.source if template is not None else None)


def target_format(destination: Path, requested: str | None) -> str:
    if requested is not None:
        if requested not in TARGET_FORMATS:
            raise UsageError(f"--to {requested}: choose one of {', '.join(TARGET_FORMATS)}")
        return requested
    suffix = destination.suffix.lower()
    if suffix == ".safetensors":
        return "native"
    if suffix == ".bin":
        return "llmc"
    if suffix == ".gguf":
        return "gguf"
    if suffix == "":
        return "hf"
    raise UsageError(f"{destination}: cannot tell the target format from '{suffix}'; give --to")


@dataclass
class ConversionSummary:
    source: str
    source_format: str
    destination: str
    target_format: str
    parameters: int
    dtype: str
    tensors: int
    bytes: int
    chat_template: str | None  # "default", the template's file, "from SRC", or None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def convert(
    source: Path,
    destination: Path,
    source_format: str = "auto",
    to: str | None = None,
    dtype: torch.dtype | None = None,
    quant: str | None = None,
    force: bool = False,
    chat_template: str | Path | None = None,
) -> ConversionSummary:
    """Convert `source` to `destination`; nothing is left at `destination` after an error.

    The chat template `source` carries goes along to native and transformers targets; `chat_template` (a file or
    "default") attaches another one. llm.c and GGUF files have no place for ours.
    """
    fmt = target_format(destination, to)
    template = ChatTemplate.from_option(chat_template) if chat_template is not None else None
    if template is not None and fmt in ("llmc", "gguf"):
        raise UsageError(f"--chat-template: {fmt} files cannot carry a chat template (convert to native or hf)")
    if destination.exists() and not force:
        raise UsageError(f"{destination} exists; use --force to replace it")
    if not destination.parent.is_dir():
        raise UsageError(f"{destination.parent}: folder does not exist")
    loaded = load_any(source, source_format)
    model = loaded.model
    template_origin = None if template is None else "default" if str(chat_template) == "default" else str(chat_template)
    if template is None and fmt in ("native", "hf") and loaded.source_format in ("native", "hf"):
        template = read_chat_template(source)
        template_origin = None if template is None else f"from {source}"
    temporary = temporary_sibling(destination)
    _remove(temporary)
    with storage_errors(str(destination), "nothing was written"):
        _write_converted(model, temporary, destination, fmt, dtype, quant, template)
    written = _size(destination)
    stored = dtype or loaded.dtype
    return ConversionSummary(
        source=str(source),
        source_format=loaded.source_format,
        destination=str(destination),
        target_format=fmt,
        parameters=model.num_parameters(),
        dtype=quant or str(stored).removeprefix("torch."),
        tensors=len(model.state_dict()) - 1,  # the tied output projection is stored once
        bytes=written,
        chat_template=template_origin,
    )


def _write_converted(
    model: GPT2,
    temporary: Path,
    destination: Path,
    fmt: str,
    dtype: torch.dtype | None,
    quant: str | None,
    template: ChatTemplate | None,
) -> None:
    """Write `model` in `fmt` under `temporary`, then move it onto `destination`; on any error, remove it."""
    try:
        if fmt == "native":
            save_model(model, temporary, dtype=dtype, metadata=chat_template_metadata(template))
        elif fmt == "hf":
            _write_hf(model, temporary, dtype, template)
        elif fmt == "llmc":
            write_llmc(model, temporary, dtype)
        else:
            gguf_type = quant or {None: "f32", torch.float32: "f32", torch.float16: "f16"}.get(dtype)
            if gguf_type not in GGUF_TYPES:
                raise UsageError("GGUF holds f32, f16 or q8_0 here: use --dtype float32|float16 or --quant q8_0")
            write_gguf(model, temporary, gguf_type)
        for path in [temporary] if temporary.is_file() else sorted(temporary.rglob("*")):
            if path.is_file():
                flush_to_disk(path)  # a full disk can show only here: before DST changes
        _replace(temporary, destination)
    except BaseException:
        _remove(temporary)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _replace(temporary: Path, destination: Path) -> None:
    if destination.is_dir():  # a folder cannot be replaced in one step: move the old one aside first
        old = temporary_sibling(destination).with_suffix(".old")
        os.replace(destination, old)
        os.replace(temporary, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, destination)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
