"""OpenAI's Responses API (``POST /v1/responses``) on top of chat completions.

A Responses request becomes a chat request (``to_chat``): ``instructions`` a system
message, ``input`` items messages (``message``, ``function_call`` and
``function_call_output``; ``reasoning`` items are not rendered again, as DeepSeek advises
for reasoning content), function ``tools`` chat tools, ``text.format`` a response format,
``reasoning.effort`` the chat template's thinking switch. It then runs exactly as chat
does: same prompt, tool plan, grammar, billing and metering (the ledger row's endpoint is
``responses``).

The answer is a ``response`` object whose ``output`` holds ``reasoning``, ``message``
and ``function_call`` items; streamed, the typed events (``response.created``,
``response.output_item.added``, ``response.output_text.delta``,
``response.function_call_arguments.delta``, ..., ``response.completed``, or
``response.incomplete`` when ``max_output_tokens`` cut it).

Stored responses (``store``, true by default as in OpenAI's API) keep the conversation so
far, so a request with ``previous_response_id`` continues it, and ``GET
/v1/responses/{id}`` returns the response. They live in the ledger's database with
``--ledger`` (shared by every replica on that database), else in this process (the
newest 1,000; see ``response_store``). A stored response is visible to the API key that created it
only (behind a gateway: the gateway's key, passed on in ``x-deepserve-owner``).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import Field

from deepserve.errors import DeepserveError
from deepserve.protocol.models import (
    REASONING_EFFORTS,
    Bool,
    ChatCompletionRequest,
    Int,
    Str,
    _Strict,
)

INCLUDABLE = ("message.output_text.logprobs", "reasoning.encrypted_content")


class TextFormat(_Strict):
    type: Literal["text", "json_schema", "json_object"] = "text"
    name: Str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: Str | None = None
    strict: Bool | None = None


class TextOptions(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningOptions(_Strict):
    effort: Literal[REASONING_EFFORTS] | None = None  # type: ignore[valid-type]
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class FunctionTool(_Strict):
    type: Literal["function"] = "function"
    name: Str
    description: Str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None


class NamedFunctionChoice(_Strict):
    type: Literal["function"]
    name: Str


class ResponsesRequest(_Strict):
    """The body of ``POST /v1/responses``."""

    model: Str | None = None
    input: Str | list[dict[str, Any]]
    instructions: Str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: Bool | None = None
    max_output_tokens: Int | None = None
    max_tool_calls: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: Int | None = None
    text: TextOptions | None = None
    reasoning: ReasoningOptions | None = None
    stream: Bool = False
    stream_options: dict[str, Any] | None = None
    store: Bool = True
    previous_response_id: Str | None = None
    include: list[Str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[Str, Str] | None = None
    user: Str | None = None
    safety_identifier: Str | None = None
    prompt_cache_key: Str | None = None
    service_tier: Literal["auto", "default"] | None = None
    background: Bool | None = None
    # deepserve (vLLM-style) extras
    cache_salt: Str | None = None
    priority: Int = 0
    seed: Int | None = None
    top_k: Int | None = None


def _refuse(message: str, param: str) -> DeepserveError:
    return DeepserveError(message, param=param)


def _text_of(content: Any, where: str) -> str:
    """A message's content (a string, or text parts) as text; other parts are 400s."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise _refuse(f"{where} must be a string or a list of content parts", where)
    parts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            parts.append(str(part.get("text", "")))
        elif kind == "refusal":
            parts.append(str(part.get("refusal", "")))
        else:
            raise _refuse(f"{where}[{k}] is a part of type {kind!r}; this model takes "
                          "text only (input_text / output_text)", f"{where}[{k}]")
    return "".join(parts)


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses input items -> chat messages (OpenAI chat message dicts)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _refuse(f"{where} must be an object (a message or a function call "
                          "item)", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _refuse(f"{where}.role is {role!r}; give user, system, developer or "
                              "assistant", f"{where}.role")
            messages.append({"role": role, "content": _text_of(item.get("content"),
                                                                f"{where}.content")})
        elif kind == "function_call":
            for field in ("call_id", "name", "arguments"):
                if not isinstance(item.get(field), str):
                    raise _refuse(f"{where} is a function_call without a string {field}",
                                  f"{where}.{field}")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _refuse(f"{where} is a function_call_output without a call_id",
                              f"{where}.call_id")
            output = item.get("output")
            if not isinstance(output, str):
                output = _text_of(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": output})
        elif kind == "reasoning":
            continue  # earlier reasoning is not rendered again
        else:
            raise _refuse(f"{where} has type {kind!r}; this server takes message, "
                          "function_call, function_call_output and reasoning items", where)
    return messages


def to_chat(req: ResponsesRequest, history: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request that runs a Responses request (``history``: the stored
    conversation of ``previous_response_id``, as chat messages)."""
    if req.background:
        raise _refuse("background responses are not supported; send the request without "
                      "background (use stream for long answers)", "background")
    if req.truncation == "auto":
        raise _refuse("truncation 'auto' is not supported: a conversation longer than the "
                      "context is a 400; send truncation 'disabled' (the default) and "
                      "shorten the input", "truncation")
    bad = [x for x in (req.include or []) if x not in INCLUDABLE]
    if bad:
        raise _refuse(f"include {bad[0]!r} is not supported here; supported: "
                      f"{', '.join(INCLUDABLE)}", "include")
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    messages += history + input_messages(req.input)
    if not messages:
        raise _refuse("input is empty; give a string or at least one item", "input")
    tools = None
    if req.tools:
        tools = []
        for k, t in enumerate(req.tools):
            if not isinstance(t, dict) or t.get("type") != "function":
                raise _refuse(f"tools[{k}] has type {t.get('type') if isinstance(t, dict) else t!r}"
                              "; this server runs function tools only", f"tools[{k}]")
            try:
                fn = FunctionTool.model_validate(t)
            except ValueError as exc:
                raise _refuse(f"tools[{k}]: {exc}", f"tools[{k}]") from None
            tools.append({"type": "function", "function": fn.model_dump(
                exclude_none=True, exclude={"type"})})
    choice: Any = req.tool_choice
    if isinstance(choice, NamedFunctionChoice):
        choice = {"type": "function", "function": {"name": choice.name}}
    response_format = None
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise _refuse("text.format of type json_schema needs a schema", "text.format")
        response_format = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "output", "schema": fmt.schema_, "strict": fmt.strict}}
    elif fmt is not None and fmt.type == "json_object":
        response_format = {"type": "json_object"}
    body: dict[str, Any] = {
        "model": req.model, "messages": messages, "tools": tools, "tool_choice": choice,
        "parallel_tool_calls": req.parallel_tool_calls, "max_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "stream": req.stream,
        "response_format": response_format, "metadata": req.metadata, "user": req.user,
        "safety_identifier": req.safety_identifier,
        "prompt_cache_key": req.prompt_cache_key, "cache_salt": req.cache_salt,
        "priority": req.priority, "seed": req.seed, "top_k": req.top_k,
        "verbosity": req.text.verbosity if req.text else None,
        "reasoning_effort": req.reasoning.effort if req.reasoning else None,
        "logprobs": bool(req.top_logprobs is not None or "message.output_text.logprobs"
                         in (req.include or [])),
        "top_logprobs": req.top_logprobs}
    try:
        return ChatCompletionRequest.model_validate(
            {k: v for k, v in body.items() if v is not None})
    except ValueError as exc:
        raise _refuse(f"input does not make a valid conversation: {exc}", "input") from None


# -- the response object --------------------------------------------------------------
def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_item(text: str, item_id: str | None = None,
                   status: str = "completed") -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id or _id("rs"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def message_item(text: str, item_id: str | None = None, status: str = "completed",
                 logprobs: list[Any] | None = None) -> dict[str, Any]:
    return {"type": "message", "id": item_id or _id("msg"), "status": status,
            "role": "assistant", "content": [{"type": "output_text", "text": text,
                                              "annotations": [],
                                              "logprobs": logprobs or []}]}


def call_item(call: dict[str, Any], item_id: str | None = None,
              status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id or _id("fc"), "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"],
            "status": status}


def usage_of(chat_usage: dict[str, Any]) -> dict[str, Any]:
    """Chat usage -> Responses usage (deepserve's cost fields kept)."""
    out = {"input_tokens": chat_usage["prompt_tokens"],
           "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"][
               "cached_tokens"]},
           "output_tokens": chat_usage["completion_tokens"],
           "output_tokens_details": {"reasoning_tokens": (chat_usage.get(
               "completion_tokens_details") or {}).get("reasoning_tokens", 0)},
           "total_tokens": chat_usage["total_tokens"]}
    for k in ("cost", "currency", "price_multiplier"):
        if k in chat_usage:
            out[k] = chat_usage[k]
    return out


def envelope(req: ResponsesRequest, rid: str, model: str, created: float,
             status: str = "in_progress") -> dict[str, Any]:
    """The response object's fields that echo the request."""
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) \
        if req.text and req.text.format else {"type": "text"}
    return {
        "id": rid, "object": "response", "created_at": int(created), "status": status,
        "background": False, "error": None, "incomplete_details": None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls, "model": model, "output": [],
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": req.reasoning.effort if req.reasoning else None,
                      "summary": req.reasoning.summary if req.reasoning else None},
        "service_tier": "default", "store": req.store,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": fmt, "verbosity": (req.text.verbosity if req.text else None)
                 or "medium"},
        "tool_choice": (req.tool_choice.model_dump() if isinstance(
            req.tool_choice, NamedFunctionChoice) else req.tool_choice or "auto"),
        "tools": req.tools or [], "top_logprobs": req.top_logprobs,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": req.truncation or "disabled", "usage": None, "user": req.user,
        "metadata": req.metadata or {}, "safety_identifier": req.safety_identifier,
        "prompt_cache_key": req.prompt_cache_key}


