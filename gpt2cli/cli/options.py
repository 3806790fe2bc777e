"""Shared option definitions. Defaults and validation live in `gpt2cli.settings`; flags only override."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from gpt2cli.settings import CONFIG_ENV_VAR, DataSettings, ModelSettings


def setting_help(section: type[BaseModel], field: str) -> str:
    """The help text of a flag, taken from its settings field, with the field's default."""
    info = section.model_fields[field]
    default = info.get_default(call_default_factory=True)
    shown = "" if default in (None, [], "") else f" [default: {default}]"
    return f"{info.description}{shown}"


def overrides(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{"section": {"field": value}}` for the flags actually given (None means 'not given')."""
    return {
        name: given
        for name, values in sections.items()
        if (given := {key: value for key, value in values.items() if value is not None})
    }


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML settings file with tables \\[model], \\[data], \\[train], \\[sample], \\[eval], \\[bench] "
        f"(or the seed YAML); also ${CONFIG_ENV_VAR}.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document on stdout.")]
CheckpointArgument = Annotated[
    str, typer.Argument(help="Our .safetensors file, a run folder, or a transformers folder.", show_default=False)
]


def _model_option(field: str) -> Any:
    return typer.Option(help=setting_help(ModelSettings, field), show_default=False)


# The model-shape flags of the commands that build a model from settings (train, bench).
PresetOption = Annotated[str | None, _model_option("preset")]
NLayerOption = Annotated[int | None, _model_option("n_layer")]
NHeadOption = Annotated[int | None, _model_option("n_head")]
NEmbdOption = Annotated[int | None, _model_option("n_embd")]
BlockSizeOption = Annotated[int | None, _model_option("block_size")]

# The text inputs' flag of the commands that read .jsonl (tokenize, train, eval).
TextFieldOption = Annotated[str | None, typer.Option(help=setting_help(DataSettings, "text_field"), show_default=False)]
