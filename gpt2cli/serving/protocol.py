"""OpenAI's completion and chat schemas and their checks, without FastAPI: requests in, sequences and response
pieces out. The tokenizer routes' requests speak llama.cpp's shape and vLLM's (what lm-evaluation-harness sends).

Errors are `ApiError`s: an HTTP status and OpenAI's error object (`{"error": {"message", "type", "param",
"code"}}`). Bad input is always a 4xx.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from gpt2cli.data.tokenizer import EOT_ID, Tokenizer
from gpt2cli.generation.records import SamplingOptions

if TYPE_CHECKING:
    from gpt2cli.formats.chat_template import ChatTemplate

MAX_LOGPROBS = 5  # OpenAI's cap on alternatives per token (completions)
MAX_TOP_LOGPROBS = 20  # OpenAI's cap on alternatives per token (chat)
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
    # None: the one <|endoftext|> token, what GPT-2 saw before every document (OpenAI's default prompt)
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds] | None = None
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


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`: OpenAI's fields, plus `top_k`, `min_p` and `repetition_penalty`.

    `messages` are checked by the chat template's `validate_messages` (roles, text content)."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    messages: list[Any]
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None  # None: up to the context window
    max_completion_tokens: Annotated[StrictInt, Field(ge=0)] | None = None  # OpenAI's newer name of max_tokens
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1)] = 1
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    top_k: StrictInt | None = None
    min_p: Annotated[float, Field(ge=0, lt=1)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    user: StrictStr | None = None
    # OpenAI's, accepted at their neutral values only:
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class TokenizeRequest(BaseModel):
    """`POST /tokenize` in llama.cpp's shape (`content`, `add_special`, `with_pieces`) or vLLM's (`prompt`,
    `add_special_tokens`, `model`, `return_token_strs`)."""

    model_config = ConfigDict(extra="forbid")
    content: StrictStr | None = None
    prompt: StrictStr | None = None
    # GPT-2 adds no token at the start, so these change nothing:
    add_special: StrictBool = False
    add_special_tokens: StrictBool = False
    with_pieces: StrictBool = False
    return_token_strs: StrictBool = False
    model: StrictStr | None = None

    def text(self) -> str:
        """The text to tokenize: exactly one of `content` and `prompt`."""
        if (self.content is None) == (self.prompt is None):
            raise ApiError(400, "give the text as 'content' (llama.cpp) or 'prompt' (vLLM), one of them", "content")
        return self.content if self.content is not None else self.prompt or ""


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: TokenIds
    model: StrictStr | None = None  # vLLM's field


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
    """A checked completion or chat request: the prompts as token ids and how to generate from each."""

    prompts: list[list[int]]
    options: list[SamplingOptions]  # per prompt (max_tokens depends on the prompt's length when not given)
    n: int
    seed: int | None
    logprobs: int | None  # alternatives per token to report (None: no log-probabilities)
    echo: bool
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def plan_completion(request: CompletionRequest, tokenizer: Tokenizer, limits: Limits) -> Plan:
    if request.best_of is not None and request.best_of != request.n:
        raise ApiError(400, "best_of is not supported (leave it unset or equal to n)", param="best_of")
    _check_shared(request, limits)
    prompts = _prompt_ids(request.prompt, tokenizer, limits)
    options = [
        _sampling_options(request, ids, request.max_tokens, "max_tokens", _stops(request), limits) for ids in prompts
    ]
    return Plan(
        prompts,
        options,
        request.n,
        request.seed,
        request.logprobs,
        request.echo,
        request.stream,
        _include_usage(request),
    )


def plan_chat(request: ChatCompletionRequest, prompt_ids: list[int], end_of_turn: str | None, limits: Limits) -> Plan:
    """A chat request whose messages rendered to `prompt_ids` (with the generation prompt); generation also stops
    at `end_of_turn`, the text that ends an assistant turn (None: `<|endoftext|>`, where generation stops anyway)."""
    _check_shared(request, limits)
    if request.top_logprobs is not None and not request.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    both = request.max_tokens is not None and request.max_completion_tokens is not None
    if both and request.max_tokens != request.max_completion_tokens:
        raise ApiError(400, "give max_completion_tokens or max_tokens, not both", param="max_tokens")
    if not prompt_ids:
        raise ApiError(400, "the messages rendered to no tokens", param="messages")
    if any(token >= limits.vocab_size for token in prompt_ids):
        raise ApiError(400, f"token ids must be below the vocabulary size {limits.vocab_size}", param="messages")
    max_tokens, name = request.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = request.max_tokens, "max_tokens"
    stops = _stops(request) + ([end_of_turn] if end_of_turn else [])
    options = _sampling_options(request, prompt_ids, max_tokens, name, stops, limits, prompt_param="messages")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return Plan(
        [prompt_ids],
        [options],
        request.n,
        request.seed,
        logprobs,
        False,
        request.stream,
        _include_usage(request),
        id=f"chatcmpl-{uuid.uuid4().hex}",
    )


def _check_shared(request: CompletionRequest | ChatCompletionRequest, limits: Limits) -> None:
    """The checks completions and chat share: n, stop, and OpenAI's fields served at their neutral values only."""
    if request.n > limits.max_n:
        raise ApiError(400, f"n must be at most {limits.max_n}", param="n")
    stops = _stops(request)
    if len(stops) > MAX_STOPS or any(not stop for stop in stops):
        raise ApiError(400, f"stop: at most {MAX_STOPS} non-empty strings", param="stop")
    if request.top_k not in (None, 0, -1) and not 1 <= request.top_k <= limits.vocab_size:
        raise ApiError(400, f"top_k must be between 1 and {limits.vocab_size} (or -1 for off)", param="top_k")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name) != 0.0:
            raise ApiError(400, f"{name} is not supported; use repetition_penalty", param=name)
    if request.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")


