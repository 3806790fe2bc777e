"""`gpt2 chat` on a pipe (in-process through the real CLI) and its conversation core: replies equal the generator
on the template's rendering, history trimmed from the front to fit the context, one escaped line per reply."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import assert_one_line_error, biased_model, cli_env, run_cli

CONTEXT = 64


@pytest.fixture(scope="module")
def template():
    from gpt2cli.formats.chat_template import ChatTemplate

    return ChatTemplate.default()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, template) -> Path:
    import torch

    from gpt2cli import save_model
    from gpt2cli.formats.chat_template import CHAT_TEMPLATE_METADATA_KEY
    from gpt2cli.model.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=CONTEXT))
    path = tmp_path_factory.mktemp("chat") / "tiny.safetensors"
    return save_model(model, path, metadata={CHAT_TEMPLATE_METADATA_KEY: template.source})


@pytest.fixture(scope="module")
def generator(checkpoint):
    from gpt2cli import get_tokenizer, load_model
    from gpt2cli.generation.generator import TextGenerator

    return TextGenerator(load_model(checkpoint), get_tokenizer())


def chat(checkpoint: Path, lines: list[str], *flags: str):
    return run_cli(
        "chat", checkpoint, *flags, input="".join(line + "\n" for line in lines), env=cli_env(OMP_NUM_THREADS="1")
    )


def test_greedy_replies_are_the_generator_on_the_rendered_conversation(checkpoint, generator, template):
    from gpt2cli.generation.records import SamplingOptions

    result = chat(checkpoint, ["Hi there", "/temperature", "What now?"], "--temperature", "0", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr.decode()
    replies = result.stdout.decode().split("\n")[:-1]
    assert len(replies) == 2  # one line per message; the command printed nothing on stdout
    assert "temperature 0" in result.stderr.decode()

    options = SamplingOptions(max_new_tokens=6, temperature=0)
    messages: list[dict[str, str]] = []
    for message, shown in zip(["Hi there", "What now?"], replies, strict=True):
        messages.append({"role": "user", "content": message})
        ids = template.encode(messages, add_generation_prompt=True).ids
        [expected] = generator.generate([ids], options)
        content = expected.text.removeprefix(" ")  # the default template writes "Assistant:" + " " + content
        assert shown == content.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        messages.append({"role": "assistant", "content": content})


def test_a_reply_with_newlines_stays_on_one_line(tmp_path, template):
    from gpt2cli.formats.chat_template import CHAT_TEMPLATE_METADATA_KEY

    newline, letter = 198, 64  # "\n", "a": the model writes only these
    path = biased_model(
        tmp_path / "lines.safetensors", {newline, letter}, metadata={CHAT_TEMPLATE_METADATA_KEY: template.source}
    )
    result = chat(path, ["one", "", "two", "/quit", "never answered"], "--max-new-tokens", "12", "--seed", "3")
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().split("\n")
    assert lines[-1] == "" and len(lines[:-1]) == 2  # blank line and /quit: no reply; after /quit: nothing
    assert all("\\n" in line and set(line.replace("\\n", "")) <= {"a"} for line in lines[:-1]), lines


def test_the_history_is_trimmed_from_the_front_with_a_notice(checkpoint):
    words = "the cat sat on the mat " * 3  # about 18 tokens a message: a few turns outgrow 64 - 8
    result = chat(checkpoint, [words, words, words, words], "--max-new-tokens", "8", "--system", "Be brief.")
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert len(result.stdout.decode().splitlines()) == 4
    assert "outgrew the context of 64 tokens" in stderr and "dropped" in stderr


def test_a_message_longer_than_the_context_is_cut_from_the_front(checkpoint):
    result = chat(checkpoint, ["word " * 200], "--max-new-tokens", "4", "--system", "Be brief.")
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "system message was left out" in stderr and "tokens were cut" in stderr
    assert len(result.stdout.decode().splitlines()) == 1


def test_unknown_and_bad_commands_keep_the_session(checkpoint):
    result = chat(
        checkpoint, ["/temperature hot", "/temperature -1", "/bogus", "/clear", "hello"], "--max-new-tokens", "3"
    )
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert stderr.count("/temperature takes a number") == 2 and "unknown command /bogus" in stderr
    assert "cleared" in stderr and len(result.stdout.decode().splitlines()) == 1


def test_a_checkpoint_without_a_template_names_the_convert_command(tmp_path):
    import torch

    from gpt2cli import save_model
    from gpt2cli.model.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    plain = save_model(GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=32)), tmp_path / "plain.safetensors")
    result = chat(plain, ["hello"])
    assert_one_line_error(result, 2, "no chat template", "gpt2 convert", "--chat-template")
    assert result.stdout == b""
    assert_one_line_error(chat(tmp_path / "missing.safetensors", ["hello"]), 2, "no such file")


def test_a_message_the_template_refuses_is_one_line_and_not_kept(tmp_path, template, generator):
    from gpt2cli import save_model
    from gpt2cli.errors import ChatTemplateError
    from gpt2cli.formats.chat_template import CHAT_TEMPLATE_METADATA_KEY, ChatTemplate
    from gpt2cli.generation.chat import Conversation

    refusing = ChatTemplate(
        "{%- for message in messages %}{% if message['content'] == 'boom' %}{{ raise_exception('no boom') }}"
        "{% endif %}{% endfor %}" + template.source
    )
    conversation = Conversation(generator, refusing)
    with pytest.raises(ChatTemplateError, match="no boom"):
        conversation.add_user_message("boom", max_new_tokens=4)
    assert conversation.messages == []  # the next message renders without it

    path = save_model(
        generator.model, tmp_path / "refusing.safetensors", metadata={CHAT_TEMPLATE_METADATA_KEY: refusing.source}
    )
    result = chat(path, ["hi", "boom", "never"], "--max-new-tokens", "3")
    assert_one_line_error(result, 2, "no boom")
    assert len(result.stdout.decode().splitlines()) == 1  # "hi" was answered; a script stops at the refusal


@pytest.mark.parametrize(
    ("flags", "config", "fragment"),
    [
        (["--temperature", "-1"], None, "temperature"),
        (["--top-p", "0"], None, "top_p"),
        ([], "[chat]\nnum_samples = 2\n", "a chat answers each message once"),
        ([], "[chat]\nignore_eot = true\n", "ends at the template's end of turn"),
        ([], "[chat]\nsystem = ''\n", "chat.system"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(checkpoint, tmp_path, flags, config, fragment):
    if config is not None:
        (tmp_path / "chat.toml").write_text(config)
        flags = [*flags, "--config", str(tmp_path / "chat.toml")]
    result = chat(checkpoint, ["hello"], *flags)
    assert result.returncode == 2 and fragment in result.stderr.decode(), result.stderr.decode()
    assert "Traceback" not in result.stderr.decode() and result.stdout == b""


# ---------------------------------------------------------------- the conversation core


def test_trimming_drops_whole_turns_and_keeps_the_newest_message(generator, template):
    from gpt2cli.generation.chat import Conversation, reply_room

    conversation = Conversation(generator, template, system="Be brief.")
    long = "the cat sat on the mat " * 3
    for index in range(3):
        conversation.messages += [
            {"role": "user", "content": f"{index} {long}"},
            {"role": "assistant", "content": "ok"},
        ]
    prompt = conversation.add_user_message("last one", max_new_tokens=8)
    assert len(prompt.ids) <= CONTEXT - reply_room(CONTEXT, 8) and prompt.dropped_messages % 2 == 0
    assert prompt.dropped_messages > 0 and not prompt.without_system and prompt.cut_tokens == 0
    assert conversation.messages[0]["role"] == "user" and conversation.messages[-1]["content"] == "last one"
    system = {"role": "system", "content": "Be brief."}
    assert prompt.ids == template.encode([system, *conversation.messages], add_generation_prompt=True).ids

    conversation.clear()
    assert conversation.messages == [] and conversation.system == "Be brief."
    assert reply_room(64, 1000) == 32 and reply_room(64, 8) == 8
    assert template.reply_prefix == " "  # what the default template writes between "Assistant:" and the content


CHATML = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{%- if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{%- else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_text_end_of_turn_becomes_a_stop_string(generator):
    from gpt2cli.formats.chat_template import ChatTemplate
    from gpt2cli.generation.chat import Conversation
    from gpt2cli.generation.records import SamplingOptions

    default = Conversation(generator, ChatTemplate.default())
    assert default.options_for_turn(SamplingOptions(ignore_eot=True)) == SamplingOptions()

    chatml = Conversation(generator, ChatTemplate(CHATML))  # turns end with text, not <|endoftext|>
    options = chatml.options_for_turn(SamplingOptions(stop=("x",)))
    assert options.stop == ("x", "<|im_end|>") and not options.ignore_eot
    assert chatml.reply_prefix == ""
