"""A LoRA run (`--lora-rank`): the frozen base it adapts, the adapters its checkpoints hold, the merged model it saves.

The base is `--init-from`, identified by its path and the SHA-256 of its weight files: a checkpoint records both,
and `--resume` refuses a base whose content changed (the adapters would no longer fit it). The base's block matrices
are held in the run's 16-bit compute dtype where it computes in one (autocast casts them there anyway, so the result
is the same for half the memory); embeddings, LayerNorms and biases stay float32. The run folder's
`model.safetensors` is always the merged plain GPT-2, merged into the base as re-read from its file, at its stored
precision: never into the 16-bit training copy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt2cli.errors import UsageError
from gpt2cli.formats.checkpoint import load_model, normalize_names, read_checkpoint, weight_files
from gpt2cli.model.gpt2 import GPT2
from gpt2cli.model.lora import LoraSpec, adapted_weights, add_adapters, load_adapter_state, merged_weight
from gpt2cli.runtime.devices import Precision
from gpt2cli.settings.sections import TrainSettings

HASH_CHUNK = 16 * 2**20


def lora_spec(train: TrainSettings) -> LoraSpec | None:
    """The adapters the settings ask for; None without `--lora-rank`."""
    if train.lora_rank is None:
        return None
    return LoraSpec(train.lora_rank, train.lora_alpha, train.lora_dropout, tuple(train.lora_targets))


def base_matrix_dtype(precision: Precision) -> torch.dtype:
    """The dtype the frozen base's block matrices are held in: the run's 16-bit compute dtype (bf16 where the device
    computes it natively: `DeviceRules.auto_dtype`), else float32."""
    return precision.dtype if precision.dtype in (torch.bfloat16, torch.float16) else torch.float32


def fingerprint(path: str | Path) -> str:
    """SHA-256 over the weight files of a checkpoint (a file, a run folder, a transformers folder)."""
    digest = hashlib.sha256()
    for file in weight_files(path):
        with open(file, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoraRun:
    spec: LoraSpec
    base: Path  # the --init-from checkpoint, absolute
    base_sha256: str
    save_adapters: bool = False

    def record(self) -> dict[str, Any]:
        """What every checkpoint's state.json keeps of the run's adapters and base."""
        return {**self.spec.to_dict(), "base": str(self.base), "base_sha256": self.base_sha256}

    def build_model(self, device: torch.device, precision: Precision, adapters: dict[str, torch.Tensor] | None) -> GPT2:
        """The base with adapters (new ones drawn from torch's generator, or `adapters` from a checkpoint), frozen,
        its block matrices in `base_matrix_dtype`."""
        model = load_model(self.base, device=device, dtype=torch.float32)
        add_adapters(model, self.spec)
        matrix_dtype = base_matrix_dtype(precision)
        if matrix_dtype != torch.float32:
            for module in model.transformer.h.modules():
                if isinstance(module, nn.Linear):  # one at a time: the float32 copies go as the 16-bit ones come
                    module.weight = nn.Parameter(module.weight.detach().to(matrix_dtype), requires_grad=False)
        if adapters is not None:
            load_adapter_state(model, adapters, source=f"the adapters of {self.base}")
        return model

    def merged_tensors(self, adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The plain GPT-2 to save, in the checkpoint layout: the base's tensors re-read from its file (never the
        16-bit training copy), the adapters merged into them at their stored precision. Merged in the file's own
        layout, one matrix at a time: no second copy of the model."""
        tensors, _ = read_checkpoint(self.base)
        tensors = normalize_names(tensors)
        tensors.pop("lm_head.weight", None)  # tied to the embedding: stored once
        for name in adapted_weights(adapters):  # the four targets are Conv1D in every file: (in, out)
            tensors[name] = merged_weight(tensors[name], adapters, name, self.spec.scaling, transposed=True)
        return {name: tensor.contiguous() for name, tensor in tensors.items()}


def prepare_lora(train: TrainSettings, saved_state: dict[str, Any] | None, out: Path) -> LoraRun | None:
    """The LoRA run the settings describe, its base fingerprinted; on resume, checked against the checkpoint's
    record: the same adapters, and a base whose content has not changed."""
    spec = lora_spec(train)
    saved = (saved_state or {}).get("lora")
    if saved_state is not None and (spec is None) != (saved is None):
        kind = "a LoRA run" if saved is not None else "not a LoRA run"
        raise UsageError(f"{out}: the run was {kind}; resume it with its own settings")
    if spec is None:
        return None
    base = Path(train.init_from).resolve()  # type: ignore[arg-type]  # the settings require init_from with LoRA
    run = LoraRun(spec, base, fingerprint(base), train.save_adapters)
    if saved is not None:
        wanted = {key: saved[key] for key in spec.to_dict()}
        if wanted != spec.to_dict():
            asked = _describe(spec.to_dict())
            raise UsageError(f"{out}: the run's adapters were {_describe(wanted)}, these settings ask for {asked}")
        if saved["base_sha256"] != run.base_sha256:
            raise UsageError(
                f"{out}: the base model {base} changed since the run started (SHA-256 {run.base_sha256[:12]}..., "
                f"was {saved['base_sha256'][:12]}...); resume with the base the adapters were trained on"
            )
    return run


def _describe(spec: dict[str, Any]) -> str:
    return f"rank {spec['rank']}, alpha {spec['alpha']:g}, dropout {spec['dropout']:g}, on {','.join(spec['targets'])}"