def _stops(request: CompletionRequest | ChatCompletionRequest) -> list[str]:
    return [request.stop] if isinstance(request.stop, str) else list(request.stop or [])


def _include_usage(request: CompletionRequest | ChatCompletionRequest) -> bool:
    return request.stream_options is not None and request.stream_options.include_usage


def _sampling_options(
    request: CompletionRequest | ChatCompletionRequest,
    ids: list[int],
    max_tokens: int | None,
    max_tokens_param: str,
    stops: list[str],
    limits: Limits,
    prompt_param: str = "prompt",
) -> SamplingOptions:
    """How to generate from one prompt of `ids`; its tokens and `max_tokens` (None: the rest of the context) must
    fit the context."""
    if max_tokens is None:
        max_tokens = max(0, limits.context - len(ids))
    if len(ids) + max_tokens > limits.context:
        raise ApiError(
            400,
            f"This model's maximum context length is {limits.context} tokens. However, you requested "
            f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the completion). "
            f"Please reduce the {'prompt' if prompt_param == 'prompt' else 'messages'} or {max_tokens_param}.",
            param=max_tokens_param if max_tokens else prompt_param,
            code="context_length_exceeded",
        )
    return SamplingOptions(
        max_new_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_k=request.top_k if request.top_k not in (None, 0, -1) else None,
        top_p=1.0 if request.top_p is None else request.top_p,
        min_p=request.min_p,
        repetition_penalty=request.repetition_penalty,
        stop=tuple(stops),
        ignore_eot=getattr(request, "ignore_eos", False),
    )


def _prompt_ids(prompt: Any, tokenizer: Tokenizer, limits: Limits) -> list[list[int]]:
    """The prompt(s) as token ids: a string, a list of strings, a list of ids, or a list of such lists."""
    if prompt is None:
        prompts = [[EOT_ID]]
    elif isinstance(prompt, str):
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


# ---------------------------------------------------------------- chat templates


def chat_prompt(template: ChatTemplate, messages: list[Any]) -> list[int]:
    """The messages rendered with the generation prompt, as tokens (`<|endoftext|>` as the special token); bad
    messages, or a template that refuses them, are a 400 on `messages`."""
    from gpt2cli.errors import ChatTemplateError
    from gpt2cli.formats.chat_template import validate_messages

    try:
        checked = validate_messages([_openai_roles(message) for message in messages], "request")
        return template.encode(checked, add_generation_prompt=True).ids
    except ChatTemplateError as error:
        raise ApiError(400, str(error).removeprefix("request: "), param="messages") from None


def _openai_roles(message: Any) -> Any:
    """OpenAI's `developer` role is its newer name of `system`."""
    if isinstance(message, dict) and message.get("role") == "developer":
        return {**message, "role": "system"}
    return message


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


def chat_token_logprob(
    tokenizer: Tokenizer, token: int, logprob: float, top: list[tuple[int, float]] | None
) -> dict[str, Any]:
    """One token of chat's `logprobs.content`: its text, log-probability, UTF-8 bytes and likeliest alternatives."""

    def entry(token_id: int, value: float) -> dict[str, Any]:
        return {
            "token": token_text(tokenizer, token_id),
            "logprob": value,
            "bytes": list(tokenizer.decode_bytes([token_id])),
        }

    return {**entry(token, logprob), "top_logprobs": [entry(other, value) for other, value in top or []]}


def chat_completion_object(
    plan: Plan, model: str, choices: list[dict[str, Any]], usage: dict[str, int] | None, chunk: bool
) -> dict[str, Any]:
    """A chat response (`chat.completion`) or one event of its stream (`chat.completion.chunk`)."""
    document: dict[str, Any] = {
        "id": plan.id,
        "object": "chat.completion.chunk" if chunk else "chat.completion",
        "created": plan.created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
    }
    if usage is not None or (chunk and plan.include_usage):  # OpenAI: null on every chunk but the usage one
        document["usage"] = usage
    return document


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
