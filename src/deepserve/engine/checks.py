"""What can never run is refused before it is queued: the checks on a request's token
ids and sampling parameters against the engine's context, vocabulary and KV pool."""

from __future__ import annotations

from typing import Any

from deepserve.errors import DeepserveError
from deepserve.sampling_params import SamplingParams


def check_chars(engine: Any, chars: int, param: str) -> None:
    """Reject text too long for the context before tokenizing all of it: no token
    covers more than ``max_token_chars`` characters, so more characters than the
    context times that (with a margin) cannot fit."""
    limit = engine.max_model_len * engine.max_token_chars * 2
    if chars > limit:
        raise DeepserveError(
            f"{param} is {chars} characters, far more than this model's context of "
            f"{engine.max_model_len} tokens can hold (no more than {limit} characters); "
            "shorten the prompt", param=param, code="context_length_exceeded")


def check_request(engine: Any, prompt_ids: list[int], params: SamplingParams,
                  param: str = "messages") -> None:
    """Reject what can never run: too long for the context or for the KV pool.
    ``param`` names the prompt's field in errors (messages or prompt)."""
    params.validate()
    n = len(prompt_ids)
    if n == 0:
        raise DeepserveError("prompt is empty after tokenization", param="prompt")
    limit = engine.max_model_len
    if params.embed:
        if n > limit:
            raise DeepserveError(
                f"input is {n} tokens, but this model's context is {limit} tokens "
                "(max_model_len); shorten the input", param=param,
                code="context_length_exceeded")
    elif n >= limit:
        raise DeepserveError(
            f"prompt is {n} tokens, but this model's context is {limit} tokens "
            f"(max_model_len) and at least one token must be generated; shorten the "
            "prompt", param=param, code="context_length_exceeded")
    if params.max_tokens is not None and n + params.max_tokens > limit and \
            not params.embed:
        raise DeepserveError(
            f"this model's maximum context length is {limit} tokens, but "
            f"{n + params.max_tokens} were requested ({n} in the prompt, "
            f"{params.max_tokens} for max_tokens); "
            f"lower max_tokens to at most {limit - n} or shorten the prompt",
            param="max_tokens", code="context_length_exceeded")
    if params.constraint is not None:
        engine.grammars.compile(*params.constraint, params.guided_param)
    if params.logit_bias:
        bad = [t for t in params.logit_bias if t >= engine.model_config.vocab_size]
        if bad:
            raise DeepserveError(f"logit_bias token ids {bad[:5]} are outside the "
                                 f"vocabulary [0, {engine.model_config.vocab_size})",
                                 param="logit_bias")
    if n + 1 > engine.kv_tokens:
        raise DeepserveError(
            f"prompt is {n} tokens but the KV cache holds only {engine.kv_tokens}; start the "
            "engine with a larger --kv-cache-memory", param=param,
            code="context_length_exceeded")
