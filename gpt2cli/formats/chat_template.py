"""Chat templates: the one renderer of conversations for training, eval, serving and the terminal chat.

GPT-2 has no chat format, so a checkpoint carries its template (Jinja, as transformers uses): in the safetensors
metadata of `model.safetensors`, and beside exported weights as `chat_template.jinja` and in
`tokenizer_config.json`. Templates are rendered with transformers' Jinja settings (a sandboxed environment,
`trim_blocks`, `lstrip_blocks`, its `tojson` and `raise_exception`, `{% generation %}` blocks), so a template
renders the same here and in `AutoTokenizer.apply_chat_template`. The tokens a model trains on are marked by the
template's `{% generation %}...{% endgeneration %}` spans, never guessed from the roles.

This module does not import torch: the CLI validates `--chat-template` before anything heavy loads.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from gpt2cli.data.tokenizer import EOT_TEXT, get_tokenizer
from gpt2cli.errors import ChatTemplateError, CheckpointError

CHAT_TEMPLATE_METADATA_KEY = "gpt2cli.chat_template"
TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant")

# GPT-2's own vocabulary, turns marked in plain text. The reply's leading space is inside the generation span so
# that a prompt ending in "Assistant:" tokenizes as the same prefix it was trained on (":" ends a BPE piece and
# " word" starts one). `<|endoftext|>` is written literally, so it renders the same in any Jinja environment, and
# is encoded as the one special token: the model learns to emit it, and generation stops there.
DEFAULT_CHAT_TEMPLATE = """\
{%- for message in messages %}
{%- if message['role'] == 'system' %}
{{- 'System: ' + message['content'] + '\\n\\n' }}
{%- elif message['role'] == 'user' %}
{{- 'User: ' + message['content'] + '\\n\\n' }}
{%- elif message['role'] == 'assistant' %}
{{- 'Assistant:' }}
{%- generation %}
{{- ' ' + message['content'] + '<|endoftext|>' }}
{%- endgeneration %}
{{- '\\n\\n' }}
{%- else %}
{{- raise_exception('unknown role: ' + message['role']) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- 'Assistant:' }}
{%- endif %}
"""

# The reply text used to find what a template writes after an assistant's content (its end of turn).
_PROBE_REPLY = "gpt2cli-probe-reply"


@dataclass(frozen=True)
class RenderedChat:
    """A rendered conversation: its text, its tokens, and 1 on each token a `{% generation %}` span overlaps."""

    text: str
    ids: list[int]
    assistant_mask: list[int]


def _jinja_environment() -> Any:
    """A sandboxed environment configured as transformers configures its own, plus the generation tag."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationSpans(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: records the character span its body renders to."""

        tags = {"generation"}  # noqa: RUF012 (jinja's own class attribute)

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_span", []), [], [], body).set_lineno(lineno)

        def _span(self, caller: Any) -> str:
            body = caller()
            recording = _RECORDING.get()
            if recording is not None:
                pieces, spans = recording
                start = sum(len(piece) for piece in pieces)
                spans.append((start, start + len(body)))
            return body

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **options: Any) -> str:
        # Jinja's own tojson escapes HTML characters, which a prompt must not contain.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **options)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationSpans, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment


# While a template renders: the pieces rendered so far and the generation spans found (per render, thread-safe).
_RECORDING: contextvars.ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = contextvars.ContextVar(
    "gpt2cli_chat_spans", default=None
)


@contextmanager
def _recording_spans() -> Iterator[tuple[list[str], list[tuple[int, int]]]]:
    recording: tuple[list[str], list[tuple[int, int]]] = ([], [])
    token = _RECORDING.set(recording)
    try:
        yield recording
    finally:
        _RECORDING.reset(token)


