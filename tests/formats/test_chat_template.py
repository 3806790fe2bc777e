"""Chat templates: rendering and assistant masks against transformers' own, and templates carried by checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from gpt2cli import save_model
from gpt2cli.errors import ChatTemplateError
from gpt2cli.formats.chat_template import (
    CHAT_TEMPLATE_METADATA_KEY,
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    read_chat_template,
    validate_messages,
)
from gpt2cli.model.gpt2 import GPT2, GPT2Config

CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 日本 ünïcode 🤖"},
    {"role": "assistant", "content": "Tokyo 東京 🎉"},
]
# A template of another family: ChatML-style markers written as plain text, the end marker inside the span.
CHATML_TEMPLATE = """\
{% for message in messages %}
<|im_start|>{{ message['role'] }}
{% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}

{% else %}
{{ message['content'] }}<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture
def native(tmp_path):
    torch.manual_seed(0)
    return save_model(GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=64)), tmp_path / "model.safetensors")


def test_default_template_marks_replies_and_their_end_only():
    rendered = ChatTemplate.default().encode(CONVERSATION)
    from gpt2cli import get_tokenizer

    tokenizer = get_tokenizer()
    assert rendered.ids == tokenizer.encode(rendered.text, allow_special=True)
    marked = [token for token, inside in zip(rendered.ids, rendered.assistant_mask, strict=True) if inside]
    assert tokenizer.decode(marked) == " Paris.<|endoftext|> Tokyo 東京 🎉<|endoftext|>"
    assert rendered.ids.count(tokenizer.eot_id) == 2  # the end of each reply is the one special token
    template = ChatTemplate.default()
    assert template.end_of_turn == "<|endoftext|>" and template.end_of_turn_ids == [tokenizer.eot_id]
    assert template.has_generation_markers and template.is_default


def test_generation_prompt_is_the_trained_prefix_of_a_reply():
    """A prompt ends where a trained reply's tokens begin, so generation continues the trained sequence."""
    template = ChatTemplate.default()
    prompt = template.encode(CONVERSATION[:2], add_generation_prompt=True)
    full = template.encode(CONVERSATION[:3])
    assert prompt.text.endswith("Assistant:")
    assert full.ids[: len(prompt.ids)] == prompt.ids
    assert full.assistant_mask[len(prompt.ids)] == 1 and not any(full.assistant_mask[: len(prompt.ids)])


@pytest.mark.parametrize("source", [DEFAULT_CHAT_TEMPLATE, CHATML_TEMPLATE], ids=["default", "chatml"])
def test_an_exported_tokenizer_gives_our_tokens_and_mask(native, tmp_path, source):
    from transformers import AutoTokenizer

    template_file = tmp_path / "template.jinja"
    template_file.write_text(source)
    run_cli("convert", native, tmp_path / "hf", "--chat-template", template_file).check_returncode()
    assert (tmp_path / "hf" / "chat_template.jinja").read_text() == source
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == source
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = ChatTemplate(source)
    for messages, generation_prompt in [(CONVERSATION, False), (CONVERSATION[:4], True)]:
        theirs = tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            add_generation_prompt=generation_prompt,
        )
        rendered = ours.encode(messages, add_generation_prompt=generation_prompt)
        assert theirs["input_ids"] == rendered.ids
        assert theirs["assistant_masks"] == rendered.assistant_mask
    assert ours.end_of_turn == ("<|endoftext|>" if source == DEFAULT_CHAT_TEMPLATE else "<|im_end|>")
    assert read_chat_template(tmp_path / "hf").source == source


def test_checkpoints_carry_their_template_through_conversions(native, tmp_path):
    assert read_chat_template(native) is None
    run_cli("convert", native, tmp_path / "chat.safetensors", "--chat-template", "default").check_returncode()
    assert read_chat_template(tmp_path / "chat.safetensors").is_default
    result = run_cli("convert", tmp_path / "chat.safetensors", tmp_path / "hf", "--json")
    assert json.loads(result.stdout)["chat_template"] == f"from {tmp_path / 'chat.safetensors'}"
    run_cli("convert", tmp_path / "hf", tmp_path / "again.safetensors").check_returncode()
    assert read_chat_template(tmp_path / "again.safetensors").is_default
    # Metadata written by anything that saves a model with the entry is read the same way.
    save_model(GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=64)), tmp_path / "direct.safetensors",
               metadata={CHAT_TEMPLATE_METADATA_KEY: CHATML_TEMPLATE})  # fmt: skip
    assert read_chat_template(tmp_path / "direct.safetensors").source == CHATML_TEMPLATE


def test_bad_templates_are_one_line_errors(native, tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for message in messages %}{{ message['content'] }}")
    result = run_cli("convert", native, tmp_path / "out.safetensors", "--chat-template", broken)
    assert_one_line_error(result, 2, "broken.jinja", "line")
    result = run_cli("convert", native, tmp_path / "out.safetensors", "--chat-template", tmp_path / "missing.jinja")
    assert_one_line_error(result, 2, "missing.jinja")
    result = run_cli("convert", native, tmp_path / "out.gguf", "--chat-template", "default")
    assert_one_line_error(result, 2, "gguf", "chat template")
    assert not list(tmp_path.glob("out*"))


def test_templates_without_markers_and_raising_templates():
    plain = ChatTemplate("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert not plain.has_generation_markers and plain.end_of_turn == "<|endoftext|>"
    assert not any(plain.encode(CONVERSATION).assistant_mask)
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="user first"):
        strict.render(CONVERSATION)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        (["hello"], "messages[0]: expected an object"),
        ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
        ([{"role": "user"}], "no 'content'"),
        ([{"role": "user", "content": 3}], "must be a string"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "only text parts"),
    ],
)
def test_bad_messages_name_the_place_and_field(value, fragment):
    with pytest.raises(ChatTemplateError, match=r"data\.jsonl:7") as error:
        validate_messages(value, "data.jsonl:7")
    assert fragment in str(error.value)


def test_text_parts_are_joined():
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    assert validate_messages([{"role": "user", "content": parts}], "x") == [{"role": "user", "content": "Hello, world"}]
