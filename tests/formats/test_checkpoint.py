"""The safetensors checkpoint: our files load in transformers, and transformers' files load here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gpt2cli import GPT2, GPT2Config, load_model, save_model
from gpt2cli.errors import CheckpointError, UsageError
from gpt2cli.formats.checkpoint import write_hf_config

SHAPE = GPT2Config(n_layer=2, n_head=4, n_embd=64, block_size=32)


def _model(seed: int = 0) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(SHAPE).eval()


def _tokens(length: int = 32) -> torch.Tensor:
    return torch.randint(0, 50257, (2, length), generator=torch.Generator().manual_seed(3))


def test_saved_file_loads_in_transformers_with_same_logits(tmp_path):
    from transformers import GPT2LMHeadModel

    model = _model()
    save_model(model, tmp_path / "model.safetensors")
    write_hf_config(model.config, tmp_path)
    reference = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(_tokens()).logits, model(_tokens())[0])


def test_file_layout_is_transformers_and_carries_our_config(tmp_path):
    path = save_model(_model(), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        names = set(handle.keys())
    assert metadata["format"] == "pt"
    assert json.loads(metadata["gpt2cli.config"])["n_layer"] == 2
    assert "gpt2cli.version" in metadata
    assert "lm_head.weight" not in names  # tied: stored once, as transformers does
    tensors = load_file(path)
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D [in, out]
    assert tensors["transformer.h.0.mlp.c_proj.weight"].shape == (256, 64)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_round_trip_is_exact_and_keeps_tying(tmp_path):
    model = _model()
    loaded = load_model(save_model(model, tmp_path / "m.safetensors"))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert not loaded.training


def test_dtype_and_device_arguments(tmp_path):
    path = save_model(_model(), tmp_path / "m.safetensors", dtype=torch.bfloat16)
    assert load_model(path).transformer.wte.weight.dtype == torch.bfloat16
    model = load_model(path, device="cpu", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module.", "module._orig_mod."])
@pytest.mark.parametrize("strip_transformer", [False, True])
def test_accepts_prefixed_and_unprefixed_names(tmp_path, prefix, strip_transformer):
    model = _model()
    tensors = load_file(save_model(model, tmp_path / "m.safetensors"))
    renamed = {}
    for name, tensor in tensors.items():
        if strip_transformer:
            name = name.removeprefix("transformer.")
        renamed[prefix + name] = tensor
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, path, metadata={"format": "pt", "gpt2cli.config": json.dumps(SHAPE.to_dict())})
    with torch.no_grad():
        torch.testing.assert_close(load_model(path)(_tokens())[0], model(_tokens())[0])


def test_transformers_folder_with_pytorch_model_bin_and_legacy_mask_buffers(hf_model_factory, tmp_path):
    reference, folder = hf_model_factory()
    state = dict(reference.state_dict())
    for layer in range(2):  # old transformers versions saved the causal mask with the weights
        state[f"transformer.h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
        state[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((folder / "config.json").read_text())
    torch.save(state, legacy / "pytorch_model.bin")
    with torch.no_grad():
        torch.testing.assert_close(load_model(legacy)(_tokens())[0], reference(_tokens()).logits)


def test_run_folder_holding_model_safetensors(tmp_path):
    model = _model()
    save_model(model, tmp_path / "model.safetensors")
    assert torch.equal(load_model(tmp_path).transformer.wpe.weight, model.transformer.wpe.weight)


# ---------------------------------------------------------------- bad input


def test_missing_path():
    with pytest.raises(UsageError, match="no such file or directory"):
        load_model("does/not/exist.safetensors")


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are plain words, not tensors\n" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(path)


def test_truncated_file(tmp_path):
    path = save_model(_model(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        load_model(path)


def _save_tensors(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "edited.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "gpt2cli.config": json.dumps(SHAPE.to_dict())})
    return path


def test_missing_and_extra_tensors(tmp_path):
    tensors = load_file(save_model(_model(), tmp_path / "m.safetensors"))
    missing = dict(tensors)
    del missing["transformer.h.1.ln_2.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensors: transformer\.h\.1\.ln_2\.weight"):
        load_model(_save_tensors(tmp_path, missing))
    extra = dict(tensors, **{"transformer.h.2.ln_1.weight": torch.ones(64)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors: transformer\.h\.2\.ln_1\.weight"):
        load_model(_save_tensors(tmp_path, extra))


def test_shape_that_disagrees_with_config(tmp_path):
    tensors = load_file(save_model(_model(), tmp_path / "m.safetensors"))
    tensors["transformer.wpe.weight"] = torch.zeros(16, 64)
    with pytest.raises(
        CheckpointError, match=r"transformer\.wpe\.weight has shape \[16, 64\] but the config needs \[32, 64\]"
    ):
        load_model(_save_tensors(tmp_path, tensors))


def test_file_without_any_config(tmp_path):
    tensors = load_file(save_model(_model(), tmp_path / "m.safetensors"))
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(tensors, bare / "weights.safetensors")
    with pytest.raises(CheckpointError, match="no model config"):
        load_model(bare / "weights.safetensors")


def test_unsupported_transformers_variant(hf_model_factory):
    _, folder = hf_model_factory()
    config = json.loads((folder / "config.json").read_text())
    config["activation_function"] = "relu"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unsupported GPT-2 variant.*activation_function='relu'"):
        load_model(folder)


def test_folder_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_model(tmp_path)


def test_crash_during_save_keeps_previous_file(tmp_path, monkeypatch):
    path = save_model(_model(0), tmp_path / "m.safetensors")
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("gpt2cli.formats.checkpoint.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_model(_model(1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
