"""An OpenAI request's body -> the engine's SamplingParams, with every check that needs
no model: output constraints (response_format, guided decoding, forced tool calls),
logit_bias, logprobs."""

from __future__ import annotations

from typing import Any

from deepserve.errors import DeepserveError
from deepserve.protocol.models import ChatCompletionRequest, CompletionRequest
from deepserve.sampling_params import SamplingParams


def _constraints(req: ChatCompletionRequest | CompletionRequest) -> list[tuple[str, str, Any]]:
    """Every output constraint the request sets, as (param, kind, spec)."""
    found: list[tuple[str, str, Any]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", "json", {"type": "object"}))
    elif fmt is not None and fmt.type == "json_schema":
        spec = fmt.json_schema or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise DeepserveError("response_format.json_schema.schema must be a JSON schema "
                                 "object, e.g. {\"type\": \"json_schema\", \"json_schema\": "
                                 "{\"name\": \"x\", \"schema\": {...}}}",
                                 param="response_format")
        found.append(("response_format", "json", schema))
    so = req.structured_outputs
    if so is not None:
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(so, "json_schema" if kind == "json" else kind)
            if value is not None:
                found.append((f"structured_outputs.{kind}", kind, value))
        if not any(p.startswith("structured_outputs") for p, _, _ in found):
            raise DeepserveError("structured_outputs needs one of json, regex, choice or "
                                 "grammar", param="structured_outputs")
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(req, f"guided_{kind}")
        if value is not None:
            found.append((f"guided_{kind}", kind, value))
    return found


def sampling_params(req: ChatCompletionRequest | CompletionRequest,
                    default_max_tokens: int | None,
                    tool_constraint: tuple[str, Any] | None = None) -> SamplingParams:
    """Raises DeepserveError (400) naming the field for anything the engine cannot do."""
    unsupported = req.unsupported()
    if unsupported is not None:
        from deepserve.protocol.models import UNSUPPORTED

        raise DeepserveError(f"{unsupported} is an OpenAI parameter that deepserve does not "
                             f"implement ({UNSUPPORTED[unsupported]}); remove it from the "
                             "request", param=unsupported, code="unsupported_parameter")
    max_tokens = req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    if isinstance(req, ChatCompletionRequest):
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise DeepserveError("top_logprobs needs logprobs=true", param="top_logprobs")
    else:
        logprobs = req.logprobs
    found = _constraints(req)
    if tool_constraint is not None:
        found.append(("tool_choice", *tool_constraint))
    if len(found) > 1:
        raise DeepserveError(f"{' and '.join(p for p, _, _ in found)} each constrain the "
                             "output; give only one", param=found[1][0])
    guided = (found[0][1], found[0][2]) if found else None
    bias = None
    if req.logit_bias:
        bias = {}
        for key, value in req.logit_bias.items():
            if not key.strip().isdigit():
                raise DeepserveError(f"logit_bias key {key!r} is not a token id; keys are "
                                     "token ids as strings, e.g. {\"50256\": -100}",
                                     param="logit_bias")
            bias[int(key)] = value
    return SamplingParams(
        n=req.n, max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p,
        repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, seed=req.seed, stop=req.stop,
        stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        prompt_logprobs=logprobs if isinstance(req, CompletionRequest) and req.echo else None,
        guided=guided, guided_param=found[0][0] if found else "response_format",
        logit_bias=bias)
