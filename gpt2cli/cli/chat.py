"""`gpt2 chat`: talk to a chat-templated checkpoint in the terminal, or script it through a pipe."""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Annotated, Any

from gpt2cli.cli.options import (
    RUN,
    SPEED,
    CheckpointArgument,
    CompileOption,
    ConfigOption,
    DeviceOption,
    DtypeOption,
    SectionSetting,
    SeedOption,
    overrides,
)
from gpt2cli.cli.output import info, write_stdout
from gpt2cli.settings.sections import ChatSettings
from gpt2cli.settings.types import Quantize

if TYPE_CHECKING:
    from gpt2cli.generation.chat import Conversation, Prompt

DECODING = "Decoding"
_s = SectionSetting(ChatSettings, DECODING)

HELP = """commands:
  /clear             forget the conversation (the system message stays)
  /temperature [T]   show or set the sampling temperature (0: greedy)
  /help              this list
  /quit              leave (so does Ctrl-D); Ctrl-C stops a reply in progress"""


def command(
    checkpoint: CheckpointArgument,
    system: Annotated[str | None, _s("system", RUN)] = None,
    max_new_tokens: Annotated[int | None, _s("max_new_tokens")] = None,
    temperature: Annotated[float | None, _s("temperature")] = None,
    top_k: Annotated[int | None, _s("top_k")] = None,
    top_p: Annotated[float | None, _s("top_p")] = None,
    min_p: Annotated[float | None, _s("min_p")] = None,
    repetition_penalty: Annotated[float | None, _s("repetition_penalty")] = None,
    stop: Annotated[list[str] | None, _s("stop")] = None,
    prompt_lookup: Annotated[int | None, _s("prompt_lookup", SPEED, "--prompt-lookup", metavar="N")] = None,
    device: DeviceOption[ChatSettings] = None,
    dtype: DtypeOption[ChatSettings] = None,
    quantize: Annotated[Quantize | None, _s("quantize", SPEED)] = None,
    group_size: Annotated[int | None, _s("group_size", SPEED)] = None,
    compile: CompileOption[ChatSettings] = None,
    seed: SeedOption[ChatSettings] = None,
    config: ConfigOption = None,
) -> None:
    """Chat with a checkpoint that carries a chat template (`gpt2 convert --chat-template` attaches one).

    On a terminal: type a message, the reply streams in; /help lists the commands (/clear, /temperature T, /quit).
    Ctrl-C stops the reply in progress and keeps the session; Ctrl-D or /quit leaves. When the conversation
    outgrows the context, its oldest turns are dropped, with a notice on stderr.

    When stdin is not a terminal: one message per line in, one reply per line out, for scripts. A newline in a
    reply is written as \\n and a backslash as \\\\ so that each reply stays on one line; blank lines and /commands
    get no reply line.
    """
    from gpt2cli.settings.sections import load_settings

    settings = load_settings(config, overrides(locals(), chat=ChatSettings)).chat
    run_chat(checkpoint, settings, interactive=sys.stdin.isatty())


def run_chat(checkpoint: str, settings: ChatSettings, interactive: bool) -> None:
    from pathlib import Path

    import torch

    from gpt2cli.data.tokenizer import get_tokenizer
    from gpt2cli.errors import UsageError
    from gpt2cli.formats.chat_template import read_chat_template
    from gpt2cli.generation.chat import Conversation
    from gpt2cli.generation.drafting import PromptLookup
    from gpt2cli.generation.generator import TextGenerator
    from gpt2cli.generation.loading import load_generation_model

    if not Path(checkpoint).exists():
        raise UsageError(f"{checkpoint}: no such file or folder")
    template = read_chat_template(checkpoint)
    if template is None:  # before any weights are read
        raise UsageError(
            f"{checkpoint} has no chat template; attach one with "
            f"'gpt2 convert {checkpoint} OUT.safetensors --chat-template default' (or a Jinja file)"
        )
    model = load_generation_model(checkpoint, settings, info)
    generator = TextGenerator(
        model,
        get_tokenizer(),
        compile=settings.compile,
        drafting=None if settings.prompt_lookup is None else PromptLookup(settings.prompt_lookup),
    )
    conversation = Conversation(generator, template, settings.system)
    rng = None if settings.seed is None else torch.Generator(generator.device).manual_seed(settings.seed)
    session = ChatSession(conversation, settings, rng, interactive)
    if interactive:
        session.run_terminal()
    else:
        session.run_script(sys.stdin)


