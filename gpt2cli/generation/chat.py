"""A conversation with a chat-templated checkpoint, for `gpt2 chat`: the history, rendered by the checkpoint's own
template (the renderer training uses), trimmed from the front when it outgrows the context, and each reply
generated, streamed, until the template's end of turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from gpt2cli.data.tokenizer import EOT_ID
from gpt2cli.errors import ChatTemplateError
from gpt2cli.generation.records import SamplingOptions

if TYPE_CHECKING:
    import torch

    from gpt2cli.formats.chat_template import ChatTemplate
    from gpt2cli.generation.generator import TextGenerator

Message = dict[str, str]


@dataclass(frozen=True)
class Prompt:
    """A rendered conversation ready for generation, and what had to go for it to fit."""

    ids: list[int]
    dropped_messages: int = 0  # the oldest messages forgotten for good to make room
    without_system: bool = False  # the system message was left out of this prompt (it is kept for the next)
    cut_tokens: int = 0  # the newest message alone was too long: its first tokens were cut


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # "eot" (the end of the turn), "stop", "length", or "interrupted"
    prompt: Prompt


def without_prefix(text: str, prefix: str) -> str:
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text


def reply_room(block_size: int, max_new_tokens: int) -> int:
    """Tokens of the context kept free for the reply: its length limit, but at most half the context (a longer
    reply goes on past the context as `gpt2 sample` does, re-encoding the second half of the window)."""
    return max(1, min(max_new_tokens, block_size // 2))


class Conversation:
    """The messages of one chat session with `system` first; `reply` adds a user message and the model's answer."""

    def __init__(self, generator: TextGenerator, template: ChatTemplate, system: str | None = None) -> None:
        self.generator = generator
        self.template = template
        self.system = system or None
        self.messages: list[Message] = []  # user and assistant turns, oldest first
        self.reply_prefix = template.reply_prefix

    @property
    def block_size(self) -> int:
        return self.generator.block_size

    def clear(self) -> None:
        """Forget every turn (the system message stays)."""
        self.messages.clear()

    def _encode(self, messages: list[Message], with_system: bool) -> list[int]:
        head = [{"role": "system", "content": self.system}] if with_system and self.system else []
        return self.template.encode([*head, *messages], add_generation_prompt=True).ids

    def prompt(self, max_new_tokens: int) -> Prompt:
        """The conversation rendered with the assistant's turn opened, at most `block_size - reply_room` tokens.

        The oldest turns go first (a user message with the replies after it, so the history still starts with a
        user); the newest user message always stays. If it still does not fit, the system message is left out of
        this prompt, and then the message's first tokens are cut."""
        budget = self.block_size - reply_room(self.block_size, max_new_tokens)
        dropped = 0
        ids = self._encode(self.messages, with_system=True)
        while len(ids) > budget and len(self.messages) > 1:
            turn_end = 1
            while turn_end < len(self.messages) - 1 and self.messages[turn_end]["role"] != "user":
                turn_end += 1
            del self.messages[:turn_end]
            dropped += turn_end
            ids = self._encode(self.messages, with_system=True)
        if len(ids) <= budget:
            return Prompt(ids, dropped)
        without_system = self.system is not None
        if without_system:
            ids = self._encode(self.messages, with_system=False)
        cut = max(0, len(ids) - budget)
        return Prompt(ids[cut:], dropped, without_system, cut)

    def options_for_turn(self, options: SamplingOptions) -> SamplingOptions:
        """`options` that end the reply at the template's end of turn: `<|endoftext|>` is the model's own stop
        token; any other end-of-turn text becomes a stop string."""
        end = self.template.end_of_turn
        if self.template.end_of_turn_ids == [EOT_ID] or not end or end in options.stop:
            return replace(options, ignore_eot=False)
        return replace(options, ignore_eot=False, stop=(*options.stop, end))

    def add_user_message(self, message: str, max_new_tokens: int) -> Prompt:
        """Add the user's `message`; the prompt for the answer (the history trimmed to fit, see `prompt`). A message
        the template refuses (its `raise_exception`) is not kept, and the `ChatTemplateError` propagates."""
        self.messages.append({"role": "user", "content": message})
        try:
            return self.prompt(max_new_tokens)
        except ChatTemplateError:
            self.messages.pop()
            raise

    def answer(
        self,
        prompt: Prompt,
        options: SamplingOptions,
        rng: torch.Generator | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Reply:
        """Generate the assistant's answer to `prompt` (`on_text` gets it piece by piece) and keep it.

        A KeyboardInterrupt during generation keeps what was already shown as the answer, then propagates (the
        terminal chat stays in the session; a scripted one stops)."""
        received, shown = "", ""

        def stream(_row: int, piece: str) -> None:
            nonlocal received, shown
            received += piece
            if len(received) < len(self.reply_prefix) and self.reply_prefix.startswith(received):
                return  # still what the template puts before the content
            content = without_prefix(received, self.reply_prefix)
            if on_text is not None and len(content) > len(shown):
                on_text(content[len(shown) :])
            shown = content

        try:
            [completion] = self.generator.generate([prompt.ids], self.options_for_turn(options), rng, stream)
        except KeyboardInterrupt:
            self.messages.append({"role": "assistant", "content": shown})
            raise
        content = without_prefix(completion.text, self.reply_prefix)
        self.messages.append({"role": "assistant", "content": content})
        return Reply(content, completion.finish_reason or "length", prompt)
