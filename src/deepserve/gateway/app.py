"""The gateway's HTTP app: routing, balancing with retries and failover, streaming
pass-through, cascade, keys, rate limits, billing and its own /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from deepserve.billing.meter import BillingContext, BillingError, Meter, Usage
from deepserve.errors import DeepserveError
from deepserve.gateway.answers import as_sse, mean_logprob, usage_tokens
from deepserve.gateway.config import GatewayConfig
from deepserve.gateway.hold import BudgetHold
from deepserve.gateway.pool import Backend, TierPool, prefix_key
from deepserve.gateway.ratelimit import RateLimiter
from deepserve.gateway.router import Router
from deepserve.server.guard import KeyCheck, error_body
from deepserve.server.pipeline import sse_error

logger = logging.getLogger(__name__)


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers=headers)


class NoBackend(Exception):
    """Every replica of a tier failed before sending a byte."""


class Gateway:
    """Shared state of the gateway process."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.pools = {t.name: TierPool(t.name, t.backends, cfg.balancing, cfg.affinity_slack)
                      for t in cfg.tiers}
        self.router = Router(cfg, self.pools)
        self.limiter = RateLimiter(cfg.rate_limit_rpm, cfg.rate_limit_tpm)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=2.0),
                                        limits=httpx.Limits(max_connections=1000,
                                                            max_keepalive_connections=200))
        self.registry = r = CollectorRegistry()
        self.requests = Counter("deepserve_gateway_requests", "Requests answered by a backend",
                                ["tier", "backend", "status"], registry=r)
        self.errors = Counter("deepserve_gateway_errors", "Requests answered with an error",
                              ["tier", "status"], registry=r)
        self.retries = Counter("deepserve_gateway_retries",
                               "Attempts moved to another replica", ["tier"], registry=r)
        self.escalations = Counter("deepserve_gateway_escalations",
                                   "Cascade escalations", ["from_tier", "to_tier", "reason"],
                                   registry=r)
        self.latency = Histogram("deepserve_gateway_request_latency_seconds",
                                 "End-to-end latency through the gateway", ["tier"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
                                 registry=r)
        up = Gauge("deepserve_gateway_backend_up", "1 when a backend is in rotation",
                   ["tier", "backend"], registry=r)
        outstanding = Gauge("deepserve_gateway_backend_outstanding",
                            "Requests in flight per backend", ["tier", "backend"], registry=r)
        for name, pool in self.pools.items():
            for b in pool.backends:
                up.labels(name, b.url).set_function(lambda b=b: float(b.available))
                outstanding.labels(name, b.url).set_function(lambda b=b: b.outstanding)
        self.meter = self._meter(cfg)
        self._health_task: asyncio.Task | None = None

    def _meter(self, cfg: GatewayConfig) -> Meter | None:
        if not (cfg.api_keys or cfg.ledger or cfg.pricing):
            return None
        from deepserve.billing.keys import KeyStore
        from deepserve.billing.ledger import Ledger
        from deepserve.billing.pricing import PricingPolicy

        policy = PricingPolicy.load(cfg.pricing) if cfg.pricing else PricingPolicy()
        keys = KeyStore.load(cfg.api_keys) if cfg.api_keys else None
        ledger = Ledger(cfg.ledger, "gateway", "gateway", accelerators=0) if cfg.ledger \
            else None
        return Meter(policy, ledger, keys, self.registry, utilization=lambda: 0.5)

    async def health_loop(self) -> None:
        while True:
            await asyncio.gather(*(p.check(self.client) for p in self.pools.values()))
            await asyncio.sleep(self.cfg.health_interval_s)

    # -- forwarding ---------------------------------------------------------------------------
    async def open(self, tier: str, path: str, body: dict[str, Any],
                   headers: dict[str, str]) -> tuple[httpx.Response, Backend]:
        """Send to the tier's best replica; on a connect error or 5xx before any byte,
        try the next one. Returns the open (streaming) response and its backend."""
        pool = self.pools[tier]
        order = pool.candidates(prefix_key(body))
        last_error = "no replica"
        for attempt in range(max(1, self.cfg.max_attempts)):
            backend = order[attempt % len(order)]
            if attempt:
                self.retries.labels(tier).inc()
            # Public names are the gateway's; each backend gets the name it serves.
            sent = dict(body)
            if backend.model:
                sent["model"] = backend.model
            else:
                sent.pop("model", None)
            req = self.client.build_request("POST", backend.url + path, json=sent,
                                            headers=headers)
            backend.outstanding += 1
            try:
                resp = await self.client.send(req, stream=True)
            except httpx.TransportError as exc:
                backend.outstanding -= 1
                backend.note_failure()
                last_error = f"{backend.url}: {type(exc).__name__}"
                logger.warning("tier %s: %s failed (%s); trying another replica", tier,
                               backend.url, type(exc).__name__)
                continue
            if resp.status_code >= 500:
                await resp.aclose()
                backend.outstanding -= 1
                backend.note_failure()
                last_error = f"{backend.url}: HTTP {resp.status_code}"
                continue
            backend.note_success()
            return resp, backend
        raise NoBackend(f"tier {tier!r}: every replica failed ({last_error})")

    def release(self, backend: Backend) -> None:
        backend.outstanding -= 1


def create_gateway_app(cfg: GatewayConfig) -> FastAPI:
    gw = Gateway(cfg)
    app = FastAPI(title="deepserve gateway", version="0.1.0")
    app.state.gateway = gw
    if gw.meter is not None and gw.meter.keys is not None:
        meter = gw.meter

        def check(key: str | None) -> str | tuple[int, str, str] | None:
            # /v1 routes are authorized (with budgets and rate limits) by the route
            # itself; this guards the rest: /metrics (revenue), /docs, /openapi.json.
            if meter.keys is None or meter.keys.lookup(key or "") is None:
                return (401, "API key missing or not recognised: send 'Authorization: "
                        "Bearer <key>' with a key from the gateway's key file",
                        "invalid_api_key")
            return None

        app.add_middleware(KeyCheck, check=check, skip_prefix="/v1/",
                           on_refuse=lambda status: gw.errors.labels("-", str(status)).inc())

    @app.on_event("startup")
    async def _start() -> None:
        await asyncio.gather(*(p.check(gw.client) for p in gw.pools.values()))
        gw._health_task = asyncio.create_task(gw.health_loop())

    @app.on_event("shutdown")
    async def _stop() -> None:
        if gw._health_task:
            gw._health_task.cancel()
        await gw.client.aclose()
        if gw.meter and gw.meter.ledger:
            gw.meter.ledger.close()

    @app.exception_handler(DeepserveError)
    async def _user_error(_: Request, exc: DeepserveError) -> JSONResponse:
        gw.errors.labels("-", str(exc.status)).inc()
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.get("/health")
    async def health() -> Response:
        live = {n: sum(b.available for b in p.backends) for n, p in gw.pools.items()}
        status = 200 if all(live.values()) else 503
        return JSONResponse({"status": "ok" if status == 200 else "degraded",
                             "backends_up": live}, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gw.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m, "object": "model", "owned_by": "deepserve", "tier": t.name}
            for t in cfg.tiers for m in t.models]}

    async def handle(request: Request, path: str) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "request body is not valid JSON; send a JSON object "
                                  "with Content-Type: application/json")
        if not isinstance(body, dict):
            return error_response(400, "request body must be a JSON object")
        headers = {k.lower(): v for k, v in request.headers.items()}
        auth = headers.get("authorization", "")
        key = auth[7:] if auth.startswith("Bearer ") else None
        key_id = None
        if gw.meter is not None:
            try:
                key_id = gw.meter.authorize(key)
            except BillingError as exc:
                gw.errors.labels("-", str(exc.status)).inc()
                return error_response(exc.status, exc.message, code=exc.code)
        who = key_id or key or (request.client.host if request.client else "anon")
        limited = gw.limiter.check(who)
        if limited is not None:
            which, wait = limited
            gw.errors.labels("-", "429").inc()
            return error_response(429, f"rate limit reached: {which} per minute for this "
                                  "key; retry after the Retry-After seconds",
                                  code="rate_limit_exceeded",
                                  headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        policy = gw.router.policy(headers)
        tier = gw.router.choose(policy, body, headers, str(body.get("user") or who))
        forward_headers = {"content-type": "application/json"}
        chat = path.endswith("chat/completions")
        start = time.perf_counter()
        hold = BudgetHold(gw.meter)
        tiers = [gw.router.order[0], gw.router.order[-1]] if policy == "cascade" else [tier]
        try:
            hold.reserve(key_id, tiers, body, chat)
        except BillingError as exc:
            gw.errors.labels("-", str(exc.status)).inc()
            return error_response(exc.status, exc.message, code=exc.code)
        try:
            if policy == "cascade":
                return await cascade(body, forward_headers, chat, path, key_id, who, start,
                                     hold)
            return await forward(tier, path, body, forward_headers, key_id, who, start,
                                 hold=hold)
        finally:
            if not hold.streaming:
                hold.release()

    def bill(tier: str, key_id: str | None, who: str, usage: dict[str, Any] | None,
             finish: str | None) -> dict[str, Any]:
        prompt, cached, completion = usage_tokens(usage)
        gw.limiter.add_tokens(who, prompt + completion)
        if gw.meter is None:
            return {}
        ctx = BillingContext(key_id, gw.meter.policy.quote(tier, gw.meter.clock(), 0.5),
                             time.time())
        cost, _ = gw.meter.bill(ctx, Usage(f"gw-{time.time_ns()}", prompt, cached,
                                           completion, finish, tier=tier))
        return cost

    async def forward(tier: str, path: str, body: dict[str, Any], headers: dict[str, str],
                      key_id: str | None, who: str, start: float,
                      extra_headers: dict[str, str] | None = None,
                      hold: BudgetHold | None = None) -> Response:
        stream = bool(body.get("stream"))
        client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        send = dict(body)
        if stream:
            send["stream_options"] = {"include_usage": True}
        try:
            resp, backend = await gw.open(tier, path, send, headers)
        except NoBackend as exc:
            gw.errors.labels(tier, "503").inc()
            return error_response(503, str(exc), code="no_backend")
        out_headers = {"x-deepserve-tier": tier, "x-deepserve-backend": backend.url,
                       **(extra_headers or {})}
        gw.requests.labels(tier, backend.url, str(resp.status_code)).inc()
        if not stream or resp.status_code != 200:
            try:
                content = await resp.aread()
            finally:
                await resp.aclose()
                gw.release(backend)
            gw.latency.labels(tier).observe(time.perf_counter() - start)
            if resp.status_code == 200:
                data = json.loads(content)
                cost = bill(tier, key_id, who, data.get("usage"),
                            (data.get("choices") or [{}])[0].get("finish_reason"))
                if cost:
                    data.setdefault("usage", {})["gateway_cost"] = cost["cost"]
                content = json.dumps(data).encode()
            return Response(content, status_code=resp.status_code,
                            media_type=resp.headers.get("content-type", "application/json"),
                            headers=out_headers)

        async def passthrough() -> AsyncIterator[bytes]:
            usage = None
            finish = None
            done = False
            try:
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if event.get("usage"):
                            usage = event["usage"]
                            if not event.get("choices") and not client_wants_usage:
                                continue  # the client did not ask for the usage chunk
                        for c in event.get("choices") or []:
                            finish = c.get("finish_reason") or finish
                    done = done or line == "data: [DONE]"
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
                    yield b"data: [DONE]\n\n"
            finally:
                await resp.aclose()
                gw.release(backend)
                gw.latency.labels(tier).observe(time.perf_counter() - start)
                bill(tier, key_id, who, usage, finish or "abort")
                if hold is not None:
                    hold.release()

        if hold is not None:
            hold.streaming = True  # released when the stream ends, after its bill

        return StreamingResponse(passthrough(), media_type="text/event-stream",
                                 headers=out_headers)

    async def cascade(body: dict[str, Any], headers: dict[str, str], chat: bool, path: str,
                      key_id: str | None, who: str, start: float, hold: BudgetHold) -> Response:
        lite, pro = gw.router.order[0], gw.router.order[-1]
        probe = dict(body, stream=False)
        probe.pop("stream_options", None)
        if chat:
            probe["logprobs"] = True
        else:
            probe["logprobs"] = max(1, int(body.get("logprobs") or 0))
        try:
            resp, backend = await gw.open(lite, path, probe, headers)
        except NoBackend:
            return await forward(pro, path, body, headers, key_id, who, start,
                                 {"x-deepserve-escalated": "lite-unavailable"}, hold)
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
        elif mean_lp is not None and mean_lp < cfg.cascade_min_logprob:
            reason = "low_confidence"
        lite_cost = bill(lite, key_id, who, data.get("usage"), choice.get("finish_reason"))
        if reason is not None and pro != lite:
            gw.escalations.labels(lite, pro, reason).inc()
            return await forward(pro, path, body, headers, key_id, who, start,
                                 {"x-deepserve-escalated": reason,
                                  "x-deepserve-lite-mean-logprob": f"{mean_lp}"}, hold)
        gw.latency.labels(lite).observe(time.perf_counter() - start)
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

    async def relay(request: Request, path: str) -> Response:
        """Pass a request that is neither generated nor billed (tokenize) to a backend of
        the tier its model names, and its answer back unchanged."""
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "request body is not valid JSON; send a JSON object "
                                  "with Content-Type: application/json")
        if not isinstance(body, dict):
            return error_response(400, "request body must be a JSON object")
        headers = {k.lower(): v for k, v in request.headers.items()}
        if gw.meter is not None:
            auth = headers.get("authorization", "")
            try:
                gw.meter.authorize(auth[7:] if auth.startswith("Bearer ") else None)
            except BillingError as exc:
                return error_response(exc.status, exc.message, code=exc.code)
        tier = gw.router.choose("model", body, headers, "")
        try:
            resp, backend = await gw.open(tier, path, body,
                                          {"content-type": "application/json"})
        except NoBackend as exc:
            return error_response(503, str(exc), code="no_backend")
        try:
            content = await resp.aread()
        finally:
            await resp.aclose()
            gw.release(backend)
        return Response(content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", "application/json"),
                        headers={"x-deepserve-tier": tier})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await relay(request, "/tokenize")

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await relay(request, "/detokenize")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, "/v1/completions")

    return app


def run_gateway(cfg: GatewayConfig) -> int:
    import uvicorn

    app = create_gateway_app(cfg)
    logger.info("gateway on http://%s:%d/v1: tiers %s, policy %s, balancing %s", cfg.host,
                cfg.port, ", ".join(f"{t.name}={len(t.backends)}" for t in cfg.tiers),
                cfg.policy, cfg.balancing)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=10)
    return 0
