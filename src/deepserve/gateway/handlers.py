"""What the gateway does with one request: authorize, limit, hold its budget, route,
forward (streaming or not), cascade, bill. One ``Call`` record carries what a request
needs from admission to its bill."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deepserve.billing.meter import BillingContext, BillingError, Usage, request_tags
from deepserve.billing.ratelimit import retry_after
from deepserve.billing.shared import SharedLimitsError
from deepserve.gateway.answers import as_sse, finish_of, mean_logprob, usage_tokens
from deepserve.gateway.core import Gateway, NoBackend
from deepserve.gateway.hold import BudgetHold
from deepserve.protocol.http import SSE_DONE, bearer_of, error_body, json_of, sse_error
from deepserve.server.response_store import OWNER_HEADER

logger = logging.getLogger("deepserve.gateway.app")
T = TypeVar("T")
JSON_HEADERS = {"content-type": "application/json"}


async def unless_gone(work: Awaitable[T], request: Request | None) -> T | None:
    """``work``'s result; None if the client disconnects first, ``work`` then cancelled
    (cancelling a backend request drops its connection, which cancels it there)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if request is not None and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await task
            return None


def owner_headers(key_id: str | None) -> dict[str, str]:
    """Headers for a backend: the key that owns stored responses (see OWNER_HEADER)."""
    return JSON_HEADERS | ({OWNER_HEADER: key_id} if key_id else {})


ENDPOINTS = {"chat": "chat.completions"}  # Call.kind -> the ledger's endpoint name
# The Responses API's last stream event (the bill is written before it goes out)
FINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers=headers)


@dataclass
class Call:
    """One request through the gateway."""

    path: str
    body: dict[str, Any]
    key_id: str | None
    who: str  # whom rate limits count: the key id, else the key, else the client address
    hold: BudgetHold
    start: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)  # the ledger's start_ts
    first_token_at: float | None = None  # when the first streamed token went out
    request: Request | None = None  # to notice a client that leaves

    @property
    def chat(self) -> bool:
        return self.path.endswith("chat/completions")

    @property
    def kind(self) -> str:
        """chat, completions, responses or embeddings."""
        return "chat" if self.chat else self.path.rsplit("/", 1)[-1]