def finish(body: dict[str, Any], output: list[dict[str, Any]], finish_reason: str | None,
           usage: dict[str, Any]) -> dict[str, Any]:
    cut = finish_reason == "length"
    return body | {"status": "incomplete" if cut else "completed", "output": output,
                   "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
                   "usage": usage_of(usage)}


def output_items(message: dict[str, Any], max_tool_calls: int | None,
                 logprobs: list[Any] | None = None) -> list[dict[str, Any]]:
    """A chat answer's message -> Responses output items."""
    items = []
    if message.get("reasoning_content"):
        items.append(reasoning_item(message["reasoning_content"]))
    if message.get("content"):
        items.append(message_item(message["content"], logprobs=logprobs))
    calls = message.get("tool_calls") or []
    if max_tool_calls is not None:
        calls = calls[:max_tool_calls]
    items += [call_item(c) for c in calls]
    return items


def chat_logprobs_to_output(lp: dict[str, Any] | None) -> list[Any]:
    return [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"],
             "top_logprobs": t["top_logprobs"]} for t in (lp or {}).get("content") or []]


def conversation(history: list[dict[str, Any]], req: ResponsesRequest,
                 output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a stored response keeps for the next turn: the conversation as chat messages
    (earlier turns, this input, this output); instructions are not carried over."""
    turn = input_messages(req.input)
    reply: dict[str, Any] = {"role": "assistant", "content": None}
    for item in output:
        if item["type"] == "message":
            reply["content"] = item["content"][0]["text"]
        elif item["type"] == "function_call":
            reply.setdefault("tool_calls", []).append({
                "id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}})
    keep = [reply] if reply["content"] is not None or reply.get("tool_calls") else []
    return history + turn + keep