def escape_line(text: str) -> str:
    """A reply on one line: backslashes doubled, then newlines and carriage returns as \\n and \\r."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


class ChatSession:
    """The loop around a conversation: reading messages, in-session commands, and presenting replies."""

    def __init__(self, conversation: Conversation, settings: ChatSettings, rng: Any, interactive: bool) -> None:
        from gpt2cli.generation.records import SamplingOptions

        self.conversation, self.settings, self.rng, self.interactive = conversation, settings, rng, interactive
        self.options = SamplingOptions.from_settings(settings)

    # ------------------------------------------------------------ commands

    def command(self, line: str) -> bool:
        """Run a /command; False when it asks to leave."""
        name, _, argument = line[1:].strip().partition(" ")
        argument = argument.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "clear":
            self.conversation.clear()
            info("(the conversation was cleared)")
        elif name == "temperature":
            self.set_temperature(argument)
        elif name in ("help", "?", ""):
            info(HELP)
        else:
            info(f"unknown command /{name}; /help lists them")
        return True

    def set_temperature(self, argument: str) -> None:
        from dataclasses import replace

        from pydantic import ValidationError

        if not argument:
            info(f"temperature {self.options.temperature:g}")
            return
        try:
            value = float(argument)
            ChatSettings.model_validate({**self.settings.model_dump(), "temperature": value})
        except (ValueError, ValidationError):
            info(f"/temperature takes a number of 0 or more (0: greedy), got {argument!r}")
            return
        self.options = replace(self.options, temperature=value)
        info(f"temperature {value:g}")

    # ------------------------------------------------------------ replies

    def notice(self, prompt: Prompt) -> None:
        """Say on stderr what the history lost to fit the context."""
        context = self.conversation.block_size
        if prompt.dropped_messages:
            info(
                f"(the conversation outgrew the context of {context} tokens: its oldest "
                f"{prompt.dropped_messages} message{'s' if prompt.dropped_messages > 1 else ''} were dropped)"
            )
        if prompt.without_system:
            info("(the system message was left out of this reply's prompt to fit the context)")
        if prompt.cut_tokens:
            info(f"(the message is longer than the context: its first {prompt.cut_tokens} tokens were cut)")

    def respond(self, message: str, on_text: Any) -> str:
        prompt = self.conversation.add_user_message(message, self.options.max_new_tokens)
        self.notice(prompt)
        return self.conversation.answer(prompt, self.options, self.rng, on_text).text

    def run_script(self, lines: Any) -> None:
        """One message per line, one escaped reply per line, streamed."""
        for raw in lines:
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.respond(line, lambda piece: write_stdout([escape_line(piece)]))
            write_stdout(["\n"])

    def run_terminal(self) -> None:
        """Read, reply, repeat, until Ctrl-D or /quit; Ctrl-C stops a reply (or clears the line being typed)."""
        from gpt2cli.errors import ChatTemplateError

        with contextlib.suppress(ImportError):  # not on every platform
            import readline  # noqa: F401  (line editing and history for input())
        model = self.conversation.generator.model.config
        info(
            f"chatting with a {model.n_layer}-layer model (context {model.block_size} tokens); /help for commands, "
            "Ctrl-C stops a reply, Ctrl-D or /quit leaves"
        )
        while True:
            try:
                line = input("> ")
            except EOFError:
                write_stdout(["\n"])
                return
            except KeyboardInterrupt:
                write_stdout(["\n"])
                continue
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            try:
                text = self.respond(line, lambda piece: write_stdout([piece]))
                write_stdout(["\n" if text and not text.endswith("\n") else ""])
            except KeyboardInterrupt:
                write_stdout(["\n"])
                info("(stopped)")
            except ChatTemplateError as error:  # the template refused the message: say so, the session goes on
                info(f"gpt2: error: {error}")
