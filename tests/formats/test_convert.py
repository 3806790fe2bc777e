"""`gpt2 convert` in every direction, checked against transformers, nanoGPT's layout, llm.c's and GGUF's readers."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, run_cli, shakespeare_text
from gpt2cli import get_tokenizer, load_model, save_model
from gpt2cli.model.gpt2 import GPT2, GPT2Config

SHAPE = GPT2Config(n_layer=2, n_head=4, n_embd=64, block_size=64)
TOKENS = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def native(tmp_path):
    torch.manual_seed(0)
    return save_model(GPT2(SHAPE), tmp_path / "model.safetensors")


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)[0]


def convert(*args):
    result = run_cli("convert", *args)
    assert result.returncode == 0, result.stderr.decode()
    return result


def test_hf_to_native_to_hf_is_exact_and_loads_in_transformers(hf_model_factory, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    reference, folder = hf_model_factory(n_layer=2, n_head=4, n_embd=64, n_positions=64)
    summary = json.loads(convert(folder, tmp_path / "ours.safetensors", "--json").stdout)
    assert (summary["source_format"], summary["target_format"]) == ("hf", "native")
    convert(tmp_path / "ours.safetensors", tmp_path / "back")
    original, back = load_file(folder / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(original) == set(back)
    assert all(torch.equal(original[name], back[name]) for name in original)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, reference(TOKENS).logits)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "back")
    ours = get_tokenizer()
    text = shakespeare_text()[:200_000]
    assert tokenizer.encode(text) == ours.encode(text)
    for edge in ["  runs   of\n\n\n spaces \t\r\n", "emoji 🤖🎉 and ünïcödé", "a<|endoftext|>b", "we'll they're 123"]:
        assert tokenizer.encode(edge) == ours.encode(edge, allow_special=True), edge
    assert {
        "config.json",
        "generation_config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    } <= {p.name for p in (tmp_path / "back").iterdir()}


def _nanogpt_checkpoint(path, model: GPT2, extra=None):
    """A ckpt.pt as nanoGPT's train.py writes it: compiled-model keys, nn.Linear layout, run metadata."""
    state = {f"_orig_mod.{name}": tensor for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint = {
        "model": state,
        "optimizer": optimizer.state_dict(),
        "model_args": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, bias=True, vocab_size=50257, dropout=0.0),
        "iter_num": 5000,
        "best_val_loss": torch.tensor(3.21),
        "config": {"batch_size": 12, "learning_rate": 6e-4, "compile": True, "dataset": "shakespeare"},
        **(extra or {}),
    }
    torch.save(checkpoint, path)
    return path


def test_nanogpt_to_native_gives_the_same_logits(tmp_path):
    torch.manual_seed(1)
    model = GPT2(SHAPE).eval()
    source = _nanogpt_checkpoint(tmp_path / "ckpt.pt", model)
    summary = json.loads(convert(source, tmp_path / "out.safetensors", "--json").stdout)
    assert summary["source_format"] == "nanogpt"
    torch.testing.assert_close(logits_of(load_model(tmp_path / "out.safetensors")), logits_of(model))


def test_pickles_with_objects_are_refused(tmp_path):
    torch.manual_seed(1)
    source = _nanogpt_checkpoint(tmp_path / "ckpt.pt", GPT2(SHAPE), {"saved_at": datetime.datetime(2024, 1, 1)})
    result = run_cli("convert", source, tmp_path / "out.safetensors")
    assert_one_line_error(result, 1, "refused", "more than tensors and plain values")
    assert not (tmp_path / "out.safetensors").exists()


def test_llmc_round_trip_is_exact_in_float32_with_the_right_header(native, tmp_path):
    convert(native, tmp_path / "model.bin")
    header = np.fromfile(tmp_path / "model.bin", dtype="<i4", count=256)
    assert header[:8].tolist() == [20240326, 3, 64, 50257, 2, 4, 64, 50304]  # vocabulary padded to 128s
    per_layer = (
        (2 * 64) + (3 * 64 * 64 + 3 * 64) + (64 * 64 + 64) + (2 * 64) + (4 * 64 * 64 + 4 * 64) + (4 * 64 * 64 + 64)
    )
    parameters = 50304 * 64 + 64 * 64 + 2 * per_layer + 2 * 64  # padded wte, wpe, layers, ln_f
    assert (tmp_path / "model.bin").stat().st_size == 1024 + 4 * parameters
    convert(tmp_path / "model.bin", tmp_path / "back.safetensors")
    original, back = load_model(native).state_dict(), load_model(tmp_path / "back.safetensors").state_dict()
    assert all(torch.equal(original[name], back[name]) for name in original)


