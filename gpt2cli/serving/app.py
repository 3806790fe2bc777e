"""The HTTP layer of `gpt2 serve` on FastAPI: OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models`,
llama.cpp's `/health`, and `/tokenize`, `/detokenize` in llama.cpp's and vLLM's shapes with vLLM's
`/tokenizer_info` (lm-evaluation-harness finds the server's tokenizer there). Generation itself is the engine's
(`engine.py`); this module turns requests into sequences and engine events into OpenAI's JSON or server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt2cli.data.tokenizer import Tokenizer
from gpt2cli.serving.engine import Engine, Event, Finished, PromptScored, Sequence, TokenGenerated
from gpt2cli.serving.page import PAGE_HEADERS, page_html
from gpt2cli.serving.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    Limits,
    Logprobs,
    Plan,
    TokenizeRequest,
    chat_completion_object,
    chat_prompt,
    chat_token_logprob,
    completion_object,
    parse,
    plan_chat,
    plan_completion,
    token_text,
    top_dict,
    usage,
)
from gpt2cli.settings.sections import ServeSettings

if TYPE_CHECKING:
    from gpt2cli.formats.chat_template import ChatTemplate


@dataclass
class ServerState:
    settings: ServeSettings
    model_name: str
    tokenizer: Tokenizer
    engine: Engine | None = None  # None while the model loads
    limits: Limits | None = None
    chat_template: ChatTemplate | None = None  # the checkpoint's; None: no chat route
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(state: ServerState, log: Callable[[dict[str, Any]], None]) -> FastAPI:
    app = FastAPI(title="gpt2 serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestLog, log=log)
    tokenizer = state.tokenizer

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"unknown route: {request.method} {request.url.path}" if error.status_code == 404 else error.detail
        code = "unknown_url" if error.status_code == 404 else None
        return JSONResponse(ApiError(error.status_code, str(message), code=code).body(), error.status_code)

    async def authorize(request: Request) -> None:
        key = state.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(
                401, "missing or incorrect API key: send 'Authorization: Bearer KEY'", code="invalid_api_key"
            )

    def ready() -> Engine:
        if state.engine is None or state.limits is None:
            raise ApiError(503, "the model is loading; try again shortly", code="model_loading")
        return state.engine

    @app.get("/")
    async def page() -> HTMLResponse:
        """The chat and completion page: static, so no key; the routes it calls ask for one."""
        return HTMLResponse(page_html(), headers=PAGE_HEADERS)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        engine = ready()
        active, waiting = engine.load
        return {
            "status": "ok",
            "slots_processing": active,
            "slots_idle": engine.max_batch - active,
            "requests_waiting": waiting,
        }

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(authorize)])
    async def model(model: str) -> dict[str, Any]:
        check_model(state, model)
        return model_card(state)

    @app.post("/tokenize", dependencies=[Depends(authorize)])
    async def tokenize(request: Request) -> dict[str, Any]:
        body = parse(TokenizeRequest, await read_json(request, state.settings.max_body_bytes))
        tokens = tokenizer.encode(body.text(), allow_special=True)  # <|endoftext|> is the one special token
        answer: dict[str, Any] = {"tokens": tokens}
        if body.with_pieces:  # llama.cpp's
            answer["tokens"] = [{"id": token, "piece": token_text(tokenizer, token)} for token in tokens]
        if body.return_token_strs:  # vLLM's
            answer["token_strs"] = [token_text(tokenizer, token) for token in tokens]
        return {**answer, "count": len(tokens), "max_model_len": state.limits.context if state.limits else None}

    @app.post("/detokenize", dependencies=[Depends(authorize)])
    async def detokenize(request: Request) -> dict[str, Any]:
        body = parse(DetokenizeRequest, await read_json(request, state.settings.max_body_bytes))
        if any(token >= tokenizer.vocab_size for token in body.tokens):
            raise ApiError(400, f"token ids must be below the vocabulary size {tokenizer.vocab_size}", "tokens")
        text = tokenizer.decode(body.tokens)
        return {"content": text, "prompt": text}  # llama.cpp's name and vLLM's

    @app.get("/tokenizer_info", dependencies=[Depends(authorize)])
    async def tokenizer_info() -> dict[str, Any]:
        """vLLM's route, as transformers' GPT-2 tokenizer describes itself (<|endoftext|> begins and ends text)."""
        return {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": tokenizer.eot_text,
            "eos_token": tokenizer.eot_text,
            "unk_token": tokenizer.eot_text,
            "pad_token": None,
            "model_max_length": state.limits.context if state.limits else None,
            "chat_template": state.chat_template.source if state.chat_template is not None else None,
        }

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: Request) -> Any:
        template = state.chat_template
        if template is None:
            raise ApiError(
                404,
                "this checkpoint has no chat template, so /v1/chat/completions is not served: attach one with "
                "'gpt2 convert CHECKPOINT OUT --chat-template default' (or a Jinja file), or send plain text to "
                "/v1/completions",
                code="chat_template_missing",
            )
        engine = ready()
        body = parse(ChatCompletionRequest, await read_json(request, state.settings.max_body_bytes))
        if body.model is not None:
            check_model(state, body.model)
        assert state.limits is not None
        prompt_ids = chat_prompt(template, body.messages)
        end_of_turn = None if template.end_of_turn == tokenizer.eot_text else template.end_of_turn
        plan = plan_chat(body, prompt_ids, end_of_turn, state.limits)
        run = ChatRun(plan, engine, tokenizer, request, template.reply_prefix)
        if plan.stream:
            return StreamingResponse(run.stream(state.model_name), media_type="text/event-stream")
        return await run.collect(state.model_name)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request) -> Any:
        engine = ready()
        body = parse(CompletionRequest, await read_json(request, state.settings.max_body_bytes))
        if body.model is not None:
            check_model(state, body.model)
        assert state.limits is not None
        plan = plan_completion(body, tokenizer, state.limits)
        run = CompletionRun(plan, engine, tokenizer, request)
        if plan.stream:
            return StreamingResponse(run.stream(state.model_name), media_type="text/event-stream")
        return await run.collect(state.model_name)

    return app


def model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "gpt2cli",
        "max_model_len": state.limits.context if state.limits else None,
    }


def check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise ApiError(
            404,
            f"the model '{name}' does not exist; this server has '{state.model_name}'",
            "model",
            code="model_not_found",
        )


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body, refused with 413 past `limit` bytes (counted as it arrives, not just declared)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error})") from None


# ---------------------------------------------------------------- one completion request


class Choice:
    """The text and log-probabilities of one choice, built from its engine events."""

    def __init__(self, index: int, prompt_ids: list[int], tokenizer: Tokenizer, logprobs: bool) -> None:
        self.index, self.prompt_ids, self.tokenizer, self.want_logprobs = index, prompt_ids, tokenizer, logprobs
        self.text = ""
        self.logprobs = Logprobs() if logprobs else None
        self.offset = 0  # of the next token's text in the choice's text
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None

    def apply(self, event: Event) -> dict[str, Any]:
        """Take an event in; return the choice's delta for a stream chunk."""
        delta = Logprobs() if self.want_logprobs else None
        if isinstance(event, PromptScored):
            text = self.tokenizer.decode(self.prompt_ids)
            for token, logprob, top in zip(self.prompt_ids, event.logprobs, event.top, strict=True):
                alternatives = None if logprob is None else top_dict(self.tokenizer, top, token, logprob)
                self._add_token(delta, token, logprob, alternatives)
        elif isinstance(event, TokenGenerated):
            text = event.text
            self.completion_tokens += 1
            self._add_token(
                delta, event.token, event.logprob, top_dict(self.tokenizer, event.top, event.token, event.logprob)
            )
        else:
            text = event.text
            self.finish_reason = "length" if event.finish_reason == "cancelled" else event.finish_reason
            self.error = event.error
        self.text += text
        if delta is not None and self.logprobs is not None:
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(self.logprobs, name).extend(getattr(delta, name))
        return {
            "text": text,
            "index": self.index,
            "logprobs": delta.as_dict() if delta is not None else None,
            "finish_reason": self.finish_reason if isinstance(event, Finished) else None,
        }

    def _add_token(self, delta: Logprobs | None, token: int, logprob: float | None, top: Any) -> None:
        piece = token_text(self.tokenizer, token)
        if delta is not None:
            delta.add(piece, self.offset, logprob, top)
        self.offset += len(piece)

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "index": self.index,
            "logprobs": self.logprobs.as_dict() if self.logprobs is not None else None,
            "finish_reason": self.finish_reason,
        }


