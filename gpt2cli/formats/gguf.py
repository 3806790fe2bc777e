"""Export to GGUF, llama.cpp's model file: its GPT-2 tensor names, the tokenizer, f32, f16 or q8_0 weights.

Needs the optional `gguf` package (`pip install 'gpt2cli[gguf]'`), imported only when a GGUF file is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gpt2cli.data.tokenizer import EOT_ID
from gpt2cli.errors import UsageError
from gpt2cli.formats.tokenizer_files import vocabulary_and_merges
from gpt2cli.model.gpt2 import GPT2
from gpt2cli.runtime.extras import import_extra

GGUF_TYPES = ("f32", "f16", "q8_0")


def _gguf_tensors(model: GPT2) -> Iterator[tuple[str, np.ndarray]]:
    """llama.cpp's GPT-2 tensor names, weights as [out, in] float32 arrays."""
    state = {name: t.detach().float().cpu().numpy() for name, t in model.state_dict().items()}
    yield "token_embd.weight", state["transformer.wte.weight"]
    yield "position_embd.weight", state["transformer.wpe.weight"]
    names = {
        "ln_1": "attn_norm",
        "attn.c_attn": "attn_qkv",
        "attn.c_proj": "attn_output",
        "ln_2": "ffn_norm",
        "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down",
    }
    for layer in range(model.config.n_layer):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                yield f"blk.{layer}.{theirs}.{kind}", state[f"transformer.h.{layer}.{ours}.{kind}"]
    yield "output_norm.weight", state["transformer.ln_f.weight"]
    yield "output_norm.bias", state["transformer.ln_f.bias"]
    yield "output.weight", state["transformer.wte.weight"]


def write_gguf(model: GPT2, path: Path, quant: str) -> None:
    gguf = import_extra("gguf", "gguf", "writing GGUF")
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
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
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
