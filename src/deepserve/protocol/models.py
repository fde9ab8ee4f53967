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
    # Unknown fields are 400 "Unrecognized request argument supplied: NAME", as the
    # OpenAI API answers: nothing a client sends is silently ignored.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: Bool = False
    # vLLM's: every chunk carries the usage so far (a gateway bills a cut stream by it)
    continuous_usage_stats: Bool = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs``: exactly one of these constrains the output."""

    json_schema: dict[str, Any] | Str | None = Field(default=None, alias="json")
    regex: Str | None = None
    choice: list[Str] | None = None
    grammar: Str | None = None  # Lark syntax (llguidance), %json{...} allowed


class FunctionDef(_Strict):
    name: Str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: Str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Strict):
    name: Str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class ToolCallFunction(_Strict):
    name: Str
    arguments: Str


class ToolCall(_Strict):
    id: Str
    type: Literal["function"] = "function"
    function: ToolCallFunction


# OpenAI parameters deepserve does not implement: a request that sets one gets a 400 that
# names it, instead of an answer that silently lacks what was asked for.
UNSUPPORTED = {
    "audio": "audio output", "modalities": "output modalities other than text",
    "prediction": "predicted outputs", "web_search_options": "web search",
    "functions": "the deprecated functions API (send tools)",
    "function_call": "the deprecated function_call (send tool_choice)",
    "service_tier": "service tiers", "best_of": "best_of other than n (send n)",
    "store": "stored chat completions (the Responses API stores responses: POST "
             "/v1/responses)",
}
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
# OpenAI's limits on request metadata
METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


def check_metadata(metadata: dict[str, str] | None, param: str = "metadata") -> None:
    """OpenAI's limits: at most 16 pairs, keys up to 64 and values up to 512 characters."""
    from deepserve.errors import DeepserveError

    if not metadata:
        return
    if len(metadata) > METADATA_KEYS:
        raise DeepserveError(f"{param} has {len(metadata)} keys; at most {METADATA_KEYS} "
                             "are allowed", param=param)
    for k, v in metadata.items():
        if len(k) > METADATA_KEY_CHARS:
            raise DeepserveError(f"{param} key {k[:20]!r}... is {len(k)} characters; keys "
                                 f"are at most {METADATA_KEY_CHARS}", param=param)
        if len(v) > METADATA_VALUE_CHARS:
            raise DeepserveError(f"{param}[{k!r}] is {len(v)} characters; values are at "
                                 f"most {METADATA_VALUE_CHARS}", param=param)


class _Common(_Strict):
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
    logit_bias: dict[Str, float] | None = None
    # Guided decoding, vLLM's names (at most one constraint per request)
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | Str | None = None
    guided_regex: Str | None = None
    guided_choice: list[Str] | None = None
    guided_grammar: Str | None = None
    # Known OpenAI parameters that are not implemented: 400 when set (see UNSUPPORTED)
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    service_tier: Any = None
    best_of: Int | None = None
    store: Bool | None = None
    # OpenAI fields that are taken and recorded with the request's ledger row:
    # metadata, user and safety_identifier as given; prompt_cache_key scopes the prefix
    # cache as cache_salt does (and the gateway keeps a key on one replica);
    # reasoning_effort switches the chat template's thinking where it has a switch.
    metadata: dict[Str, Str] | None = None
    prompt_cache_key: Str | None = None
    safety_identifier: Str | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None

    def unsupported(self) -> str | None:
        """The first OpenAI parameter set that deepserve does not implement."""
        for name in UNSUPPORTED:
            value = getattr(self, name)
            if name == "best_of" and value in (None, 1, self.n):
                continue
            if name == "store" and not value:
                continue
            if name == "modalities" and value in (None, ["text"]):
                continue
            if name == "service_tier" and value in (None, "auto", "default"):
                continue
            if value is not None:
                return name
        return None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Str | list[dict[str, Any]] | None = None
    name: Str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: Str | None = None  # which call a role "tool" message answers
    # What the SDKs send back when an assistant message is appended to the history as
    # it came: the reasoning is not rendered again (as DeepSeek's API advises), the
    # other fields must be null.
    reasoning_content: Str | None = None
    refusal: None = None
    audio: None = None
    function_call: None = None
    annotations: list[Any] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = None
    logprobs: Bool = False
    top_logprobs: Int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: Bool | None = None
    add_generation_prompt: Bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: Str | list[Str] | list[Int] | list[list[Int]]
    logprobs: Int | None = None
    echo: Bool = False
    suffix: Str | None = None  # fill-in-the-middle: refused (400), the model has no FIM tokens


class EmbeddingRequest(_Strict):
    """``POST /v1/embeddings``: text or token ids, one input or a list of them."""

    model: Str | None = None
    input: Str | list[Str] | list[Int] | list[list[Int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int | None = None
    user: Str | None = None
    metadata: dict[Str, Str] | None = None
    safety_identifier: Str | None = None
    priority: Int = 0


class TokenizeRequest(_Strict):
    """``POST /tokenize`` (vLLM's shape): a prompt, or chat messages through the template."""

    model: Str | None = None
    prompt: Str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: Bool = True
    add_generation_prompt: Bool = True
    return_token_strs: Bool = False
    # With messages: the chat request's own fields that change its prompt, so the
    # count equals the prompt_tokens chat would report.
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: Bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None


class DetokenizeRequest(_Strict):
    model: Str | None = None
    tokens: list[Int]


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
