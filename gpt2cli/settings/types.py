"""The value types of the settings: closed choices, validated numbers and how text becomes a value.

Named once here, so validation, the CLI's choices (help, completion) and the core agree.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field

CONFIG_ENV_VAR = "GPT2_CONFIG"
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
StorageDtype = Literal["float32", "bfloat16", "float16"]  # a dtype to hold weights in: no "auto"
Schedule = Literal["cosine", "linear", "constant", "wsd"]
Parallel = Literal["ddp", "fsdp"]
OptimizerName = Literal["adamw", "muon"]
MuonAdjustLr = Literal["original", "match_rms_adamw"]
Quantize = Literal["none", "int8", "int4"]
Task = Literal["lm", "hellaswag"]
DataFormat = Literal["auto", "text", "prompt-completion", "messages"]  # TRL's dataset formats
LossOn = Literal["completion", "all"]  # completion: the completion, or the assistant turns; all: every token


# int4's group sizes (input features per scale and zero point); an int rather than a Literal of ints, because
# environment variables give text, and checked here so a bad one exits 2 before anything loads.
GROUP_SIZES = (32, 64, 128)


def _group_size(value: int) -> int:
    if value not in GROUP_SIZES:
        raise ValueError(f"must be {', '.join(map(str, GROUP_SIZES[:-1]))} or {GROUP_SIZES[-1]}")
    return value


GroupSize = Annotated[
    int,
    AfterValidator(_group_size),
    Field(description="int4: input features per scale and zero point (32, 64 or 128)."),
]
OutputFormat = Literal["table", "json", "jsonl", "csv", "md"]
EncodingErrors = Literal["strict", "replace"]
DEVICE_KINDS = ("auto", "cpu", "cuda", "cuda:N", "mps")  # what DEVICE_PATTERN accepts, for help texts
# Open (cuda:N), so a pattern rather than a Literal; every section that runs a model has one.
Device = Annotated[str, Field(pattern=DEVICE_PATTERN, description="Where to run; auto picks the best available.")]
Tracker = Literal["tensorboard", "wandb"]
PlotX = Literal["step", "tokens", "time"]
PlotMetric = Literal["loss", "val_loss", "lr", "grad_norm", "tok_per_s", "mfu", "hellaswag_acc", "hellaswag_acc_norm"]


def comma_list(value: Any) -> Any:
    """A list given as text (a flag, an environment variable): `a,b` or a JSON list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def _compile_mode(value: Any) -> Any:
    """`auto`, or on/off as pydantic reads booleans (true/false, 1/0, yes/no, on/off): one error line otherwise."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool):
        return value
    if isinstance(value, str | int) and str(value).strip().lower() in _BOOLEAN_WORDS:
        return _BOOLEAN_WORDS[str(value).strip().lower()]
    raise ValueError(f"expected auto, true or false, got {value!r}")


_BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "on": True}
_BOOLEAN_WORDS |= {"false": False, "0": False, "no": False, "off": False}
# `--compile`/`--no-compile`, or neither: auto (compile where it works and repays; see runtime/compile.py).
CompileMode = Annotated[bool | Literal["auto"], BeforeValidator(_compile_mode)]
