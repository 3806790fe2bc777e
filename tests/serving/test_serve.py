"""`gpt2 serve`: a real server process on a free port, called with the official `openai` client and with httpx."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import cli_env, run_cli
from gpt2cli import get_tokenizer

openai = pytest.importorskip("openai")

API_KEY = "test-key"
PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time there was", "A", "To be, or not to be"]
EVAL_TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are "
    "all resolved rather to die than to famish?"
)


class Server:
    """`gpt2 serve` in its own process; its stderr lines are collected as they come."""

    def __init__(self, checkpoint: Path, *flags: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gpt2cli", "serve", str(checkpoint), "--port", "0", *flags],
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(120):
            self.process.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        address = next(line for line in self.lines if " on http://" in line).split(" on ")[1].split()[0]
        self.url = address

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if " on http://" in line:
                self._ready.set()

    def log_records(self, wait_for: int = 0) -> list[dict]:
        """The JSON request logs so far, waiting (a little) until there are `wait_for` of them: a request's line
        is written when its response has been sent, so it may come just after the client has its answer."""
        deadline = time.monotonic() + 10
        while True:
            records = [json.loads(line) for line in self.lines if line.startswith("{")]
            if len(records) >= wait_for or time.monotonic() > deadline:
                return records
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch

    from gpt2cli import save_model
    from gpt2cli.model.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("serve") / "tiny.safetensors"
    return save_model(GPT2(GPT2Config(n_layer=2, n_head=4, n_embd=64, block_size=128)), path)


@pytest.fixture(scope="module")
def server(checkpoint):
    running = Server(checkpoint, "--api-key", API_KEY, "--max-batch", "6", "--json-logs", "--max-body-bytes", "4096")
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def http(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


# ---------------------------------------------------------------- the OpenAI client


def test_completion_models_and_logs(server, client):
    logged = len(server.log_records())
    assert [model.id for model in client.models.list().data] == ["tiny"]
    completion = client.completions.create(model="tiny", prompt="Hello world", max_tokens=8, temperature=0)
    choice = completion.choices[0]
    assert completion.object == "text_completion" and completion.model == "tiny" and choice.index == 0
    assert choice.finish_reason in ("length", "stop") and choice.text
    assert completion.usage.prompt_tokens == 2 and completion.usage.completion_tokens <= 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    record = server.log_records(wait_for=logged + 2)[-1]
    assert record["path"] == "/v1/completions"
    assert record["method"] == "POST" and record["status"] == 200 and record["prompt_tokens"] == 2
    assert record["completion_tokens"] == completion.usage.completion_tokens and record["duration_s"] > 0


def test_streamed_completion_equals_the_whole_one(client):
    args = dict(model="tiny", prompt="The quick brown fox", max_tokens=20, temperature=0)
    args["extra_body"] = {"ignore_eos": True}
    whole = client.completions.create(**args).choices[0]
    chunks = list(client.completions.create(**args, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.text
    assert [chunk.choices[0].finish_reason for chunk in chunks][-1] == "length" == whole.finish_reason
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])


def test_seeded_choices_do_not_depend_on_their_batch(client):
    args = dict(model="tiny", prompt="Once", max_tokens=12, n=3, seed=42, extra_body={"top_k": 50, "ignore_eos": True})
    alone = [choice.text for choice in client.completions.create(**args).choices]
    assert len(set(alone)) == 3  # three different samples...
    with ThreadPoolExecutor(6) as pool:  # ...and the same three while other requests share the batch
        noise = [pool.submit(client.completions.create, model="tiny", prompt=p, max_tokens=16) for p in PROMPTS]
        crowded = pool.submit(client.completions.create, **args)
        assert [choice.text for choice in crowded.result().choices] == alone
        [future.result() for future in noise]


def test_logprobs_of_generated_tokens(client):
    choice = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=6, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    ).choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert logprob < 0 and len(top) == 3 and top[token] == logprob == max(top.values())  # greedy: the likeliest


def test_echo_scoring_equals_gpt2_eval(server, client, checkpoint, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(EVAL_TEXT)
    result = run_cli("eval", checkpoint, text_file, "--json")
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    total_loss = report["loss"] * report["tokens"]

    scored = client.completions.create(model="tiny", prompt=EVAL_TEXT, max_tokens=0, echo=True, logprobs=1)
    logprobs = scored.choices[0].logprobs
    assert scored.choices[0].text == EVAL_TEXT and logprobs.token_logprobs[0] is None
    assert len(logprobs.token_logprobs) == report["tokens"] + 1
    assert -sum(logprobs.token_logprobs[1:]) == pytest.approx(total_loss, rel=1e-4)

    # lm-evaluation-harness's form: token ids, one new token; the prompt's scores come first
    ids = get_tokenizer().encode(EVAL_TEXT)
    harness = client.completions.create(model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    harnessed = harness.choices[0].logprobs
    assert harnessed.token_logprobs[0] is None and len(harnessed.tokens) == len(ids) + 1  # the generated one too
    assert harnessed.token_logprobs[1 : len(ids)] == pytest.approx(logprobs.token_logprobs[1:], rel=1e-5)


def test_greedy_equals_gpt2_sample_for_concurrent_prompts(client, checkpoint, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    result = run_cli(
        "sample", checkpoint, "--prompts-file", prompts_file, "--temperature", "0", "--max-new-tokens", "24", "--json"
    )
    assert result.returncode == 0, result.stderr.decode()
    expected = {record["prompt"]: record["completion"] for record in map(json.loads, result.stdout.splitlines())}

    def complete(prompt: str) -> str:
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        served = dict(zip(PROMPTS, pool.map(complete, PROMPTS), strict=True))
    assert served == expected


def test_sixteen_streams_complete_while_one_client_disconnects(server, client):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(16)]
    args = dict(model="tiny", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    expected = {p: client.completions.create(prompt=p, **args).choices[0].text for p in prompts}

    def stream(prompt: str) -> str:
        chunks = client.completions.create(prompt=prompt, stream=True, **args)
        return "".join(chunk.choices[0].text for chunk in chunks)

    def leave_early() -> int:
        body = {"prompt": "Goodbye", "max_tokens": 120, "stream": True, "ignore_eos": True}
        with http(server) as session, session.stream("POST", "/v1/completions", json=body) as response:
            for received, _ in enumerate(response.iter_lines()):
                if received == 4:
                    return received  # closing the connection mid-stream
        return -1

    with ThreadPoolExecutor(17) as pool:
        quitter = pool.submit(leave_early)
        results = dict(zip(prompts, pool.map(stream, prompts), strict=True))
    assert quitter.result() == 4
    assert results == expected
    with http(server) as session:  # the slot of the client that left is free again
        deadline = time.monotonic() + 20
        while session.get("/health").json()["slots_processing"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session.get("/health").json()["slots_processing"] == 0


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [
        ("POST", "/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature"),
        ("POST", "/v1/completions", {"prompt": "x", "n": 17}, 400, "n"),
        ("POST", "/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
        ("POST", "/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 200}, 400, "max_tokens"),
        ("POST", "/v1/completions", {"prompt": list(range(128)), "max_tokens": 1}, 400, "max_tokens"),
        ("POST", "/v1/completions", {"prompt": [50257]}, 400, "prompt"),
        ("POST", "/v1/completions", {"prompt": []}, 400, "prompt"),
        ("POST", "/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("POST", "/v1/completions", {"prompt": "x", "frequency_penalty": 1}, 400, "frequency_penalty"),
        ("POST", "/v1/completions", {"prompt": "x", "temprature": 1}, 400, "temprature"),
        ("POST", "/v1/completions", {"prompt": 5}, 400, "prompt"),
        ("POST", "/v1/completions", b"{not json", 400, None),
        ("POST", "/v1/completions", [1, 2], 400, None),
        ("POST", "/v1/completions", {"prompt": "x" * 5000}, 413, None),
        ("POST", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ("POST", "/v1/chat/completions", {"messages": []}, 404, None),
        ("GET", "/v1/nothing", None, 404, None),
        ("POST", "/detokenize", {"tokens": [99999]}, 400, "tokens"),
        ("POST", "/tokenize", {"text": "x"}, 400, "text"),
    ],
)
def test_bad_input_gets_its_status_and_error_json(server, method, path, body, status, param):
    with http(server) as session:
        content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
        response = session.request(method, path, content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param
        good = session.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2})
        assert good.status_code == 200 and good.json()["choices"][0]["index"] == 0


def test_missing_or_wrong_key_is_401_and_health_needs_none(server):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": API_KEY}):
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_tokenize_and_detokenize(server):
    with http(server) as session:
        tokens = session.post("/tokenize", json={"content": "Hello world"}).json()["tokens"]
        assert tokens == [15496, 995]
        assert session.post("/detokenize", json={"tokens": tokens}).json() == {
            "content": "Hello world",
            "prompt": "Hello world",
        }


def test_loading_answers_503():
    from fastapi.testclient import TestClient

    from gpt2cli.serving.app import ServerState, create_app
    from gpt2cli.settings.sections import ServeSettings

    app = create_app(ServerState(ServeSettings(), "tiny", get_tokenizer()), log=lambda record: None)
    with TestClient(app) as test_client:
        for response in (test_client.get("/health"), test_client.post("/v1/completions", json={"prompt": "x"})):
            assert response.status_code == 503 and response.json()["error"]["code"] == "model_loading"


def test_without_the_extra_it_says_what_to_install(tmp_path, checkpoint):
    fake = tmp_path / "fastapi"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named fastapi')\n")
    env = cli_env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "gpt2cli", "serve", str(checkpoint)], capture_output=True, env=env, timeout=120
    )
    assert result.returncode == 2
    expected = "gpt2: error: gpt2 serve needs the serve extra: pip install 'gpt2cli[serve]'"
    assert result.stderr.decode().strip() == expected


def test_ctrl_c_ends_streams_and_exits_130(server):  # last: it stops the module's server
    body = {"prompt": "Hello", "max_tokens": 120, "stream": True, "ignore_eos": True}
    with http(server) as session, session.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        next(lines)
        server.process.send_signal(signal.SIGINT)
        started = time.monotonic()
        rest = list(lines)
    assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
    assert server.process.wait(timeout=15) == 130
    assert time.monotonic() - started < 10
