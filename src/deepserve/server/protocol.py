"""Request bodies of the OpenAI API (plus vLLM-style extras), as pydantic models.

Types are strict: ``"stream": "yes"``, ``"n": true`` or ``"max_tokens": "5"`` are 400s,
not coerced, and floats must be finite (``Infinity``/``NaN`` are rejected).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Int = StrictInt
Bool = StrictBool
Str = StrictStr

ROLES = ("system", "developer", "user", "assistant", "tool")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: Bool = False


class ResponseFormat(_Strict):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class _Common(_Strict):
    # Unknown fields are accepted and ignored, as the OpenAI API tolerates new clients.

    model: Str | None = None
    n: Int = 1
    max_tokens: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Str | list[Str] | None = None
    seed: Int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: Bool = False
    stream_options: StreamOptions | None = None
    user: Str | None = None
    # vLLM-style extras
    top_k: Int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: Int = 0
    ignore_eos: Bool = False
    stop_token_ids: list[Int] = Field(default_factory=list)
    skip_special_tokens: Bool = True
    include_stop_str_in_output: Bool = False
    priority: Int = 0
    response_format: ResponseFormat | None = None
    # Prefix-cache isolation: only requests with the same salt share cached KV blocks.
    cache_salt: Str | None = None


class ChatMessage(_Strict):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Str | list[dict[str, Any]] | None = None
    name: Str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = None
    logprobs: Bool = False
    top_logprobs: Int | None = None


class CompletionRequest(_Common):
    prompt: Str | list[Str] | list[Int] | list[list[Int]]
    logprobs: Int | None = None
    echo: Bool = False
    suffix: Str | None = None  # fill-in-the-middle: refused (400), the model has no FIM tokens


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error body every non-2xx answer carries."""

    error: ErrorDetail


def bad_text_path(value: Any, path: str = "") -> str | None:
    """Where a string in a parsed JSON body cannot be encoded as UTF-8 (a lone UTF-16
    surrogate such as ``"\\ud800"``); None if every string is clean."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            where = bad_text_path(k, path) or bad_text_path(v, f"{path}.{k}" if path else str(k))
            if where:
                return where
    elif isinstance(value, list):
        for i, v in enumerate(value):
            where = bad_text_path(v, f"{path}[{i}]")
            if where:
                return where
    return None
