"""OpenAI chat/completions semantics on top of the AsyncEngine: params, responses, SSE."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from deepserve.billing.meter import BillingContext, Meter
from deepserve.engine.async_engine import AsyncEngine
from deepserve.engine.sequence import CompletionOutput, RequestOutput
from deepserve.protocol.http import SSE_DONE, sse
from deepserve.protocol.models import ChatCompletionRequest, CompletionRequest
from deepserve.sampling_params import SamplingParams
from deepserve.server.chat_output import ChatContext, ChoiceStream
from deepserve.server.logprobs import LogprobFormat
from deepserve.server.metrics import ServerMetrics

# stop_reason of a forced turn stopped at a tool call that repeated the previous one
REPEATED_CALL = "repeated_tool_call"


def _usage(out: RequestOutput) -> dict[str, Any]:
    prompt = out.num_prompt_tokens
    completion = out.num_output_tokens
    cached = out.num_cached_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": prompt - cached}


class OpenAIServing(LogprobFormat):
    """Builds chat.completion(.chunk) and text_completion objects from engine outputs."""

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, model_name: str,
                 meter: Meter) -> None:
        self.engine = engine
        self.meter = meter
        self.metrics = metrics
        self.model_name = model_name
        self.tokenizer = engine.tokenizer

    # -- running requests ---------------------------------------------------------------------
    async def _final(self, gen: AsyncIterator[RequestOutput], bill: BillingContext,
                     rid: str, watch: Callable[[RequestOutput], None] | None = None
                     ) -> RequestOutput:
        """The finished output. Cancelled (client gone, timeout): what was produced so far
        is billed with finish_reason "abort", and the engine request is aborted.
        ``watch`` sees every output as it comes."""
        last = None
        try:
            async for out in gen:
                last = out
                if watch is not None:
                    watch(out)
        except asyncio.CancelledError:
            if last is not None and last.num_output_tokens:
                self.metrics.observe(last, "abort")
                self.meter.finish(bill, rid, last, "abort")
            raise
        assert last is not None
        return last

    def _reasoning_tokens(self, text: str | None) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False)) if text else 0

    def _feed(self, rid: str, streams: list[ChoiceStream], sent: list[int],
              o: CompletionOutput) -> list[dict[str, Any]]:
        """One choice's new text into its stream; a forced turn that repeated its
        previous tool call is stopped in the engine."""
        stream = streams[o.index]
        deltas = stream.feed(o.text[sent[o.index]:], o.finish_reason is not None)
        sent[o.index] = len(o.text)
        if stream.repeated and o.finish_reason is None:
            self.engine.stop_choice(rid, o.index, REPEATED_CALL)
        return deltas

    async def chat(self, req: ChatCompletionRequest, params: SamplingParams,
                   prompt_ids: list[int], bill: BillingContext,
                   salt: str | None = None, ctx: ChatContext | None = None,
                   rid: str | None = None) -> dict[str, Any]:
        ctx = ctx or ChatContext()
        rid = rid or f"chatcmpl-{uuid.uuid4().hex}"
        streams = [ChoiceStream(ctx) for _ in range(params.n)]
        sent = [0] * params.n

        def watch(out: RequestOutput) -> None:
            for o in out.outputs:
                self._feed(rid, streams, sent, o)

        out = await self._final(self.engine.generate(params=params, request_id=rid,
                                                     prompt_ids=prompt_ids,
                                                     priority=req.priority, cache_salt=salt,
                                                     validated=True, tenant=bill.tenant,
                                                     weight=bill.weight),
                                bill, rid, watch)
        self.metrics.observe(out, out.finish_reason or "abort")
        cost = await self.meter.settle(bill, rid, out, out.finish_reason)
        choices = []
        reasoning_tokens = 0
        for o in out.outputs:
            shaped = streams[o.index].result()
            reasoning_tokens += self._reasoning_tokens(shaped.reasoning)
            choice: dict[str, Any] = {
                "index": o.index, "message": shaped.message(),
                "finish_reason": shaped.finish_reason(o.finish_reason), "logprobs": None,
                "stop_reason": o.stop_reason}
            if o.logprobs is not None:
                choice["logprobs"] = self._chat_logprobs(o.logprobs)
            choices.append(choice)
        usage = _usage(out) | {"completion_tokens_details": {
            "reasoning_tokens": reasoning_tokens}} | cost
        return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": usage,
                "system_fingerprint": None}

    async def chat_chunks(self, req: ChatCompletionRequest, params: SamplingParams,
                          prompt_ids: list[int], bill: BillingContext,
                          salt: str | None = None, ctx: ChatContext | None = None,
                          rid: str | None = None, streams_out: list[ChoiceStream] | None = None
                          ) -> AsyncIterator[dict[str, Any]]:
        """A streamed chat answer as ``chat.completion.chunk`` objects; the last one has
        no choices and carries the usage (with cost), the request already billed.
        ``streams_out`` receives each choice's stream (for its final tool calls)."""
        ctx = ctx or ChatContext()
        rid = rid or f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
            body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk",
                                    "created": created, "model": self.model_name,
                                    "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return body

        gen = self.engine.generate(params=params, request_id=rid, prompt_ids=prompt_ids,
                                   priority=req.priority, cache_salt=salt,
                                   validated=True, tenant=bill.tenant, weight=bill.weight)
        sent_text = [0] * params.n
        sent_lp = [0] * params.n
        done = [False] * params.n
        streams = [ChoiceStream(ctx) for _ in range(params.n)]
        if streams_out is not None:
            streams_out.extend(streams)
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None} for i in range(params.n)])
        last = None
        billed = False
        try:
            async for out in gen:
                last = out
                choices = []
                for o in out.outputs:
                    i = o.index
                    if done[i]:
                        continue
                    deltas = self._feed(rid, streams, sent_text, o)
                    final = o.finish_reason is not None or streams[i].repeated
                    lp = None
                    if o.logprobs is not None and len(o.logprobs) > sent_lp[i]:
                        lp = self._chat_logprobs(o.logprobs[sent_lp[i]:])
                        sent_lp[i] = len(o.logprobs)
                    if lp is not None and not deltas:
                        deltas = [{}]
                    for k, delta in enumerate(deltas):
                        choices.append({"index": i, "delta": delta,
                                        "logprobs": lp if k == 0 else None,
                                        "finish_reason": None})
                    if final:
                        done[i] = True
                        reason = o.finish_reason or "stop"
                        choices.append({"index": i, "delta": {}, "logprobs": None,
                                        "finish_reason": streams[i].finish_reason(reason),
                                        "stop_reason": o.stop_reason or (
                                            REPEATED_CALL if streams[i].repeated else None)})
                so_far = _usage(out)
                for c in choices:  # one choice per chunk, as the OpenAI API sends them
                    yield chunk([c], so_far)
            if last is not None:
                self.metrics.observe(last, last.finish_reason or "abort")
                cost = await self.meter.settle(bill, rid, last, last.finish_reason)
                billed = True
                reasoning = sum(self._reasoning_tokens(s.reasoning or None) for s in streams)
                yield chunk([], _usage(last) | {"completion_tokens_details": {
                    "reasoning_tokens": reasoning}} | cost)
        finally:
            if not billed and last is not None and last.num_output_tokens:
                # The client left mid-stream: what was produced is still billed.
                self.meter.finish(bill, rid, last, "abort")

    async def chat_stream(self, req: ChatCompletionRequest, params: SamplingParams,
                          prompt_ids: list[int], bill: BillingContext,
                          salt: str | None = None,
                          ctx: ChatContext | None = None) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        chunks = self.chat_chunks(req, params, prompt_ids, bill, salt, ctx)
        try:
            async for body in chunks:
                if not body["choices"]:  # the usage chunk
                    if include_usage:
                        yield sse(body)
                    continue
                if not continuous:
                    body.pop("usage", None)
                    if include_usage:
                        body["usage"] = None
                yield sse(body)
            yield SSE_DONE
        finally:
            await chunks.aclose()

    async def completion(self, req: CompletionRequest, params: SamplingParams,
                         prompts: list[tuple[str | None, list[int]]],
                         bill: BillingContext, salt: str | None = None) -> dict[str, Any]:
        rid = f"cmpl-{uuid.uuid4().hex}"
        outs = await asyncio.gather(*[
            self._final(self.engine.generate(params=params, request_id=f"{rid}-{k}",
                                             prompt_ids=ids, priority=req.priority,
                                             cache_salt=salt, validated=True,
                                             tenant=bill.tenant, weight=bill.weight),
                        bill, f"{rid}-{k}")
            for k, (_, ids) in enumerate(prompts)])
        choices = []
        usage = await self._settle_all(bill, rid, dict(enumerate(outs)))
        for k, ((text, _), out) in enumerate(zip(prompts, outs, strict=True)):
            for o in out.outputs:
                choices.append(self._completion_choice(req, k * params.n + o.index, o,
                                                       text or "", out))
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": usage, "system_fingerprint": None}

    async def _settle_all(self, bill: BillingContext, rid: str,
                          outs: dict[int, RequestOutput]) -> dict[str, Any]:
        """Record metrics and bill each prompt's output; the summed `usage` with cost."""
        totals = {"prompt_tokens": 0, "completion_tokens": 0, "cached": 0}
        cost: dict[str, Any] = {}
        for k, out in outs.items():
            self.metrics.observe(out, out.finish_reason or "abort")
            cost = _add_cost(cost, await self.meter.settle(bill, f"{rid}-{k}", out,
                                                           out.finish_reason))
            totals["prompt_tokens"] += out.num_prompt_tokens
            totals["completion_tokens"] += out.num_output_tokens
            totals["cached"] += out.num_cached_tokens
        return _sum_usage(totals) | cost

    def _completion_choice(self, req: CompletionRequest, index: int, o: CompletionOutput,
                           prompt_text: str, out: RequestOutput) -> dict[str, Any]:
        if req.echo and not prompt_text:
            prompt_text = self.tokenizer.decode(out.prompt_token_ids)
        text = (prompt_text + o.text) if req.echo else o.text
        choice: dict[str, Any] = {"index": index, "text": text,
                                  "finish_reason": o.finish_reason, "logprobs": None,
                                  "stop_reason": o.stop_reason}
        if o.logprobs is not None:
            lps = self._completion_logprobs(o.logprobs, len(prompt_text) if req.echo else 0)
            if req.echo and out.prompt_logprobs is not None:
                head = self._prompt_logprobs(out)
                lps = {k: head[k] + lps[k] for k in lps}
            choice["logprobs"] = lps
        return choice

    async def completion_stream(self, req: CompletionRequest, params: SamplingParams,
                                prompts: list[tuple[str | None, list[int]]],
                                bill: BillingContext,
                                salt: str | None = None) -> AsyncIterator[str]:
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        merged: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = \
            asyncio.Queue()

        async def pump(k: int, ids: list[int]) -> None:
            try:
                async for out in self.engine.generate(params=params, request_id=f"{rid}-{k}",
                                                      prompt_ids=ids, priority=req.priority,
                                                      cache_salt=salt, validated=True,
                                                      tenant=bill.tenant,
                                                      weight=bill.weight):
                    await merged.put((k, out))
                await merged.put((k, None))
            except BaseException as exc:  # forwarded to the consumer, which re-raises
                await merged.put((k, exc))

        tasks = [asyncio.create_task(pump(k, ids)) for k, (_, ids) in enumerate(prompts)]
        sent: dict[tuple[int, int], int] = {}
        sent_lp: dict[tuple[int, int], int] = {}
        finals: dict[int, RequestOutput] = {}
        latest: dict[int, RequestOutput] = {}
        remaining = len(prompts)
        try:
            while remaining:
                k, item = await merged.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                latest[k] = item
                if item.finished:
                    finals[k] = item
                choices = []
                for o in item.outputs:
                    key = (k, o.index)
                    start = sent.get(key, 0)
                    if key in sent and start < 0:
                        continue
                    delta = o.text[start:]
                    echo = req.echo and key not in sent
                    prompt_text = ""
                    if echo:
                        prompt_text = prompts[k][0] or self.tokenizer.decode(
                            item.prompt_token_ids)
                        delta = prompt_text + delta
                    lp = None
                    if o.logprobs is not None and len(o.logprobs) > sent_lp.get(key, 0):
                        lp = self._completion_logprobs(o.logprobs[sent_lp.get(key, 0):],
                                                       start + len(prompt_text))
                        sent_lp[key] = len(o.logprobs)
                    if echo and item.prompt_logprobs is not None:
                        head = self._prompt_logprobs(item)
                        lp = head if lp is None else {f: head[f] + lp[f] for f in lp}
                    if not delta and o.finish_reason is None and lp is None:
                        continue
                    sent[key] = len(o.text) if o.finish_reason is None else -1
                    choices.append({"index": k * params.n + o.index, "text": delta,
                                    "logprobs": lp, "finish_reason": o.finish_reason})
                if choices:
                    body: dict[str, Any] = {"id": rid, "object": "text_completion",
                                            "created": created, "model": self.model_name,
                                            "choices": choices}
                    if continuous:
                        body["usage"] = _sum_usage({
                            "prompt_tokens": sum(o.num_prompt_tokens for o in latest.values()),
                            "completion_tokens": sum(o.num_output_tokens
                                                     for o in latest.values()),
                            "cached": sum(o.num_cached_tokens for o in latest.values())})
                    elif include_usage:
                        body["usage"] = None
                    yield sse(body)
        finally:
            for t in tasks:
                t.cancel()
            for k, out in latest.items():
                if k not in finals and out.num_output_tokens:
                    # The client left mid-stream: what was produced is still billed.
                    self.meter.finish(bill, f"{rid}-{k}", out, "abort")
        usage = await self._settle_all(bill, rid, finals)
        if include_usage:
            body = {"id": rid, "object": "text_completion", "created": created,
                    "model": self.model_name, "choices": [],
                    "usage": usage}
            yield sse(body)
        yield SSE_DONE


def _sum_usage(u: dict[str, int]) -> dict[str, Any]:
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": u["cached"]},
            "prompt_cache_hit_tokens": u["cached"],
            "prompt_cache_miss_tokens": u["prompt_tokens"] - u["cached"]}


def _add_cost(total: dict[str, Any], one: dict[str, Any]) -> dict[str, Any]:
    if not total:
        return dict(one)
    return total | {"cost": round(total["cost"] + one["cost"], 10)}