async def json_body(request: Request) -> dict[str, Any] | Response:
    try:
        body = await json_of(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error_response(400, "request body is not valid JSON; send a JSON object "
                              "with Content-Type: application/json")
    if not isinstance(body, dict):
        return error_response(400, "request body must be a JSON object")
    return body


class Handlers:
    """The gateway's request handling, as methods over the shared ``Gateway`` state."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def refuse(self, exc: BillingError) -> Response:
        self.gw.errors.labels("-", str(exc.status)).inc()
        return error_response(exc.status, exc.message, code=exc.code)

    async def handle(self, request: Request, path: str) -> Response:
        gw = self.gw
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        headers = {k.lower(): v for k, v in request.headers.items()}
        key = bearer_of(headers.get("authorization"))
        key_id = None
        if gw.meter is not None:
            try:
                key_id = gw.meter.authorize(key)
            except BillingError as exc:
                return self.refuse(exc)
        who = key_id or key or (request.client.host if request.client else "anon")
        try:
            limited = gw.limiter.check(who, **gw.key_limits(key_id))
        except SharedLimitsError as exc:
            gw.errors.labels("-", "503").inc()
            return error_response(503, f"{exc}; retry shortly", code="limits_unavailable",
                                  headers={"Retry-After": "1"})
        if limited is not None:
            which, wait = limited
            gw.errors.labels("-", "429").inc()
            return error_response(429, f"rate limit reached: {which} per minute for this "
                                  "key; retry after the Retry-After seconds",
                                  code="rate_limit_exceeded",
                                  headers={"Retry-After": retry_after(wait)})
        policy = gw.router.policy(headers)
        tier = gw.router.choose(policy, body, headers, str(body.get("user") or who))
        call = Call(path, body, key_id, who, BudgetHold(gw.meter, gw.utilization),
                    request=request)
        if policy == "cascade" and call.kind not in ("chat", "completions"):
            policy = "model"  # the cascade escalates generated text; the light tier answers
        tiers = [gw.router.order[0], gw.router.order[-1]] if policy == "cascade" else [tier]
        try:
            gw.check_access(key_id, tiers, body)
            call.hold.reserve(key_id, tiers, body, call.kind)
        except BillingError as exc:
            return self.refuse(exc)
        try:
            if policy == "cascade":
                return await self.cascade(call)
            return await self.forward(call, tier)
        finally:
            if not call.hold.streaming:
                call.hold.release()

    def bill(self, call: Call, tier: str, usage: dict[str, Any] | None,
             finish: str | None, request_id: str | None
             ) -> tuple[dict[str, Any], Future[bool] | None]:
        """Price and record one answer under the backend's response id (the id the client
        sees; a replayed write of it is never billed twice): the cost fields, and the
        ledger write to wait on before the answer is sent."""
        gw = self.gw
        prompt, cached, completion = usage_tokens(usage)
        gw.limiter.add_tokens(call.who, prompt + completion)
        if gw.meter is None:
            return {}, None
        ctx = BillingContext(call.key_id, gw.meter.policy.quote(
            tier, gw.meter.clock(), gw.utilization(tier)), call.started_at)
        ctx.tags = request_tags(ENDPOINTS.get(call.kind, call.kind), call.body)
        return gw.meter.bill(ctx, Usage(request_id or f"gw-{uuid.uuid4().hex}", prompt,
                                        cached, completion, finish, call.first_token_at,
                                        tier=tier))

    async def settle(self, call: Call, tier: str, usage: dict[str, Any] | None,
                     finish: str | None, request_id: str | None) -> dict[str, Any]:
        """Bill and wait until the record is committed."""
        cost, committed = self.bill(call, tier, usage, finish, request_id)
        if committed is not None:
            await asyncio.wrap_future(committed)
        return cost

    async def forward(self, call: Call, tier: str,
                      extra_headers: dict[str, str] | None = None) -> Response:
        gw = self.gw
        stream = bool(call.body.get("stream"))
        send = dict(call.body)
        if stream and call.kind in ("chat", "completions"):
            # usage in every chunk: a stream cut short is billed what it delivered
            send["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        try:
            # a non-streamed answer's head comes when it is done: watch the client meanwhile
            opened = await unless_gone(gw.open(tier, call.path, send,
                                               owner_headers(call.key_id)),
                                       None if stream else call.request)
        except NoBackend as exc:
            gw.errors.labels(tier, "503").inc()
            return error_response(503, str(exc), code="no_backend")
        if opened is None:
            logger.info("client left before its answer; the backend request was cancelled")
            return Response(status_code=499)
        resp, backend = opened
        out_headers = {"x-deepserve-tier": tier, "x-deepserve-backend": backend.url,
                       **(extra_headers or {})}
        gw.requests.labels(tier, backend.url, str(resp.status_code)).inc()
        if stream and resp.status_code == 200:
            call.hold.streaming = True  # released when the stream ends, after its bill
            return StreamingResponse(self.passthrough(call, tier, resp, backend),
                                     media_type="text/event-stream", headers=out_headers)
        try:
            content = await unless_gone(resp.aread(), call.request)
        finally:
            await resp.aclose()  # a client that left: closing cancels the backend's work
            gw.release(backend)
        if content is None:
            logger.info("client left before its answer; the backend request was cancelled")
            return Response(status_code=499)
        gw.latency.labels(tier).observe(time.perf_counter() - call.start)
        if resp.status_code == 200:
            data = json.loads(content)
            cost = await self.settle(call, tier, data.get("usage"), finish_of(data),
                                     data.get("id"))
            if cost:
                data.setdefault("usage", {})["gateway_cost"] = cost["cost"]
            content = json.dumps(data).encode()
        return Response(content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", "application/json"),
                        headers=out_headers)

    async def passthrough(self, call: Call, tier: str, resp: httpx.Response,
                          backend: Any) -> AsyncIterator[bytes]:
        """A backend's SSE stream, line by line; usage read for the bill on the way."""
        gw = self.gw
        options = call.body.get("stream_options") or {}
        wants_usage = bool(options.get("include_usage"))
        wants_every = bool(options.get("continuous_usage_stats"))
        usage = None
        finish = None
        rid = None
        done = billed = False
        try:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if event.get("type", "").startswith("response."):  # Responses API
                        response = event.get("response") or {}
                        rid = rid or response.get("id")
                        if event["type"] in FINAL_EVENTS and not billed:
                            # the final event goes out only once its bill is on the books
                            billed = True
                            await self.settle(call, tier, response.get("usage"),
                                              finish_of(response), rid)
                        yield (line + "\n").encode()
                        continue
                    rid = rid or event.get("id")
                    if event.get("usage"):
                        usage = event["usage"]  # so far, in every chunk
                        if not event.get("choices") and not wants_usage:
                            continue  # the client did not ask for the usage chunk
                    if event.get("choices"):
                        if call.first_token_at is None:
                            call.first_token_at = time.time()
                        if not wants_every and "usage" in event:
                            if wants_usage:
                                event["usage"] = None
                            else:
                                del event["usage"]
                            line = "data: " + json.dumps(event)
                    for c in event.get("choices") or []:
                        finish = c.get("finish_reason") or finish
                if line == SSE_DONE.strip() and not billed:
                    # The stream's end goes out only once its bill is on the books.
                    billed = True
                    await self.settle(call, tier, usage, finish or "abort", rid)
                done = done or line == SSE_DONE.strip()
                yield (line + "\n").encode()
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            # The backend died mid-stream, after the 200 went out: tell the client in
            # the stream itself and end it cleanly rather than cutting the connection.
            logger.warning("backend %s broke a stream: %s", backend.url, exc)
            backend.note_failure()
            gw.errors.labels(tier, "502").inc()
            if not done:
                yield sse_error(502, f"the backend {backend.url} failed in the middle of "
                                f"this stream ({type(exc).__name__}); the text so far is "
                                "incomplete; retry the request",
                                code="backend_stream_broken").encode()
                yield SSE_DONE.encode()
        finally:
            await resp.aclose()
            gw.release(backend)
            gw.latency.labels(tier).observe(time.perf_counter() - call.start)
            if not billed:
                self.bill(call, tier, usage, finish or "abort", rid)
            call.hold.release()

    async def cascade(self, call: Call) -> Response:
        """Ask the light tier first (not streamed, with logprobs); escalate to the strong
        tier when the answer was cut by length or its mean logprob is too low."""
        gw = self.gw
        body, chat = call.body, call.chat
        lite, pro = gw.router.order[0], gw.router.order[-1]
        probe = dict(body, stream=False)
        probe.pop("stream_options", None)
        probe["logprobs"] = True if chat else max(1, int(body.get("logprobs") or 0))
        try:
            resp, backend = await gw.open(lite, call.path, probe, JSON_HEADERS)
        except NoBackend:
            return await self.forward(call, pro, {"x-deepserve-escalated": "lite-unavailable"})
        try:
            content = await resp.aread()
        finally:
            await resp.aclose()
            gw.release(backend)
        gw.requests.labels(lite, backend.url, str(resp.status_code)).inc()
        if resp.status_code != 200:
            return Response(content, status_code=resp.status_code,
                            media_type="application/json",
                            headers={"x-deepserve-tier": lite,
                                     "x-deepserve-backend": backend.url})
        data = json.loads(content)
        choice = (data.get("choices") or [{}])[0]
        mean_lp = mean_logprob(data, chat)
        reason = None
        if choice.get("finish_reason") == "length":
            reason = "length"
        elif mean_lp is not None and mean_lp < gw.cfg.cascade_min_logprob:
            reason = "low_confidence"
        lite_cost = await self.settle(call, lite, data.get("usage"),
                                      choice.get("finish_reason"), data.get("id"))
        if reason is not None and pro != lite:
            gw.escalations.labels(lite, pro, reason).inc()
            return await self.forward(call, pro, {"x-deepserve-escalated": reason,
                                                  "x-deepserve-lite-mean-logprob":
                                                  f"{mean_lp}"})
        gw.latency.labels(lite).observe(time.perf_counter() - call.start)
        if not (body.get("logprobs") or body.get("top_logprobs")):
            for c in data.get("choices", []):
                c["logprobs"] = None
        if lite_cost:
            data.setdefault("usage", {})["gateway_cost"] = lite_cost["cost"]
        out_headers = {"x-deepserve-tier": lite, "x-deepserve-backend": backend.url,
                       "x-deepserve-escalated": "no",
                       "x-deepserve-lite-mean-logprob": f"{mean_lp}"}
        if body.get("stream"):
            return StreamingResponse(as_sse(data, chat, body), media_type="text/event-stream",
                                     headers=out_headers)
        return JSONResponse(data, headers=out_headers)

    async def relay_stored(self, request: Request, path: str, method: str) -> Response:
        """``GET``/``DELETE /v1/responses/{id}``: asked of the default tier's replicas (a
        stored response lives in the ledger database they share), as the key's owner."""
        gw = self.gw
        headers = {k.lower(): v for k, v in request.headers.items()}
        key_id = None
        if gw.meter is not None:
            try:
                key_id = gw.meter.authorize(bearer_of(headers.get("authorization")))
            except BillingError as exc:
                return self.refuse(exc)
        return await self.fetch(gw.router.by_model(None), path, {}, owner_headers(key_id),
                                method)

    async def relay(self, request: Request, path: str) -> Response:
        """Pass a request that is neither generated nor billed (tokenize) to a backend of
        the tier its model names, and its answer back unchanged."""
        gw = self.gw
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        headers = {k.lower(): v for k, v in request.headers.items()}
        if gw.meter is not None:
            try:
                gw.meter.authorize(bearer_of(headers.get("authorization")))
            except BillingError as exc:
                return self.refuse(exc)
        tier = gw.router.choose("model", body, headers, "")
        return await self.fetch(tier, path, body, JSON_HEADERS, out={"x-deepserve-tier": tier})

    async def fetch(self, tier: str, path: str, body: dict[str, Any],
                    headers: dict[str, str], method: str = "POST",
                    out: dict[str, str] | None = None) -> Response:
        """A backend's whole answer to a request that is not billed, passed back."""
        gw = self.gw
        try:
            resp, backend = await gw.open(tier, path, body, headers, method)
        except NoBackend as exc:
            return error_response(503, str(exc), code="no_backend")
        try:
            content = await resp.aread()
        finally:
            await resp.aclose()
            gw.release(backend)
        return Response(content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", "application/json"),
                        headers=out)
