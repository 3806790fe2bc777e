"""`gpt2 serve`: an OpenAI-compatible HTTP server for any GPT-2 checkpoint (needs the `serve` extra)."""

from __future__ import annotations

from typing import Annotated

from gpt2cli.cli.options import (
    OUTPUT,
    SPEED,
    CheckpointArgument,
    CompileOption,
    ConfigOption,
    DeviceOption,
    DtypeOption,
    SectionSetting,
    overrides,
)
from gpt2cli.settings.sections import ServeSettings
from gpt2cli.settings.types import Quantize

SERVER, LIMITS = "Server", "Limits"
_s = SectionSetting(ServeSettings, SERVER)


def command(
    checkpoint: CheckpointArgument,
    host: Annotated[str | None, _s("host")] = None,
    port: Annotated[int | None, _s("port")] = None,
    api_key: Annotated[str | None, _s("api_key")] = None,
    model_name: Annotated[str | None, _s("model_name")] = None,
    max_batch: Annotated[int | None, _s("max_batch", SPEED)] = None,
    device: DeviceOption[ServeSettings] = None,
    dtype: DtypeOption[ServeSettings] = None,
    quantize: Annotated[Quantize | None, _s("quantize", SPEED)] = None,
    group_size: Annotated[int | None, _s("group_size", SPEED)] = None,
    compile: CompileOption[ServeSettings] = None,
    prompt_lookup: Annotated[int | None, _s("prompt_lookup", SPEED, "--prompt-lookup", metavar="N")] = None,
    max_n: Annotated[int | None, _s("max_n", LIMITS)] = None,
    max_prompts: Annotated[int | None, _s("max_prompts", LIMITS)] = None,
    max_body_bytes: Annotated[int | None, _s("max_body_bytes", LIMITS)] = None,
    json_logs: Annotated[bool | None, _s("json_logs", OUTPUT, "--json-logs/--text-logs")] = None,
    config: ConfigOption = None,
) -> None:
    """Serve a checkpoint over OpenAI's completions API, and its chat API for a checkpoint with a chat template
    (plus llama.cpp's /health, /tokenize, /detokenize and vLLM's /tokenizer_info).

    Concurrent requests are batched continuously, up to --max-batch sequences per decode step. Listens on
    127.0.0.1 unless --host says otherwise; --api-key (or GPT2_SERVE__API_KEY) requires a Bearer token. One log
    line per request on stderr. Ctrl-C stops it (exit code 130).
    """
    from pathlib import Path

    from gpt2cli.errors import UsageError
    from gpt2cli.runtime.extras import import_extra
    from gpt2cli.settings.sections import load_settings

    settings = load_settings(config, overrides(locals(), serve=ServeSettings)).serve
    for module in ("fastapi", "uvicorn"):
        import_extra(module, "serve", "gpt2 serve")
    if not Path(checkpoint).exists():
        raise UsageError(f"{checkpoint}: no such file or folder")
    from gpt2cli.serving.server import run_server

    run_server(checkpoint, settings)
