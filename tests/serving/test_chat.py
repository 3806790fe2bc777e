"""`gpt2 serve`'s chat route and tokenizer routes, in process: the app over the real engine, loaded by the server's own
`load_engine` (with `--prompt-lookup 3`), called through FastAPI's test client, by the official `openai` client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from gpt2cli import get_tokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

API_KEY = "chat-key"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The same tiny model with the default chat template in its metadata, and without one."""
    import torch

    from gpt2cli import save_model
    from gpt2cli.formats.chat_template import CHAT_TEMPLATE_METADATA_KEY, DEFAULT_CHAT_TEMPLATE
    from gpt2cli.model.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=4, n_embd=64, block_size=128))
    folder = tmp_path_factory.mktemp("chat")
    return {
        "chat": save_model(
            model, folder / "chat.safetensors", metadata={CHAT_TEMPLATE_METADATA_KEY: DEFAULT_CHAT_TEMPLATE}
        ),
        "plain": save_model(model, folder / "plain.safetensors"),
    }


def serve_in_process(checkpoint: Path, **settings):
    """The app `gpt2 serve` runs, its engine loaded as the server loads it; a test client on it."""
    from fastapi.testclient import TestClient

    from gpt2cli.formats.chat_template import read_chat_template
    from gpt2cli.serving.app import ServerState, create_app
    from gpt2cli.serving.server import load_engine
    from gpt2cli.settings.sections import ServeSettings

    serve_settings = ServeSettings(api_key=API_KEY, max_batch=4, **settings)
    state = ServerState(serve_settings, "tiny", get_tokenizer(), chat_template=read_chat_template(checkpoint))
    load_engine(str(checkpoint), serve_settings, state)
    test_client = TestClient(create_app(state, log=lambda record: None))
    test_client.headers["Authorization"] = f"Bearer {API_KEY}"
    return state, test_client


@pytest.fixture(scope="module")
def http(checkpoints):
    state, test_client = serve_in_process(checkpoints["chat"], prompt_lookup=3)
    with test_client:
        yield test_client
    state.engine.stop()


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key=API_KEY, http_client=http, max_retries=0)


def reply_of_gpt2_sample(checkpoint: Path, prompt: str, max_new_tokens: int) -> str:
    result = run_cli(
        "sample", checkpoint, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", max_new_tokens, "--json"
    )
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)["completion"]


# ---------------------------------------------------------------- chat with the openai client


def test_greedy_chat_equals_gpt2_sample_on_the_rendered_template(client, checkpoints):
    from gpt2cli.formats.chat_template import ChatTemplate

    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    choice = chat.choices[0]
    assert chat.object == "chat.completion" and chat.model == "tiny" and chat.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")

    prompt = ChatTemplate.default().render(MESSAGES, add_generation_prompt=True)  # ends "Assistant:"
    sampled = reply_of_gpt2_sample(checkpoints["chat"], prompt, 24)
    # The template writes one space between "Assistant:" and a reply: the model generates it, the reply leaves it.
    assert sampled.startswith(" ") and choice.message.content == sampled.removeprefix(" ")
    assert chat.usage.prompt_tokens == len(get_tokenizer().encode(prompt))
    assert chat.usage.completion_tokens == 24 or choice.finish_reason == "stop"


def test_a_multi_turn_chat_is_the_templates_tokens_sent_as_a_completion(client):
    """A past reply ends its turn with <|endoftext|>: the chat route encodes it as the one special token, as the
    renderer does, and sending the renderer's ids to /v1/completions gives the same greedy reply."""
    from gpt2cli.formats.chat_template import ChatTemplate

    first = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    conversation = [
        *MESSAGES,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And of Italy?"},
    ]
    second = client.chat.completions.create(model="tiny", messages=conversation, max_tokens=12, temperature=0)
    ids = ChatTemplate.default().encode(conversation, add_generation_prompt=True).ids
    assert ids.count(get_tokenizer().eot_id) == 1 and second.usage.prompt_tokens == len(ids)
    completion = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert second.choices[0].message.content == completion.choices[0].text.removeprefix(" ")


def test_streamed_chat_equals_the_whole_reply(client):
    args = dict(model="tiny", messages=MESSAGES, max_completion_tokens=20, temperature=0)
    whole = client.chat.completions.create(**args).choices[0]
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    *content, last, usage = chunks
    assert (
        "".join(chunk.choices[0].delta.content or "" for chunk in [chunks[0], *content, last]) == whole.message.content
    )
    assert last.choices[0].finish_reason == whole.finish_reason
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-2])
    assert usage.choices == [] and usage.usage.completion_tokens == 20 and usage.usage.prompt_tokens > 0


