"""Reading backends' answers at the gateway: token counts for billing, the cascade's
confidence, and a finished answer replayed as an SSE stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from deepserve.protocol.http import SSE_DONE, sse


def usage_tokens(usage: dict[str, Any] | None) -> tuple[int, int, int]:
    """(prompt, cached, completion) tokens of a chat, completions, embeddings or
    Responses API ``usage``."""
    if not usage:
        return 0, 0, 0
    if "input_tokens" in usage:  # the Responses API
        cached = (usage.get("input_tokens_details") or {}).get("cached_tokens") or 0
        return int(usage["input_tokens"]), int(cached), int(usage.get("output_tokens", 0))
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") or usage.get("prompt_cache_hit_tokens") or 0
    return int(usage.get("prompt_tokens", 0)), int(cached), \
        int(usage.get("completion_tokens", 0))


def finish_of(body: dict[str, Any]) -> str | None:
    """The finish reason to bill under: the first choice's, a response's status
    ("incomplete" -> length), or "stop" for embeddings."""
    if body.get("object") == "response":
        return {"completed": "stop", "incomplete": "length"}.get(body.get("status") or "",
                                                                  body.get("status"))
    if body.get("object") == "list":
        return "stop"
    return (body.get("choices") or [{}])[0].get("finish_reason")


def mean_logprob(body: dict[str, Any], chat: bool) -> float | None:
    values: list[float] = []
    for choice in body.get("choices", []):
        lp = choice.get("logprobs") or {}
        if chat:
            values += [t["logprob"] for t in lp.get("content") or []]
        else:
            values += [v for v in lp.get("token_logprobs") or [] if v is not None]
    return sum(values) / len(values) if values else None


async def as_sse(data: dict[str, Any], chat: bool, body: dict[str, Any]) -> AsyncIterator[str]:
    """A finished (non-streamed) answer replayed as an SSE stream."""
    base = {"id": data.get("id"), "created": data.get("created"), "model": data.get("model"),
            "object": "chat.completion.chunk" if chat else "text_completion"}
    choices = []
    for c in data.get("choices", []):
        if chat:
            message = c["message"]
            delta = {"role": "assistant", "content": message.get("content")}
            if message.get("reasoning_content") is not None:
                delta["reasoning_content"] = message["reasoning_content"]
            if message.get("tool_calls"):
                delta["tool_calls"] = [dict(call, index=k) for k, call in
                                       enumerate(message["tool_calls"])]
            choices.append({"index": c["index"], "delta": delta,
                            "logprobs": None, "finish_reason": c.get("finish_reason")})
        else:
            choices.append({"index": c["index"], "text": c["text"], "logprobs": None,
                            "finish_reason": c.get("finish_reason")})
    yield sse(base | {"choices": choices})
    if (body.get("stream_options") or {}).get("include_usage"):
        yield sse(base | {"choices": [], "usage": data.get("usage")})
    yield SSE_DONE
