"""Shared option definitions. Defaults, choices and validation live in `gpt2cli.settings.sections`; flags only override.

A flag is declared once, in its command's signature, with `setting(Section, "field")`: the help text, the shown
default and the panel come from the settings field. `overrides` then picks the flags given out of the command's
parameters by the sections' field names, so no command restates its flags in a dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from gpt2cli.model.presets import PresetName
from gpt2cli.settings.sections import DataSettings, ModelSettings
from gpt2cli.settings.types import CONFIG_ENV_VAR, DEVICE_KINDS

# The panels `--help` groups options into.
MODEL, DATA, OPTIMIZER, SCHEDULE = "Model", "Data", "Optimizer", "Schedule"
SPEED, RUN, OUTPUT = "Speed", "Run", "Output"


def _escape(text: str) -> str:
    """Literal text inside Rich markup (help texts are rendered with Typer's Rich markup mode)."""
    return text.replace("[", "\\[")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def default_text(section: type[BaseModel], field: str, flag: str | None = None) -> str:
    """`[default: X]` for a settings field, or "" where the field has no default worth showing (None, empty)."""
    default = section.model_fields[field].get_default(call_default_factory=True)
    if default is None or default == [] or default == "":
        return ""
    if isinstance(default, bool) and flag is not None:  # an on/off flag: name the spelling that is the default
        on, _, off = flag.partition("/")
        return f"[dim]\\[default: {(on if default else off).lstrip('-')}][/dim]"
    return f"[dim]\\[default: {_escape(_shown(default))}][/dim]"


def setting_help(section: type[BaseModel], field: str, flag: str | None = None) -> str:
    """The help text of a flag: its settings field's description and default."""
    description = _escape(section.model_fields[field].description or "")
    default = default_text(section, field, flag)
    return f"{description} {default}" if default else description


def setting(section: type[BaseModel], field: str, *declarations: str, panel: str, **extra: Any) -> Any:
    """A `typer.Option` for a settings field; the flag defaults to None ('not given') so settings decide."""
    flag = next((name for name in declarations if "/" in name), None)
    return typer.Option(
        *declarations,
        help=setting_help(section, field, flag),
        show_default=False,  # the settings' default is in the help; the flag's own None is meaningless
        rich_help_panel=panel,
        **extra,
    )


@dataclass(frozen=True)
class SectionSetting:
    """`setting` bound to one command's settings section and the panel most of its flags go in. A command module
    names one, `_s = SectionSetting(SampleSettings, DECODING)`, and declares each flag with it: `_s("top_k")`,
    `_s("quantize", SPEED)`, `_s("ignore_eot", DECODING, "--ignore-eot/--stop-at-eot")`."""

    section: type[BaseModel]
    panel: str

    def __call__(self, field: str, panel: str | None = None, *declarations: str, **extra: Any) -> Any:
        return setting(self.section, field, *declarations, panel=panel or self.panel, **extra)


def given(values: Mapping[str, Any], section: type[BaseModel]) -> dict[str, Any]:
    """The flags in `values` (a command's parameters) that name fields of `section` and were given.

    None means 'not given'; so does an empty list, which is what Typer passes for a repeatable flag not used.
    """
    return {
        name: value
        for name, value in values.items()
        if name in section.model_fields and value is not None and value != []
    }


def overrides(values: Mapping[str, Any], **sections: type[BaseModel]) -> dict[str, dict[str, Any]]:
    """`{"section": {"field": value}}` for the given flags among a command's parameters (pass `locals()`)."""
    return {name: picked for name, section in sections.items() if (picked := given(values, section))}


# ---------------------------------------------------------------- options every command shares

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML settings file with tables \\[model], \\[data], \\[train], \\[sample], \\[chat], \\[eval], "
        f"\\[bench], \\[plot], \\[serve] (or the seed YAML); also ${CONFIG_ENV_VAR}.",
        show_default=False,
        rich_help_panel=RUN,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON document on stdout.", rich_help_panel=OUTPUT)
]
CheckpointArgument = Annotated[
    str,
    typer.Argument(
        metavar="CHECKPOINT", help="Our .safetensors file, a run folder, or a transformers folder.", show_default=False
    ),
]

# Device is open (cuda:N), so it is not a click Choice: the kinds go in the metavar, the settings check the pattern.
_DEVICE_METAVAR = "|".join(DEVICE_KINDS)


class _SectionOption:
    """An option alias shared by several commands whose default depends on the command's settings section.

    `DeviceOption[TrainSettings]` is the `--device` option with `TrainSettings.device`'s help and default.
    """

    def __init__(self, field: str, python_type: Any, *declarations: str, panel: str, **extra: Any) -> None:
        self.field, self.python_type, self.declarations = field, python_type, declarations
        self.panel, self.extra = panel, extra

    def __getitem__(self, section: type[BaseModel]) -> Any:
        annotation = self.python_type or section.model_fields[self.field].annotation
        option = setting(section, self.field, *self.declarations, panel=self.panel, **self.extra)
        return Annotated[annotation | None, option]


# `python_type` None: the field's own type, so a Literal becomes a click Choice (listed, validated, completed).
DeviceOption = _SectionOption("device", str, panel=SPEED, metavar=_DEVICE_METAVAR)
DtypeOption = _SectionOption("dtype", None, panel=SPEED)
CompileOption = _SectionOption("compile", bool, "--compile/--no-compile", panel=SPEED)
SeedOption = _SectionOption("seed", int, panel=RUN)

# The model-shape flags of the commands that build a model from settings (train, bench).
PresetOption = Annotated[PresetName | None, setting(ModelSettings, "preset", panel=MODEL)]
NLayerOption = Annotated[int | None, setting(ModelSettings, "n_layer", panel=MODEL)]
NHeadOption = Annotated[int | None, setting(ModelSettings, "n_head", panel=MODEL)]
NEmbdOption = Annotated[int | None, setting(ModelSettings, "n_embd", panel=MODEL)]
BlockSizeOption = Annotated[int | None, setting(ModelSettings, "block_size", panel=MODEL)]

# The text inputs' flag of the commands that read .jsonl (tokenize, train, eval).
TextFieldOption = Annotated[str | None, setting(DataSettings, "text_field", panel=DATA)]


def profile_help(profile: Mapping[str, Mapping[str, Any]]) -> str:
    """A help paragraph listing the values a profile (the default training run) puts in place of the defaults."""
    values = ", ".join(
        f"--{field.replace('_', '-')} {_escape(_shown(value))}"
        for section in profile.values()
        for field, value in section.items()
    )
    return f"The default run (no DATA) replaces these defaults: {values}. Flags, --config and GPT2_* still win."
