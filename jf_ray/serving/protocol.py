"""OpenAI-compatible request and response bodies, and the OpenAI-style error that every bad input becomes.

Requests are validated strictly (``"5"`` is not an integer) so that a wrong type is a 400 naming the field;
fields we do not know are ignored, as OpenAI clients send optional extras. Fields we know but cannot honour
(``n > 1``, penalties, tools, ``response_format``, ``logit_bias`` ... see :data:`UNSUPPORTED_FIELDS`) are
rejected with a 400 naming the field instead of being silently ignored. ``decoder`` and ``top_k`` are
extensions: the decoder can be chosen per request. docs/serving.md lists the fields.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from jf_ray.decoding.types import SEED_MAX, SEED_MIN, DecoderName

MAX_STOP_STRINGS = 16
# Text that may begin a stop string is held back and re-scanned every engine step, in time that grows with the
# square of the stop string's length: a long one would stall the replica's event loop for every stream.
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20

# Fields of the OpenAI (and vLLM) APIs this server cannot honour -> values that ask for nothing (allowed).
# Any other value is a 400 naming the field: a client must not believe a constraint was applied.
_OFF = (None, False, 0, 0.0, "", [], {})
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "ignore_eos": (None, False),
    "min_tokens": (None, 0),
    "repetition_penalty": (None, 1, 1.0),
    "min_p": _OFF,
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "guided_json": _OFF,
    "guided_regex": _OFF,
    "guided_choice": _OFF,
    "guided_grammar": _OFF,
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "web_search_options": (None,),
}


class APIError(Exception):
    """An error that leaves the server as ``{"error": {...}}`` with an HTTP status, as OpenAI does."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def from_validation_error(exc: ValidationError) -> APIError:
    """First problem of a pydantic error as a 400 naming the field (``messages.0.content: ...``)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    # Union members add their type name to the location (``prompt.str``); keep the user's path only.
    path = ".".join(p for p in loc if p not in {"str", "list[str]", "list[int]", "list[ContentPart]"})
    message = f"{path}: {err['msg']}" if path else err["msg"]
    more = len(exc.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return invalid_request(message, param=loc[0] if loc else None)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = Field(False, description="send a last chunk that carries `usage`")


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(..., min_length=1, description="served model name (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="cap on generated tokens")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int | None = Field(None, ge=0, description="extension: keep the k most likely tokens")
    seed: int | None = Field(
        None, ge=SEED_MIN, le=SEED_MAX, description="seed of sampling and draft initialisation (64-bit)"
    )
    stop: str | list[str] | None = Field(None, description="strings that end the completion")
    stream: bool = Field(False, description="answer with server-sent events")
    stream_options: StreamOptions | None = Field(None, description="include_usage: final usage chunk")
    n: int = Field(1, ge=1, le=1, description="only one choice per request is supported")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported; must be 0")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported; must be 0")
    user: str | None = Field(None, description="end-user id (logged only)")
    decoder: DecoderName | None = Field(None, description="extension: a jf-ray decoder name (jf_ray.decoding.registry)")
    # The field a max_tokens error names: the one the client sent (chat's newer name is copied into max_tokens).
    _max_tokens_field: str = PrivateAttr("max_tokens")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters")
        return stops

    @property
    def max_tokens_field(self) -> str:
        return self._max_tokens_field

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    """``POST /v1/completions``: one prompt, as text or as token ids."""

    prompt: str | list[str] | list[int] = Field(..., description="text, [text] or token ids")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="report each token's logprob and this many alternatives"
    )
    echo: bool = Field(False, description="not supported; must be false")
    suffix: str | None = Field(None, description="not supported; must be absent")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("exactly one prompt per request is supported")
            value = value[0]
        if len(value) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and any(t < 0 for t in value):
            raise ValueError("token ids must be >= 0")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    @property
    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"] = Field(..., description="only text parts are supported")
    text: str = Field(..., description="the text")


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"] = Field(..., description="author of the turn")
    content: str | list[ContentPart] = Field(..., description="text or text parts")

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: messages rendered with the checkpoint's chat template."""

    messages: list[ChatMessage] = Field(..., min_length=1, description="the conversation so far")
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")
    logprobs: bool = Field(False, description="report each token's logprob")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token (needs logprobs: true)"
    )

    @model_validator(mode="after")
    def _non_empty(self) -> ChatCompletionRequest:
        if not any(m.text.strip() for m in self.messages):
            raise ValueError("messages must contain some text")
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
            self._max_tokens_field = "max_completion_tokens"
        return self

    @property
    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict]:
        # "developer" is OpenAI's newer name for the system turn; templates know only "system".
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in self.messages]


