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
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2cli.checkpoint import (
    CONV1D_WEIGHTS,
    WEIGHTS_NAME,
    from_checkpoint_tensors,
    hf_config_dict,
    read_checkpoint,
    save_model,
)
from gpt2cli.errors import CheckpointError, UsageError
from gpt2cli.files import temporary_sibling
from gpt2cli.model import GPT2, GPT2Config
from gpt2cli.tokenizer import EOT_ID, EOT_TEXT, get_tokenizer

LLMC_MAGIC = 20240326
LLMC_VERSIONS = {3: torch.float32, 5: torch.bfloat16}
LLMC_HEADER_INTS = 256
LLMC_VOCAB_MULTIPLE = 128
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
        tensors, config = _read_llmc(path)
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


def _llmc_layout(config: GPT2Config, padded_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """llm.c's parameter order and shapes (nn.Linear layout), as written by its train_gpt2.py."""
    L, C, T = config.n_layer, config.n_embd, config.block_size
    return [
        ("wte", (padded_vocab, C)), ("wpe", (T, C)),
        ("ln_1.weight", (L, C)), ("ln_1.bias", (L, C)),
        ("attn.c_attn.weight", (L, 3 * C, C)), ("attn.c_attn.bias", (L, 3 * C)),
        ("attn.c_proj.weight", (L, C, C)), ("attn.c_proj.bias", (L, C)),
        ("ln_2.weight", (L, C)), ("ln_2.bias", (L, C)),
        ("mlp.c_fc.weight", (L, 4 * C, C)), ("mlp.c_fc.bias", (L, 4 * C)),
        ("mlp.c_proj.weight", (L, C, 4 * C)), ("mlp.c_proj.bias", (L, C)),
        ("ln_f.weight", (C,)), ("ln_f.bias", (C,)),
    ]  # fmt: skip


def _read_llmc(path: Path) -> tuple[dict[str, torch.Tensor], GPT2Config]:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header = np.frombuffer(handle.read(LLMC_HEADER_INTS * 4), dtype="<i4")
        if header.size < LLMC_HEADER_INTS:
            raise CheckpointError(f"{path}: truncated llm.c header")
        version = int(header[1])
        if version not in LLMC_VERSIONS:
            raise CheckpointError(f"{path}: llm.c model version {version} (expected 3 for float32 or 5 for bfloat16)")
        max_t, vocab, layers, heads, channels, padded = (int(v) for v in header[2:8])
        try:
            config = GPT2Config(block_size=max_t, vocab_size=vocab, n_layer=layers, n_head=heads, n_embd=channels)
        except ValueError as error:
            raise CheckpointError(f"{path}: bad llm.c header ({error})") from None
        if padded < vocab:
            raise CheckpointError(f"{path}: padded vocabulary {padded} is smaller than the vocabulary {vocab}")
        dtype = LLMC_VERSIONS[version]
        itemsize = 4 if dtype == torch.float32 else 2
        layout = _llmc_layout(config, padded)
        expected = LLMC_HEADER_INTS * 4 + sum(int(np.prod(shape)) for _, shape in layout) * itemsize
        if size != expected:
            raise CheckpointError(f"{path}: {size} bytes, but its header describes {expected} (truncated or corrupt)")
        arrays = {}
        for name, shape in layout:
            count = int(np.prod(shape))
            raw = np.frombuffer(handle.read(count * itemsize), dtype="<f4" if itemsize == 4 else "<u2")
            tensor = torch.from_numpy(raw.copy())
            if itemsize == 2:
                tensor = tensor.view(torch.int16).view(torch.bfloat16)  # bf16 bits
            arrays[name] = tensor.view(shape)
    wte = arrays.pop("wte")
    if padded > vocab and torch.count_nonzero(wte[vocab:]):
        warnings.warn(f"{path}: the padded vocabulary rows {vocab}..{padded - 1} are not zero; they are dropped",
                      stacklevel=2)  # fmt: skip
    tensors = {"transformer.wte.weight": wte[:vocab], "transformer.wpe.weight": arrays.pop("wpe")}
    tensors["transformer.ln_f.weight"] = arrays.pop("ln_f.weight")
    tensors["transformer.ln_f.bias"] = arrays.pop("ln_f.bias")
    for name, stacked in arrays.items():
        for layer in range(layers):
            tensor = stacked[layer]
            if name in CONV1D_WEIGHTS:
                tensor = tensor.t()  # llm.c's [out, in] -> transformers' Conv1D [in, out]
            tensors[f"transformer.h.{layer}.{name}"] = tensor
    return tensors, config


# ---------------------------------------------------------------- the GPT-2 tokenizer as transformers and GGUF files


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (as its original encoder.py defines it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _as_text(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[byte] for byte in token)


@cache
def vocabulary_and_merges() -> tuple[list[str], list[tuple[str, str]]]:
    """Token strings by id and the ranked merges, recovered from the bundled tiktoken ranks.

    The merge that creates the token of rank r is the split byte-pair encoding finds using only ranks below r.
    """
    ranks = get_tokenizer().encoding._mergeable_ranks
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    tokens = [_as_text(token) for token, _ in by_rank] + [EOT_TEXT]
    merges = []
    for token, rank in by_rank:
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min(
                (ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)
            )  # lowest-ranked adjacent pair below this token's own rank
            if best[0] >= rank:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise CheckpointError(f"cannot recover the merge for token {rank}")
        merges.append((_as_text(parts[0]), _as_text(parts[1])))
    return tokens, merges


def write_tokenizer_files(folder: Path, context: int) -> None:
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json for transformers' GPT-2 tokenizer."""
    tokens, merges = vocabulary_and_merges()
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {**special, "tokenizer_class": "GPT2Tokenizer", "model_max_length": context, "add_prefix_space": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------- writing


def _state(model: GPT2, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {name: (t if dtype is None else t.to(dtype)).detach() for name, t in model.state_dict().items()}


def _write_hf(model: GPT2, folder: Path, dtype: torch.dtype | None) -> None:
    folder.mkdir()
    save_model(model, folder / WEIGHTS_NAME, dtype=dtype)
    config = hf_config_dict(model.config)
    config["torch_dtype"] = str(dtype or model.transformer.wte.weight.dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer_files(folder, model.config.block_size)


def _write_llmc(model: GPT2, path: Path, dtype: torch.dtype | None) -> None:
    dtype = dtype or torch.float32
    version = {v: k for k, v in LLMC_VERSIONS.items()}.get(dtype)
    if version is None:
        raise UsageError("llm.c model files hold float32 or bfloat16 weights; use --dtype float32 or bfloat16")
    config = model.config
    padded = -(-config.vocab_size // LLMC_VOCAB_MULTIPLE) * LLMC_VOCAB_MULTIPLE
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[:8] = (LLMC_MAGIC, version, config.block_size, config.vocab_size, config.n_layer, config.n_head,
                  config.n_embd, padded)  # fmt: skip
    state = _state(model, dtype)
    with open(path, "wb") as handle:
        handle.write(header.tobytes())
        for name, _shape in _llmc_layout(config, padded):
            handle.write(_llmc_bytes(_llmc_tensor(state, name, config, padded)))


def _llmc_tensor(state: dict[str, torch.Tensor], name: str, config: GPT2Config, padded: int) -> torch.Tensor:
    if name == "wte":
        wte = state["transformer.wte.weight"]
        return torch.cat([wte, wte.new_zeros(padded - config.vocab_size, config.n_embd)])
    if name == "wpe":
        return state["transformer.wpe.weight"]
    if name.startswith("ln_f"):
        return state[f"transformer.{name}"]
    return torch.stack([state[f"transformer.h.{layer}.{name}"] for layer in range(config.n_layer)])


def _llmc_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.contiguous().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().astype("<i2").tobytes()
    return tensor.numpy().astype("<f4").tobytes()


GGUF_TYPES = ("f32", "f16", "q8_0")


def _gguf_tensors(model: GPT2) -> Iterator[tuple[str, np.ndarray]]:
    """llama.cpp's GPT-2 tensor names, weights as [out, in] float32 arrays."""
    state = {name: t.detach().float().cpu().numpy() for name, t in model.state_dict().items()}
    yield "token_embd.weight", state["transformer.wte.weight"]
    yield "position_embd.weight", state["transformer.wpe.weight"]
    names = {
        "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
        "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
    }  # fmt: skip
    for layer in range(model.config.n_layer):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                yield f"blk.{layer}.{theirs}.{kind}", state[f"transformer.h.{layer}.{ours}.{kind}"]
    yield "output_norm.weight", state["transformer.ln_f.weight"]
    yield "output_norm.bias", state["transformer.ln_f.bias"]
    yield "output.weight", state["transformer.wte.weight"]


def _write_gguf(model: GPT2, path: Path, quant: str) -> None:
    try:
        import gguf
    except ImportError:
        raise UsageError("writing GGUF needs the gguf package: pip install 'gpt2cli[gguf]'") from None
    config = model.config
    if not config.bias:
        raise UsageError("llama.cpp's GPT-2 needs biases; this model has none")
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_name("gpt2cli export")
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}  # fmt: skip
    writer.add_file_type(file_types[quant])
    tokens, merges = vocabulary_and_merges()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    types = [gguf.TokenType.NORMAL] * len(tokens)
    types[EOT_ID] = gguf.TokenType.CONTROL
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in merges])
    writer.add_bos_token_id(EOT_ID)
    writer.add_eos_token_id(EOT_ID)
    for name, array in _gguf_tensors(model):
        if array.ndim == 1 or quant == "f32":  # norms and biases stay float32, as llama.cpp expects
            writer.add_tensor(name, array.astype(np.float32))
        elif quant == "f16" or array.shape[-1] % 32:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


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
) -> ConversionSummary:
    """Convert `source` to `destination`; nothing is left at `destination` after an error."""
    fmt = target_format(destination, to)
    if destination.exists() and not force:
        raise UsageError(f"{destination} exists; use --force to replace it")
    if not destination.parent.is_dir():
        raise UsageError(f"{destination.parent}: folder does not exist")
    loaded = load_any(source, source_format)
    model = loaded.model
    temporary = temporary_sibling(destination)
    _remove(temporary)
    try:
        if fmt == "native":
            save_model(model, temporary, dtype=dtype)
        elif fmt == "hf":
            _write_hf(model, temporary, dtype)
        elif fmt == "llmc":
            _write_llmc(model, temporary, dtype)
        else:
            gguf_type = quant or {None: "f32", torch.float32: "f32", torch.float16: "f16"}.get(dtype)
            if gguf_type not in GGUF_TYPES:
                raise UsageError("GGUF holds f32, f16 or q8_0 here: use --dtype float32|float16 or --quant q8_0")
            _write_gguf(model, temporary, gguf_type)
        _replace(temporary, destination)
    except BaseException:
        _remove(temporary)
        raise
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
    )


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