def _message_content(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    # OpenAI's content parts: only text parts can be rendered for a text model.
    if isinstance(content, list) and all(isinstance(part, Mapping) for part in content):
        if all(part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
            return "".join(part["text"] for part in content)
        raise ChatTemplateError(f"{where}: 'content': only text parts can be rendered")
    raise ChatTemplateError(f"{where}: 'content' must be a string, not {type(content).__name__}")


def validate_messages(value: object, where: str) -> list[dict[str, str]]:
    """`value` as a list of {"role", "content"} messages; `where` (e.g. "data.jsonl:3") names it in errors."""
    if not isinstance(value, list) or not value:
        raise ChatTemplateError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    messages = []
    for index, message in enumerate(value):
        field = f"{where}: messages[{index}]"
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"{field}: expected an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ChatTemplateError(f"{field}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if "content" not in message:
            raise ChatTemplateError(f"{field}: no 'content'")
        messages.append({"role": role, "content": _message_content(message["content"], field)})
    return messages


class ChatTemplate:
    """A compiled chat template and what it implies: its generation prompt, its end of turn, its tokens."""

    def __init__(self, source: str, *, origin: str = "chat template") -> None:
        import jinja2

        self.source = source
        self.origin = origin
        try:
            self._template = _jinja_environment().from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise ChatTemplateError(f"{origin}: line {error.lineno}: {error.message}") from None

    @classmethod
    def default(cls) -> ChatTemplate:
        return cls(DEFAULT_CHAT_TEMPLATE, origin="the default chat template")

    @classmethod
    def from_file(cls, path: str | Path) -> ChatTemplate:
        path = Path(path)
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ChatTemplateError(f"{path}: cannot read the chat template ({error})") from None
        return cls(source, origin=str(path))

    @classmethod
    def from_option(cls, value: str | Path) -> ChatTemplate:
        """The value of a `--chat-template FILE|default` option."""
        return cls.default() if str(value) == "default" else cls.from_file(value)

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    @property
    def is_default(self) -> bool:
        return self.source == DEFAULT_CHAT_TEMPLATE

    @cached_property
    def has_generation_markers(self) -> bool:
        """Whether the template marks assistant replies (needed to train on them alone)."""
        return bool(self._probe[1])

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        import jinja2

        with _recording_spans() as (pieces, spans):
            try:
                for piece in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt):
                    pieces.append(piece)
            except jinja2.TemplateError as error:
                raise ChatTemplateError(f"{self.origin}: {error}") from None
            except Exception as error:  # a template is user code: any failure is a rendering error
                raise ChatTemplateError(f"{self.origin}: {type(error).__name__}: {error}") from None
            return "".join(pieces), list(spans)

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The conversation as text; `add_generation_prompt` appends the start of an assistant reply."""
        return self._render(messages, add_generation_prompt)[0]

    def encode(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> RenderedChat:
        """Tokens of the rendered conversation (`<|endoftext|>` as the special token) and its assistant mask.

        A token is in the mask when its bytes overlap a generation span, transformers' rule for
        `return_assistant_tokens_mask`, so the mask agrees with an exported tokenizer's.
        """
        text, spans = self._render(messages, add_generation_prompt)
        ids = get_tokenizer().encode(text, allow_special=True)
        return RenderedChat(text=text, ids=ids, assistant_mask=_overlap_mask(text, ids, spans))

    @staticmethod
    def _probe_messages() -> list[dict[str, str]]:
        return [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": _PROBE_REPLY}]

    @cached_property
    def _probe(self) -> tuple[str, list[tuple[int, int]]]:
        """A one-reply conversation rendered once: its text and generation spans."""
        return self._render(self._probe_messages(), add_generation_prompt=False)

    @cached_property
    def reply_prefix(self) -> str:
        """What the template writes between its generation prompt and an assistant's content (the default
        template: one space). The model generates it before the reply; it is taken off the reply, so that a client
        that sends the reply back in the next messages renders the conversation the model saw."""
        try:
            prompt = self.render(self._probe_messages()[:1], add_generation_prompt=True)
            whole = self._probe[0]
        except ChatTemplateError:  # a template that cannot render this probe: keep replies as generated
            return ""
        rest = whole[len(prompt) :] if whole.startswith(prompt) else ""
        return rest[: rest.index(_PROBE_REPLY)] if _PROBE_REPLY in rest else ""

    @cached_property
    def end_of_turn(self) -> str:
        """What the template writes after an assistant's reply inside its generation span: generation stops there.

        Found by rendering a probe reply; a template without generation markers ends turns at `<|endoftext|>`.
        """
        text, spans = self._probe
        for start, end in spans:
            body = text[start:end]
            if _PROBE_REPLY in body:
                marker = body[body.index(_PROBE_REPLY) + len(_PROBE_REPLY) :].strip()
                if marker:
                    return marker
        return EOT_TEXT

    @cached_property
    def end_of_turn_ids(self) -> list[int]:
        return get_tokenizer().encode(self.end_of_turn, allow_special=True)


def _overlap_mask(text: str, ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose bytes overlap one of the character `spans` of `text`."""
    if not spans:
        return [0] * len(ids)
    # Character offsets -> byte offsets, so tokens that split a multi-byte character are handled exactly.
    byte_spans = [(len(text[:start].encode()), len(text[:end].encode())) for start, end in spans if end > start]
    tokenizer = get_tokenizer()
    mask, position, span_index = [], 0, 0
    for token in ids:
        token_start, token_end = position, position + len(tokenizer.decode_bytes([token]))
        position = token_end
        while span_index < len(byte_spans) and token_start >= byte_spans[span_index][1]:
            span_index += 1
        inside = span_index < len(byte_spans) and token_end > byte_spans[span_index][0]
        mask.append(int(inside))
    return mask


# ---------------------------------------------------------------- templates stored with checkpoints


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, read from its header alone (no tensors, no torch)."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file")
            (header_size,) = struct.unpack("<Q", prefix)
            header = json.loads(handle.read(min(header_size, 100 * 1024 * 1024)))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable safetensors header ({error})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def read_chat_template(checkpoint: str | Path) -> ChatTemplate | None:
    """The chat template a checkpoint carries, or None.

    Looked up in the safetensors metadata of the weights (our files and run folders), then beside them as
    `chat_template.jinja` (transformers 5) or `tokenizer_config.json`'s "chat_template" (older transformers).
    """
    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    weights = path / "model.safetensors" if path.is_dir() else path
    if weights.suffix == ".safetensors" and weights.is_file():
        source = safetensors_metadata(weights).get(CHAT_TEMPLATE_METADATA_KEY)
        if source:
            return ChatTemplate(source, origin=f"{weights} (chat template)")
    if (folder / TEMPLATE_FILE).is_file():
        return ChatTemplate.from_file(folder / TEMPLATE_FILE)
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            source = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            source = None
        if isinstance(source, str) and source:
            return ChatTemplate(source, origin=f"{tokenizer_config} (chat_template)")
    return None


def chat_template_metadata(template: ChatTemplate | None) -> dict[str, str]:
    """The safetensors metadata entry that stores `template` with the weights (empty for none)."""
    return {CHAT_TEMPLATE_METADATA_KEY: template.source} if template is not None else {}
