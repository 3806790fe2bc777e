"""llm.c's model file (`gpt2_124M.bin`, as its train_gpt2.py writes it): read into and write from our tensors.

A header of 256 int32 (magic 20240326, version 3 for float32 or 5 for bfloat16, then the shape), followed by every
parameter in llm.c's order, layers stacked, weights in nn.Linear's [out, in] layout, the vocabulary padded to 128.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from gpt2cli.errors import CheckpointError, UsageError
from gpt2cli.formats.checkpoint import CONV1D_WEIGHTS
from gpt2cli.model.gpt2 import GPT2, GPT2Config

LLMC_MAGIC = 20240326
LLMC_VERSIONS = {3: torch.float32, 5: torch.bfloat16}
LLMC_HEADER_INTS = 256
LLMC_VOCAB_MULTIPLE = 128


def _llmc_layout(config: GPT2Config, padded_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """llm.c's parameter order and shapes (nn.Linear layout), as written by its train_gpt2.py."""
    L, C, T = config.n_layer, config.n_embd, config.block_size
    return [
        ("wte", (padded_vocab, C)),
        ("wpe", (T, C)),
        ("ln_1.weight", (L, C)),
        ("ln_1.bias", (L, C)),
        ("attn.c_attn.weight", (L, 3 * C, C)),
        ("attn.c_attn.bias", (L, 3 * C)),
        ("attn.c_proj.weight", (L, C, C)),
        ("attn.c_proj.bias", (L, C)),
        ("ln_2.weight", (L, C)),
        ("ln_2.bias", (L, C)),
        ("mlp.c_fc.weight", (L, 4 * C, C)),
        ("mlp.c_fc.bias", (L, 4 * C)),
        ("mlp.c_proj.weight", (L, C, 4 * C)),
        ("mlp.c_proj.bias", (L, C)),
        ("ln_f.weight", (C,)),
        ("ln_f.bias", (C,)),
    ]


def read_llmc(path: Path) -> tuple[dict[str, torch.Tensor], GPT2Config]:
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
        warnings.warn(
            f"{path}: the padded vocabulary rows {vocab}..{padded - 1} are not zero; they are dropped", stacklevel=2
        )
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


def write_llmc(model: GPT2, path: Path, dtype: torch.dtype | None) -> None:
    dtype = dtype or torch.float32
    version = {v: k for k, v in LLMC_VERSIONS.items()}.get(dtype)
    if version is None:
        raise UsageError("llm.c model files hold float32 or bfloat16 weights; use --dtype float32 or bfloat16")
    config = model.config
    padded = -(-config.vocab_size // LLMC_VOCAB_MULTIPLE) * LLMC_VOCAB_MULTIPLE
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[:8] = (
        LLMC_MAGIC,
        version,
        config.block_size,
        config.vocab_size,
        config.n_layer,
        config.n_head,
        config.n_embd,
        padded,
    )
    state = {name: tensor.to(dtype).detach() for name, tensor in model.state_dict().items()}
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
