"""OpenAI's completion schema and its checks, without FastAPI: requests in, sequences and response pieces out.

Errors are `ApiError`s: an HTTP status and OpenAI's error object (`{"error": {"message", "type", "param",
"code"}}`). Bad input is always a 4xx.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from gpt2cli.data.tokenizer import EOT_ID, Tokenizer
from gpt2cli.generation.records import SamplingOptions

MAX_LOGPROBS = 5  # OpenAI's cap on alternatives per token
MAX_STOPS = 4  # OpenAI's cap on stop sequences


class ApiError(Exception):
    """A request that cannot be served, rendered as OpenAI's error object with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        error_type = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}


TokenIds = list[Annotated[StrictInt, Field(ge=0)]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """`POST /v1/completions`: OpenAI's fields, plus `top_k`, `min_p`, `repetition_penalty` and `ignore_eos`.

    Fields OpenAI defines that GPT-2 serving does not implement are accepted only at their neutral values.
    """

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds] = "<|endoftext|>"
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16  # None: up to the context window
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1)] = 1
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
    top_k: StrictInt | None = None  # None, 0 or -1: off
    min_p: Annotated[float, Field(ge=0, lt=1)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    ignore_eos: StrictBool = False  # keep going past <|endoftext|> (vLLM's name)
    user: StrictStr | None = None
    # OpenAI's, accepted at their neutral values only:
    suffix: None = None
    best_of: StrictInt | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: StrictStr
    add_special: StrictBool = False  # llama.cpp's field; GPT-2 adds nothing at the start, so it changes nothing
    with_pieces: StrictBool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: TokenIds


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body; the first problem becomes a 400 naming its parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        location = [part for part in first["loc"] if isinstance(part, str)]
        param = location[0] if location else None
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown parameter: {param}", param=param) from None
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {message}" if param else message, param=param) from None


@dataclass(frozen=True)
class Limits:
    context: int  # the model's block size: prompt + max_tokens must fit
    vocab_size: int
    max_n: int
    max_prompts: int


@dataclass
class Plan:
    """A checked completion request: the prompts as token ids and how to generate from each."""

    prompts: list[list[int]]
    options: list[SamplingOptions]  # per prompt (max_tokens depends on the prompt's length when not given)
    n: int
    seed: int | None
    logprobs: int | None
    echo: bool
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def plan_completion(request: CompletionRequest, tokenizer: Tokenizer, limits: Limits) -> Plan:
    _check_unsupported(request)
    if request.n > limits.max_n:
        raise ApiError(400, f"n must be at most {limits.max_n}", param="n")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOPS or any(not stop for stop in stops):
        raise ApiError(400, f"stop: at most {MAX_STOPS} non-empty strings", param="stop")
    prompts = _prompt_ids(request.prompt, tokenizer, limits)
    top_k = request.top_k if request.top_k not in (None, 0, -1) else None
    if top_k is not None and not 1 <= top_k <= limits.vocab_size:
        raise ApiError(400, f"top_k must be between 1 and {limits.vocab_size} (or -1 for off)", param="top_k")
    options = []
    for ids in prompts:
        max_tokens = limits.context - len(ids) if request.max_tokens is None else request.max_tokens
        if len(ids) + max_tokens > limits.context:
            raise ApiError(
                400,
                f"This model's maximum context length is {limits.context} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the completion). "
                "Please reduce the prompt or max_tokens.",
                param="max_tokens" if request.max_tokens else "prompt",
                code="context_length_exceeded",
            )
        options.append(
            SamplingOptions(
                max_new_tokens=max_tokens,
                temperature=1.0 if request.temperature is None else request.temperature,
                top_k=top_k,
                top_p=1.0 if request.top_p is None else request.top_p,
                min_p=request.min_p,
                repetition_penalty=request.repetition_penalty,
                stop=tuple(stops),
                ignore_eot=request.ignore_eos,
            )
        )
    include_usage = request.stream_options is not None and request.stream_options.include_usage
    return Plan(
        prompts, options, request.n, request.seed, request.logprobs, request.echo, request.stream, include_usage
    )


def _check_unsupported(request: CompletionRequest) -> None:
    if request.best_of is not None and request.best_of != request.n:
        raise ApiError(400, "best_of is not supported (leave it unset or equal to n)", param="best_of")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name) != 0.0:
            raise ApiError(400, f"{name} is not supported; use repetition_penalty", param=name)
    if request.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")


def _prompt_ids(prompt: Any, tokenizer: Tokenizer, limits: Limits) -> list[list[int]]:
    """The prompt(s) as token ids: a string, a list of strings, a list of ids, or a list of such lists."""
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt) or [EOT_ID]]  # an empty prompt starts from <|endoftext|>
    elif prompt and isinstance(prompt[0], str):
        prompts = [tokenizer.encode(text) or [EOT_ID] for text in prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(ids) for ids in prompt]
    if not prompts or any(not ids for ids in prompts):
        raise ApiError(400, "prompt must not be empty", param="prompt")
    if len(prompts) > limits.max_prompts:
        raise ApiError(400, f"at most {limits.max_prompts} prompts per request", param="prompt")
    if any(token >= limits.vocab_size for ids in prompts for token in ids):
        raise ApiError(400, f"token ids must be below the vocabulary size {limits.vocab_size}", param="prompt")
    return prompts


# ---------------------------------------------------------------- responses


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """One token as text (a token that is part of a UTF-8 character shows as U+FFFD)."""
    return tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")


@dataclass
class Logprobs:
    """OpenAI's legacy `logprobs` object of one choice, built token by token."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, text: str, offset: int, logprob: float | None, top: dict[str, float] | None) -> None:
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(offset)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def top_dict(
    tokenizer: Tokenizer, pairs: list[tuple[int, float]] | None, chosen: int, logprob: float | None
) -> dict[str, float] | None:
    """Alternatives as {token text: log-probability}, the chosen token included (as OpenAI returns them)."""
    if pairs is None:
        return None
    top = {token_text(tokenizer, token): value for token, value in pairs}
    if logprob is not None:
        top.setdefault(token_text(tokenizer, chosen), logprob)
    return top


def completion_object(
    plan: Plan,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, int] | None,
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": plan.id,
        "object": "text_completion",
        "created": plan.created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        document["usage"] = usage
    return document


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
