"""``POST /v1/embeddings``: the served model's final hidden states, pooled per input.

Each input runs through the engine like a prompt (batched with everything else, chunked
when long, never served from the prefix cache: every position is computed) and
generates nothing. The hidden states after the model's last norm are pooled and
L2-normalised:

- ``mean`` (the default for generative models): the average over every input token;
- ``last``: the last token's state, for models trained that way (Qwen3-Embedding,
  e5-mistral); ``--embedding-pooling auto`` picks it when the served model's name
  contains "embed".

Billed as input tokens (no output). ``dimensions`` is accepted only when it equals the
model's hidden size: the vectors cannot be shortened. ``encoding_format: base64`` gives
little-endian float32 bytes, as OpenAI's API does.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import uuid
from typing import Any

from deepserve.billing.meter import BillingContext
from deepserve.errors import DeepserveError
from deepserve.protocol.models import EmbeddingRequest
from deepserve.sampling_params import SamplingParams

MAX_INPUTS = 2048  # OpenAI's limit per request


def pooling_for(setting: str, model_name: str) -> str:
    if setting != "auto":
        return setting
    return "last" if "embed" in model_name.lower() else "mean"


def inputs_of(req: EmbeddingRequest) -> list[str | list[int]]:
    value = req.input
    if isinstance(value, str):
        items: list[Any] = [value]
    elif value and all(isinstance(t, int) for t in value):
        items = [value]
    else:
        items = list(value)
    if not items:
        raise DeepserveError("input is empty; give a string, a list of strings or token ids",
                             param="input")
    if len(items) > MAX_INPUTS:
        raise DeepserveError(f"input has {len(items)} items; at most {MAX_INPUTS} per "
                             "request: split it", param="input")
    for i, item in enumerate(items):
        if (isinstance(item, str) and not item) or (isinstance(item, list) and not item):
            raise DeepserveError(f"input[{i}] is empty; every input needs at least one "
                                 "token", param="input")
    return items


def encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


async def embed(state: Any, req: EmbeddingRequest, prepared: list[list[int]],
                bill: BillingContext, pooling: str) -> dict[str, Any]:
    """Run every input through the engine (at most max_num_seqs at once) and bill."""
    engine = state.engine
    rid = f"embd-{uuid.uuid4().hex}"
    gate = asyncio.Semaphore(engine.engine.config.max_num_seqs)

    async def one(k: int, ids: list[int]) -> Any:
        async with gate:
            params = SamplingParams(max_tokens=1, embed=pooling)
            return await state.serving._final(engine.generate(
                params=params, request_id=f"{rid}-{k}", prompt_ids=ids,
                priority=req.priority, validated=True, tenant=bill.tenant,
                weight=bill.weight), bill, f"{rid}-{k}")

    outs = await asyncio.gather(*[one(k, ids) for k, ids in enumerate(prepared)])
    usage = await state.serving._settle_all(bill, rid, dict(enumerate(outs)))
    data = [{"object": "embedding", "index": k,
             "embedding": encode(out.embedding, req.encoding_format)}
            for k, out in enumerate(outs)]
    usage.pop("completion_tokens", None)
    for k in ("prompt_tokens_details", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens"):
        usage.pop(k, None)
    return {"object": "list", "data": data, "model": state.model_name, "usage": usage,
            "id": rid}