def test_n_with_a_seed_samples_different_replies_again_and_again(client):
    args = dict(model="tiny", messages=MESSAGES, max_tokens=10, n=3, seed=11, temperature=1.0)
    replies = [choice.message.content for choice in client.chat.completions.create(**args).choices]
    assert len(set(replies)) == 3
    assert [choice.message.content for choice in client.chat.completions.create(**args).choices] == replies
    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == replies


def test_stop_ends_the_reply_before_the_stop_text(client):
    args = dict(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    raw = " " + client.chat.completions.create(**args).choices[0].message.content  # as generated
    stop = raw[8:11]
    stopped = client.chat.completions.create(**args, stop=[stop, "never appears"]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.message.content == raw[: raw.index(stop)].removeprefix(" ")


def test_logprobs_in_chats_shape(client):
    choice = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    ).choices[0]
    content = choice.logprobs.content
    assert len(content) == 6  # one per generated token, the reply's leading space included
    assert "".join(token.token for token in content) == " " + choice.message.content
    for token in content:
        assert bytes(token.bytes).decode() == token.token and token.logprob < 0
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].token == token.token  # greedy: the likeliest
        assert token.top_logprobs[0].logprob == token.logprob >= token.top_logprobs[1].logprob
    args = dict(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    streamed = [
        token
        for chunk in client.chat.completions.create(**args, stream=True)
        if chunk.choices
        for token in (chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else [])
    ]
    assert [token.model_dump() for token in streamed] == [token.model_dump() for token in content]
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, logprobs=True)
    assert all(token.top_logprobs == [] for token in plain.choices[0].logprobs.content)
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices[0].logprobs is None


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "messages"),
        ({"messages": "Hello"}, 400, "messages"),
        ({"messages": MESSAGES, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"),
        ({"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
        ({"messages": MESSAGES, "logprobs": 3}, 400, "logprobs"),
        ({"messages": MESSAGES, "n": 17}, 400, "n"),
        ({"messages": MESSAGES, "max_tokens": 200}, 400, "max_tokens"),
        ({"messages": MESSAGES, "max_completion_tokens": 200}, 400, "max_completion_tokens"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 6}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "word " * 130}]}, 400, "messages"),  # past the context of 128
        ({"messages": MESSAGES, "tools": []}, 400, "tools"),
        ({"messages": MESSAGES, "model": "gpt-4o"}, 404, "model"),
        ({}, 400, "messages"),
    ],
)
def test_bad_chat_requests_get_their_status_and_error_json(http, body, status, param):
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]


def test_the_developer_role_and_text_parts_are_accepted(client):
    messages = [
        {"role": "developer", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}],
        },
    ]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
    expected = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0)
    assert reply.choices[0].message.content == expected.choices[0].message.content


def test_without_a_template_chat_is_a_404_naming_gpt2_convert(checkpoints):
    state, test_client = serve_in_process(checkpoints["plain"])
    try:
        with test_client:
            response = test_client.post("/v1/chat/completions", json={"messages": MESSAGES})
            info = test_client.get("/tokenizer_info").json()
    finally:
        state.engine.stop()
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "chat_template_missing" and "gpt2 convert" in error["message"]
    assert "--chat-template" in error["message"]
    assert info["chat_template"] is None and info["eos_token"] == "<|endoftext|>"


def test_a_wrong_key_is_401(http):
    response = http.post("/v1/chat/completions", json={"messages": MESSAGES}, headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_a_broken_template_in_the_checkpoint_stops_serve_with_one_line(tmp_path):
    import torch

    from gpt2cli import save_model
    from gpt2cli.formats.chat_template import CHAT_TEMPLATE_METADATA_KEY
    from gpt2cli.model.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=1, n_embd=8, block_size=16))
    path = save_model(model, tmp_path / "broken.safetensors", metadata={CHAT_TEMPLATE_METADATA_KEY: "{% for x in %}"})
    result = run_cli("serve", path, "--port", "0")
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "chat template" in lines[0]


def test_prompt_lookup_must_draft_at_least_one_token(checkpoints):
    result = run_cli("serve", checkpoints["plain"], "--prompt-lookup", "0")
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "prompt_lookup" in lines[0]


# ---------------------------------------------------------------- tokenizer routes: lm-evaluation-harness's contract