class CompletionRun:
    """Submits a request's sequences, follows their events, and cancels them if the client goes away."""

    def __init__(self, plan: Plan, engine: Engine, tokenizer: Tokenizer, request: Request) -> None:
        self.plan, self.engine, self.request = plan, engine, request
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, event)

        self.sequences: list[Sequence] = []
        self.choices: list[Any] = []
        for prompt_index, ids in enumerate(plan.prompts):
            for sample in range(plan.n):
                index = prompt_index * plan.n + sample
                rng = torch.Generator(device=engine.device)
                if plan.seed is None:
                    rng.seed()
                else:  # one generator per choice: what it samples does not depend on its batch neighbours
                    rng.manual_seed((plan.seed + index) % 2**64)
                self.sequences.append(
                    Sequence(index, ids, plan.options[prompt_index], rng, emit, plan.logprobs, plan.echo)
                )
                self.choices.append(self.make_choice(index, ids, tokenizer))
        self.prompt_tokens = sum(len(ids) for ids in plan.prompts)

    def make_choice(self, index: int, prompt_ids: list[int], tokenizer: Tokenizer) -> Any:
        return Choice(index, prompt_ids, tokenizer, self.plan.logprobs is not None)

    async def events(self) -> AsyncIterator[tuple[Event, dict[str, Any]]]:
        """Each event with the delta of its choice, until every choice has finished; cancels on disconnect."""
        watcher = asyncio.ensure_future(self._watch_disconnect())
        self.engine.submit(self.sequences)
        pending = len(self.sequences)
        try:
            while pending:
                event = await self.queue.get()
                if event is None:  # the client went away
                    return
                delta = self.choices[event.choice].apply(event)
                pending -= isinstance(event, Finished)
                yield event, delta
        finally:
            watcher.cancel()
            if pending:
                self.engine.cancel(self.sequences)
            completion_tokens = sum(choice.completion_tokens for choice in self.choices)
            self.request.scope.setdefault("state", {})["usage"] = usage(self.prompt_tokens, completion_tokens)

    async def _watch_disconnect(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self.engine.cancel(self.sequences)
                self.queue.put_nowait(None)
                return

    def _usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, sum(choice.completion_tokens for choice in self.choices))

    async def collect(self, model: str) -> Any:
        async for _event, _delta in self.events():
            pass
        errors = [choice.error for choice in self.choices if choice.error]
        if errors:
            return JSONResponse(ApiError(500, f"generation failed: {errors[0]}").body(), status_code=500)
        return self.response_object(model, [choice.as_dict() for choice in self.choices])

    def response_object(self, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return completion_object(self.plan, model, choices, self._usage())

    async def stream(self, model: str) -> AsyncIterator[str]:
        async for event, delta in self.events():
            if isinstance(event, Finished) and event.error:
                yield sse(ApiError(500, f"generation failed: {event.error}").body())
                continue
            if delta["text"] or delta["logprobs"] or delta["finish_reason"]:
                yield sse(completion_object(self.plan, model, [delta], None))
        if self.plan.include_usage:
            yield sse(completion_object(self.plan, model, [], self._usage()))
        yield "data: [DONE]\n\n"


# ---------------------------------------------------------------- one chat request


class ChatChoice:
    """The message and log-probabilities (chat's shape) of one chat choice, built from its engine events.

    `prefix`: what the template writes between its generation prompt and the reply (`ChatTemplate.reply_prefix`),
    taken off the start of the reply; streamed text that could still be it is held back until it is known."""

    def __init__(self, index: int, tokenizer: Tokenizer, logprobs: bool, prefix: str) -> None:
        self.index, self.tokenizer = index, tokenizer
        self.content = ""
        self.logprobs: list[dict[str, Any]] | None = [] if logprobs else None
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._prefix, self._held = prefix, ""

    def apply(self, event: Event) -> dict[str, Any]:
        """Take an event in; return the choice's part of a stream chunk."""
        tokens = []
        if isinstance(event, TokenGenerated):
            self.completion_tokens += 1
            ended = event.token == self.tokenizer.eot_id  # the end of a reply, not a token of its message
            if self.logprobs is not None and event.logprob is not None and not ended:
                tokens.append(chat_token_logprob(self.tokenizer, event.token, event.logprob, event.top))
        elif isinstance(event, Finished):
            self.finish_reason = "length" if event.finish_reason == "cancelled" else event.finish_reason
            self.error = event.error
        text = self._without_prefix(getattr(event, "text", ""), final=isinstance(event, Finished))
        self.content += text
        if self.logprobs is not None:
            self.logprobs.extend(tokens)
        return {
            "index": self.index,
            "delta": {"content": text} if text else {},
            "logprobs": {"content": tokens, "refusal": None} if tokens else None,
            "finish_reason": self.finish_reason if isinstance(event, Finished) else None,
        }

    def _without_prefix(self, text: str, final: bool) -> str:
        if not self._prefix:
            return text
        held, prefix = self._held + text, self._prefix
        if prefix.startswith(held) and len(held) < len(prefix) and not final:
            self._held = held
            return ""
        self._prefix = self._held = ""
        return held.removeprefix(prefix)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "message": {"role": "assistant", "content": self.content, "refusal": None},
            "logprobs": {"content": self.logprobs, "refusal": None} if self.logprobs is not None else None,
            "finish_reason": self.finish_reason,
        }