def test_llmc_bfloat16_round_trips_within_bf16_rounding(native, tmp_path):
    convert(native, tmp_path / "model.bin", "--dtype", "bfloat16")
    assert np.fromfile(tmp_path / "model.bin", dtype="<i4", count=2)[1] == 5
    convert(tmp_path / "model.bin", tmp_path / "back.safetensors", "--dtype", "float32")
    original, back = load_model(native).state_dict(), load_model(tmp_path / "back.safetensors").state_dict()
    for name in original:
        torch.testing.assert_close(back[name], original[name].to(torch.bfloat16).float(), rtol=0, atol=0)


def test_llmc_nonzero_padding_rows_warn(native, tmp_path):
    convert(native, tmp_path / "model.bin")
    data = bytearray((tmp_path / "model.bin").read_bytes())
    offset = 1024 + 50257 * 64 * 4  # the first padding row of wte
    data[offset : offset + 4] = np.array([1.5], dtype="<f4").tobytes()
    (tmp_path / "padded.bin").write_bytes(bytes(data))
    result = run_cli("convert", tmp_path / "padded.bin", tmp_path / "out.safetensors")
    assert result.returncode == 0 and b"padded vocabulary rows 50257..50303 are not zero" in result.stderr


@pytest.mark.parametrize("quant", [None, "q8_0"])
def test_gguf_reads_back_with_ggufs_reader(native, tmp_path, quant):
    from gguf import GGUFReader

    args = ("--quant", quant) if quant else ()
    convert(native, tmp_path / "model.gguf", *args)
    reader = GGUFReader(tmp_path / "model.gguf")

    def field(name):
        part = reader.fields[name]
        return part.parts[part.data[0]]

    assert bytes(field("general.architecture")).decode() == "gpt2"
    assert int(field("gpt2.block_count")[0]) == 2 and int(field("gpt2.embedding_length")[0]) == 64
    assert int(field("gpt2.context_length")[0]) == 64 and int(field("gpt2.attention.head_count")[0]) == 4
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 50257 and bytes(tokens.parts[tokens.data[50256]]).decode() == "<|endoftext|>"
    assert len(reader.fields["tokenizer.ggml.merges"].data) == 50000
    assert int(field("tokenizer.ggml.eos_token_id")[0]) == 50256
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert len(tensors) == 2 + 2 * 12 + 3
    state = load_model(native).state_dict()
    qkv = tensors["blk.0.attn_qkv.weight"]
    assert list(qkv.shape) == [64, 192]  # ggml lists dimensions innermost first
    if quant is None:
        np.testing.assert_array_equal(qkv.data, state["transformer.h.0.attn.c_attn.weight"].numpy())
        np.testing.assert_array_equal(tensors["token_embd.weight"].data, state["transformer.wte.weight"].numpy())
    else:
        assert qkv.tensor_type.name == "Q8_0"


# ---------------------------------------------------------------- bad input


def test_unknown_format(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just some words, not weights")
    assert_one_line_error(run_cli("convert", path, tmp_path / "out.safetensors"), 1, "unknown format", "first bytes")
    assert_one_line_error(run_cli("convert", tmp_path / "missing", tmp_path / "o.safetensors"), 2, "no such file")


def test_truncated_sources(native, tmp_path):
    convert(native, tmp_path / "model.bin")
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("convert", tmp_path / "cut.bin", tmp_path / "o.safetensors"), 1, "truncated")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(native.read_bytes()[:-100])
    assert_one_line_error(run_cli("convert", cut, tmp_path / "o2.safetensors"), 1, "truncated")
    assert not list(tmp_path.glob("o*"))


def test_config_that_disagrees_with_the_tensors(tmp_path):
    torch.manual_seed(1)
    model = GPT2(SHAPE)
    source = tmp_path / "ckpt.pt"
    _nanogpt_checkpoint(source, model)
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["model_args"]["n_embd"] = 128
    torch.save(checkpoint, source)
    assert_one_line_error(run_cli("convert", source, tmp_path / "o.safetensors"), 1, "shape")


def test_existing_destination_needs_force(native, tmp_path):
    target = tmp_path / "exists.safetensors"
    target.write_text("keep me")
    assert_one_line_error(run_cli("convert", native, target), 2, "exists; use --force")
    assert target.read_text() == "keep me"
    convert(native, target, "--force")
    assert load_model(target).config.n_layer == 2
    folder = tmp_path / "hf"
    convert(native, folder)
    convert(native, folder, "--force")  # a folder is replaced whole
    assert (folder / "config.json").is_file() and not list(tmp_path.glob(".hf*"))


def test_bad_target_options(native, tmp_path):
    assert_one_line_error(run_cli("convert", native, tmp_path / "x.onnx"), 2, "give --to")
    assert_one_line_error(run_cli("convert", native, tmp_path / "x.bin", "--dtype", "float16"), 2, "llm.c")
    assert_one_line_error(run_cli("convert", native, tmp_path / "x.gguf", "--quant", "q4_0"), 2, "only q8_0")
    assert not list(tmp_path.glob("x*")) and not list(tmp_path.glob(".x*"))