def parse_request(cls: type[_Request], payload: Any) -> _Request:
    """Validate a decoded JSON body; every problem becomes a 400 with an OpenAI error body."""
    if not isinstance(payload, dict):
        raise invalid_request("request body must be a JSON object")
    for name, allowed in UNSUPPORTED_FIELDS.items():
        if name in payload and not any(payload[name] == ok and type(payload[name]) is type(ok) for ok in allowed):
            raise invalid_request(f"{name}: not supported by this server; leave it out", name, "unsupported_field")
    if cls is ChatCompletionRequest and payload.get("top_logprobs") is not None and payload.get("logprobs") is not True:
        raise invalid_request("top_logprobs: needs logprobs: true", "top_logprobs")
    if cls is CompletionRequest and "top_logprobs" in payload:
        raise invalid_request("top_logprobs: not a completions field; use logprobs: N", "top_logprobs")
    for name in cls.model_fields.keys() & payload.keys():
        where = unpaired_surrogate_at(payload[name], name)
        if where is not None:
            raise invalid_request(f"{where}: holds an unpaired surrogate escape (\\ud800-\\udfff), not text", name)
    try:
        return cls.model_validate(payload)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def unpaired_surrogate_at(value: Any, path: str) -> str | None:
    """Path of the first string in ``value`` that JSON's ``\\ud800`` escapes made invalid Unicode, or None.

    json.loads accepts them, pydantic too; the tokenizer then fails (a 500) and no response could carry them.
    Iterative: a body may nest as deep as json.loads allows.
    """
    stack = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where.encode("utf-8", "backslashreplace").decode()  # a key on the path may hold one too
        elif isinstance(item, list):
            stack.extend((f"{where}.{i}", v) for i, v in reversed(list(enumerate(item))))
        elif isinstance(item, dict):
            stack.extend((f"{where}.{k}", v) for k, v in reversed(list(item.items())))
    return None


class Usage(BaseModel):
    """OpenAI usage plus the decoder's counters (extra keys are kept by OpenAI clients)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    forwards: int = Field(description="model calls that worked for this request, prefill included")
    tokens_per_forward: float = Field(description="completion tokens per forward (1.0 for greedy AR)")
    accepted_hist: dict[str, int] = Field(description="tokens gained by one forward -> number of forwards")
    mean_batch_size: float = Field(description="mean number of requests sharing this request's forwards")
    decoder: str = Field(description="decoder that served the request")
    draft_hist: dict[str, int] = Field({}, description="draft length (head included) -> decoding forwards")
    candidates_hist: dict[str, int] = Field({}, description="recycled candidates verified -> decoding forwards")
    blocks_hist: dict[str, int] = Field({}, description="blocks in flight (1 + pseudo-active) -> decoding forwards")
    query_tokens: int = Field(0, description="tokens this request put into decoding forwards (its width budget)")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def completion_logprobs(tokens: list | None, text_start: int = 0) -> dict | None:
    """Legacy completions shape; ``tokens`` are generation.TokenInfo, offsets relative to the completion."""
    if tokens is None:
        return None
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": [text_start + t.offset for t in tokens],
    }


def chat_logprobs(tokens: list | None) -> dict | None:
    """Chat shape: one entry per token with its UTF-8 bytes and its alternatives."""
    if tokens is None:
        return None

    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(a, v) for a, v in t.top]} for t in tokens],
        "refusal": None,
    }


def completion_body(
    rid: str, model: str, text: str, finish: str | None, usage: Usage | None, logprobs: dict | None = None
) -> dict:
    body = {
        "id": rid,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}],
    }
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


def chat_body(
    rid: str, model: str, text: str, finish: str | None, usage: Usage | None, logprobs: dict | None = None
) -> dict:
    body = {
        "id": rid,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": logprobs,
            }
        ],
    }
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


def chat_chunk(
    rid: str,
    model: str,
    delta: dict,
    finish: str | None,
    usage: Usage | None = None,
    logprobs: dict | None = None,
) -> dict:
    choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]
    if usage is not None:
        choices = []
    body = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": now(),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


def completion_chunk(
    rid: str, model: str, text: str, finish: str | None, usage: Usage | None = None, logprobs: dict | None = None
) -> dict:
    body = completion_body(rid, model, text, finish, usage, logprobs)
    if usage is not None:
        body["choices"] = []
    return body


def models_body(model: str, owned_by: str = "jf-ray") -> dict:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": now(), "owned_by": owned_by}],
    }