class ChatRun(CompletionRun):
    """A chat request: the completion run's sequences and events, in chat's response shapes."""

    def __init__(self, plan: Plan, engine: Engine, tokenizer: Tokenizer, request: Request, prefix: str) -> None:
        self.prefix = prefix
        super().__init__(plan, engine, tokenizer, request)

    def make_choice(self, index: int, prompt_ids: list[int], tokenizer: Tokenizer) -> Any:
        return ChatChoice(index, tokenizer, self.plan.logprobs is not None, self.prefix)

    def response_object(self, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return chat_completion_object(self.plan, model, choices, self._usage(), chunk=False)

    async def stream(self, model: str) -> AsyncIterator[str]:
        """OpenAI's order: a chunk with each choice's role, content deltas, a last chunk per choice with its
        `finish_reason`, the usage chunk (empty `choices`) under `stream_options.include_usage`, `[DONE]`."""
        for choice in self.choices:
            role = {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
            yield sse(chat_completion_object(self.plan, model, [{**role, "finish_reason": None}], None, chunk=True))
        async for event, delta in self.events():
            if isinstance(event, Finished) and event.error:
                yield sse(ApiError(500, f"generation failed: {event.error}").body())
                continue
            if delta["delta"] or delta["logprobs"] or delta["finish_reason"]:
                yield sse(chat_completion_object(self.plan, model, [delta], None, chunk=True))
        if self.plan.include_usage:
            yield sse(chat_completion_object(self.plan, model, [], self._usage(), chunk=True))
        yield "data: [DONE]\n\n"


def sse(document: dict[str, Any]) -> str:
    return f"data: {json.dumps(document)}\n\n"


class RequestLog:
    """One line per request on stderr (method, route, status, tokens, time), written when the response ends."""

    def __init__(self, app: Any, log: Callable[[dict[str, Any]], None]) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, response = time.perf_counter(), {"status": 500}

        async def send_and_note(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            tokens = scope.get("state", {}).get("usage") or {}
            client = scope.get("client")
            self.log(
                {
                    "client": f"{client[0]}:{client[1]}" if client else None,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": response["status"],
                    "prompt_tokens": tokens.get("prompt_tokens"),
                    "completion_tokens": tokens.get("completion_tokens"),
                    "duration_s": round(time.perf_counter() - started, 4),
                }
            )
