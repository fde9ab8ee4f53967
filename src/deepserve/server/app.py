"""The FastAPI application: routes, OpenAI error bodies, auth, admission, draining."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepserve.billing.meter import BillingContext, BillingError, Meter
from deepserve.config import EngineConfig
from deepserve.engine.async_engine import AsyncEngine, EngineDeadError
from deepserve.errors import DeepserveError
from deepserve.server.metrics import ServerMetrics
from deepserve.server.protocol import ChatCompletionRequest, CompletionRequest
from deepserve.server.serving import OpenAIServing, chat_messages, sampling_params

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
          404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_exceeded",
          500: "internal_server_error", 503: "service_unavailable"}


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-side settings of ``deepserve serve``."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 256
    shutdown_grace_s: float = 30.0
    ledger: str | None = None  # SQLite usage ledger path; None: no ledger
    pricing: str | None = None  # pricing policy TOML; None: DeepSeek-R1 list prices
    api_keys: str | None = None  # key file with budgets and quotas
    pricing_clock: str | None = None  # fixed ISO time for pricing (tests, simulations)
    tier: str | None = None  # tier name recorded in the ledger
    hardware: str | None = None  # recorded with replica uptime (default: detected)
    hourly_cost: float = 0.0  # this replica's cost per hour, exported for margin dashboards


class APIError(Exception):
    """An error answered with the OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class ServerState:
    """What the routes share: engine, metrics, draining flag."""

    def __init__(self, engine: AsyncEngine, cfg: ServerConfig) -> None:
        self.engine = engine
        self.cfg = cfg
        self.model_name = engine.model_name
        self.metrics = ServerMetrics(engine, self.model_name)
        self.meter = _build_meter(engine, cfg, self.metrics)
        cost = Gauge("deepserve_replica_cost_per_hour", "What this replica costs per hour "
                     "(--hourly-cost), in the pricing currency", ["model", "hardware"],
                     registry=self.metrics.registry)
        cost.labels(self.model_name, cfg.hardware or _hardware(engine.engine)).set(
            cfg.hourly_cost)
        self.serving = OpenAIServing(engine, self.metrics, self.model_name, self.meter)
        self.draining = False
        self.started = time.time()