def test_the_harness_finds_the_servers_tokenizer(http):
    """What lm-evaluation-harness 0.4.13 asks of a server before it uses it as its tokenizer, in its words:
    `lm_eval/models/openai_completions.py` (`LocalCompletionsAPI`, `tokenizer_backend="auto"`) calls
    `lm_eval/utils.py`'s `check_remote_tokenizer_support`: `GET /tokenizer_info` answers a JSON object with
    "eos_token", and `POST /tokenize` with `{"prompt": "test", "add_special_tokens": false}` answers a list under
    "tokens". Then `RemoteTokenizer` encodes with that payload, takes `eos_token_id` as the first token of the
    encoded "eos_token" (and `prefix_token_id` as `bos_token_id or eos_token_id`), and decodes with
    `POST /detokenize {"tokens": [...]}`, reading "prompt"; its chat template is "chat_template"."""
    from gpt2cli.formats.chat_template import DEFAULT_CHAT_TEMPLATE

    info = http.get("/tokenizer_info")
    assert info.status_code == 200 and isinstance(info.json(), dict)
    assert info.json()["eos_token"] == info.json()["bos_token"] == "<|endoftext|>"
    assert info.json()["chat_template"] == DEFAULT_CHAT_TEMPLATE

    def encode(text: str) -> list[int]:
        response = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
        assert response.status_code == 200, response.text
        return response.json()["tokens"]

    assert encode("test") == [9288]
    assert encode(info.json()["eos_token"])[0] == 50256  # the harness's end-of-text id: the one special token
    assert encode("Hello world<|endoftext|>Bye") == [15496, 995, 50256, *get_tokenizer().encode("Bye")]
    decoded = http.post("/detokenize", json={"tokens": [15496, 995, 50256]}).json()
    assert decoded["prompt"] == "Hello world<|endoftext|>"
    with_model = http.post("/tokenize", json={"model": "tiny", "prompt": "test", "add_special_tokens": True})
    assert with_model.json()["tokens"] == [9288] and with_model.json()["count"] == 1
    assert with_model.json()["max_model_len"] == 128


def test_llama_cpp_shapes_still_work(http):
    tokens = http.post("/tokenize", json={"content": "Hello<|endoftext|>", "add_special": True}).json()["tokens"]
    assert tokens == [15496, 50256]
    pieces = http.post("/tokenize", json={"content": "Hi there", "with_pieces": True}).json()["tokens"]
    assert pieces == [{"id": 17250, "piece": "Hi"}, {"id": 612, "piece": " there"}]
    assert http.post("/detokenize", json={"tokens": [17250, 612]}).json()["content"] == "Hi there"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"content": "a", "prompt": "b"}, "content"),
        ("/tokenize", {"add_special_tokens": False}, "content"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "a", "text": "b"}, "text"),
        ("/detokenize", {"tokens": [50257]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ],
)
def test_bad_tokenizer_requests_are_400(http, path, body, param):
    response = http.post(path, json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_a_prompt_past_the_context_is_a_400_even_without_max_tokens(http):
    response = http.post("/v1/completions", json={"prompt": list(range(130)), "max_tokens": None})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert response.json()["error"]["param"] == "prompt"


def test_the_default_completion_prompt_is_the_one_end_of_text_token(http):
    response = http.post("/v1/completions", json={"max_tokens": 1, "temperature": 0})
    assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] == 1


def test_scoring_text_the_model_would_end_still_scores_the_generated_token(tmp_path):
    """The harness scores a continuation with `echo`, `max_tokens` 1 and `logprobs` 1 and sums
    `token_logprobs[ctxlen:-1]` (`LocalCompletionsAPI.parse_logprobs`): the generated token must be there even when
    it is <|endoftext|>. Here a model made to predict it after anything."""
    import torch

    from gpt2cli import save_model
    from gpt2cli.formats.chat_template import CHAT_TEMPLATE_METADATA_KEY, DEFAULT_CHAT_TEMPLATE
    from gpt2cli.model.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=64))
    with torch.no_grad():  # the final norm outputs a constant; the end-of-text embedding points along it
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.normal_()
        model.transformer.wte.weight[50256] = model.transformer.ln_f.bias * 100
    metadata = {CHAT_TEMPLATE_METADATA_KEY: DEFAULT_CHAT_TEMPLATE}
    path = save_model(model, tmp_path / "ends.safetensors", metadata=metadata)
    state, test_client = serve_in_process(path)
    ids = get_tokenizer().encode("Hello world, how are you")
    try:
        with test_client:
            scored = test_client.post(
                "/v1/completions",
                json={"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0},
            ).json()
            chat = test_client.post(
                "/v1/chat/completions", json={"messages": MESSAGES, "logprobs": True, "temperature": 0}
            ).json()
    finally:
        state.engine.stop()
    choice = scored["choices"][0]
    assert choice["text"] == "Hello world, how are you" and choice["finish_reason"] == "stop"
    assert (
        len(choice["logprobs"]["token_logprobs"]) == len(ids) + 1
        and choice["logprobs"]["tokens"][-1] == "<|endoftext|>"
    )
    assert choice["logprobs"]["token_logprobs"][-1] == pytest.approx(0.0, abs=1e-3)
    assert scored["usage"]["completion_tokens"] == 1
    reply = chat["choices"][0]  # a reply that ends at once: empty, and its end is no token of the message
    assert reply["message"]["content"] == "" and reply["finish_reason"] == "stop"
    assert reply["logprobs"]["content"] == [] and chat["usage"]["completion_tokens"] == 1