def create_app(engine: AsyncEngine, cfg: ServerConfig | None = None) -> FastAPI:
    cfg = cfg or ServerConfig()
    state = ServerState(engine, cfg)
    app = FastAPI(title="deepserve", version="0.1.0",
                  description="OpenAI-compatible LLM serving")
    app.state.deepserve = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        state.metrics.errors.labels(state.model_name, str(exc.status)).inc()
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(DeepserveError)
    async def _user_error(_: Request, exc: DeepserveError) -> JSONResponse:
        state.metrics.errors.labels(state.model_name, str(exc.status)).inc()
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        state.metrics.errors.labels(state.model_name, "400").inc()
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            msg = ("request body is not valid JSON (" + str(first.get("ctx", {}).get("error", ""))
                   + "); send a JSON object with Content-Type: application/json")
            param = None
        elif not loc:
            msg = "request body must be a JSON object; send it with Content-Type: application/json"
        else:
            msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', []) if x != 'body')}: "
                            f"{e.get('msg')}" for e in errs[:5])
        return error_response(400, msg or "invalid request body", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(503, str(exc), code="engine_dead")

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        request.state.key_id = None
        if state.meter.keys is not None and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            key = header[7:] if header.startswith("Bearer ") else None
            try:
                request.state.key_id = state.meter.authorize(key)
            except BillingError as exc:
                state.metrics.errors.labels(state.model_name, str(exc.status)).inc()
                return error_response(exc.status, exc.message, code=exc.code)
        elif cfg.api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            if header != f"Bearer {cfg.api_key}":
                state.metrics.errors.labels(state.model_name, "401").inc()
                why = "missing" if not header else "wrong"
                return error_response(401, f"API key {why}: send 'Authorization: Bearer "
                                      "<key>' with the key the server was started with",
                                      code="invalid_api_key")
        return await call_next(request)

    def admit(model: str | None) -> None:
        if state.draining:
            raise APIError(503, "server is shutting down and takes no new requests; retry "
                           "on another replica", code="draining")
        if model not in (None, "", state.model_name):
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                           f"{state.model_name!r} (see GET /v1/models)", param="model",
                           code="model_not_found")
        eng = engine.engine
        limit = eng.config.max_num_seqs + cfg.max_queue
        if engine.num_unfinished >= limit:
            raise APIError(429, f"server is at capacity ({engine.num_unfinished} requests in "
                           f"flight, queue limit {cfg.max_queue}); retry after a moment",
                           code="queue_full", headers={"Retry-After": "1"})

    @app.get("/health")
    async def health() -> Response:
        if engine.dead is not None:
            return error_response(503, f"engine failed: {engine.dead}")
        if state.draining:
            return error_response(503, "draining", code="draining")
        return JSONResponse({"status": "ok", "model": state.model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(state.started),
            "owned_by": "deepserve", "max_model_len": engine.engine.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        admit(req.model)
        params = sampling_params(req, None)
        messages = chat_messages(req)
        _, ids = engine.prepare(messages=messages, params=params)
        bill = state.meter.start(request.state.key_id, state.model_name)
        headers = _price_headers(bill)
        if req.stream:
            return StreamingResponse(state.serving.chat_stream(req, params, ids, bill),
                                     media_type="text/event-stream", headers=headers)
        body = await state.serving.chat(req, params, ids, bill)
        return JSONResponse(body, headers=headers | _cost_header(body))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        admit(req.model)
        params = sampling_params(req, 16)
        prompts = _prompt_list(req.prompt)
        prepared = [engine.prepare(prompt=p, params=params) for p in prompts]
        bill = state.meter.start(request.state.key_id, state.model_name)
        headers = _price_headers(bill)
        if req.stream:
            return StreamingResponse(
                state.serving.completion_stream(req, params, prepared, bill),
                media_type="text/event-stream", headers=headers)
        body = await state.serving.completion(req, params, prepared, bill)
        return JSONResponse(body, headers=headers | _cost_header(body))

    return app


def _price_headers(bill: BillingContext) -> dict[str, str]:
    return {"x-deepserve-price-multiplier": f"{bill.quote.multiplier:g}",
            "x-deepserve-pricing-rules": ",".join(bill.quote.rules) or "none"}


def _cost_header(body: dict[str, Any]) -> dict[str, str]:
    usage = body.get("usage") or {}
    if "cost" not in usage:
        return {}
    return {"x-deepserve-cost": f"{usage['cost']:.10f}", "x-deepserve-currency":
            usage["currency"]}


def _build_meter(engine: AsyncEngine, cfg: ServerConfig, metrics: ServerMetrics) -> Meter:
    from datetime import datetime

    from deepserve.billing.keys import KeyStore
    from deepserve.billing.ledger import Ledger
    from deepserve.billing.pricing import PricingPolicy

    policy = PricingPolicy.load(cfg.pricing) if cfg.pricing else PricingPolicy()
    keys = KeyStore.load(cfg.api_keys) if cfg.api_keys else None
    eng = engine.engine
    ledger = None
    if cfg.ledger:
        ledger = Ledger(cfg.ledger, engine.model_name, cfg.hardware or _hardware(eng))
    clock = None
    if cfg.pricing_clock:
        try:
            fixed = datetime.fromisoformat(cfg.pricing_clock.replace("Z", "+00:00"))
        except ValueError:
            raise DeepserveError(f"pricing_clock={cfg.pricing_clock!r} is not an ISO time "
                                 "like 2026-01-01T17:00:00Z", param="pricing_clock") from None
        clock = lambda: fixed  # noqa: E731

    def utilization() -> float:
        # The busier of KV-cache use and batch occupancy.
        return max(eng.block_manager.usage,
                   len(eng.scheduler.running) / eng.config.max_num_seqs)

    return Meter(policy, ledger, keys, metrics.registry, utilization, cfg.tier, clock)


def _hardware(engine: Any) -> str:
    import platform

    import torch

    if engine.device.type == "cuda":
        return torch.cuda.get_device_name(engine.device)
    return f"cpu:{platform.machine()}"


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        return list(prompt)
    raise DeepserveError("prompt must be a string, a list of strings, or token ids",
                         param="prompt")


def run_server(engine_cfg: EngineConfig, cfg: ServerConfig) -> int:
    """Load the model, serve until SIGTERM/SIGINT, drain, exit 0.

    The engine loop runs in the main thread (torch's CPU kernels are fastest there) and
    uvicorn's event loop in a second thread; signals arrive in the main thread and are
    passed on: the first SIGTERM/SIGINT drains, a second stops at once.
    """
    import signal
    import threading

    import uvicorn

    engine = AsyncEngine(engine_cfg)
    app = create_app(engine, cfg)
    state: ServerState = app.state.deepserve
    server = _DrainingServer(uvicorn.Config(app, host=cfg.host, port=cfg.port,
                                            log_level="warning", access_log=False,
                                            timeout_graceful_shutdown=5), state)

    def serve() -> None:
        try:
            server.run()
        finally:
            engine.shutdown()
            if state.meter.ledger is not None:
                state.meter.ledger.close()

    def on_signal(sig: int, frame: Any) -> None:
        server.handle_exit(sig, frame)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    http = threading.Thread(target=serve, name="deepserve-http", daemon=True)
    http.start()
    logger.info("serving %s on http://%s:%d/v1", state.model_name, cfg.host, cfg.port)
    engine.run_forever()
    server.should_exit = True  # the engine stopped (drained, or failed): stop HTTP too
    http.join(30)
    if not server.started:
        logger.error("could not serve on %s:%d (is the port in use?)", cfg.host, cfg.port)
        return 1
    if engine.dead is not None:
        logger.error("engine failed: %s", engine.dead)
        return 1
    logger.info("stopped")
    return 0


class _DrainingServer:
    """uvicorn server whose first SIGTERM drains: new requests get 503, running ones finish
    (up to the grace period), then it exits. A second signal exits at once."""

    def __new__(cls, config: Any, state: ServerState) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            _drain_deadline = 0.0

            def handle_exit(self, sig: int, frame: Any) -> None:
                if state.draining:
                    self.should_exit = True
                    self.force_exit = True
                    return
                logger.info("signal %d: draining %d request(s), grace %.0fs", sig,
                            state.engine.num_unfinished, state.cfg.shutdown_grace_s)
                self._drain_deadline = time.monotonic() + state.cfg.shutdown_grace_s
                state.draining = True

            async def on_tick(self, counter: int) -> bool:
                if state.draining and (state.engine.num_unfinished == 0 or
                                       time.monotonic() > self._drain_deadline):
                    return True
                return await super().on_tick(counter)

        return Server(config)
