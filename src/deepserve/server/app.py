"""The FastAPI application: routes, OpenAI error bodies, auth, admission, draining."""

from __future__ import annotations

import logging
import re
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
from deepserve.server.chat_output import ChatContext
from deepserve.server.guard import BodyLimit, KeyCheck, error_body, same_key
from deepserve.server.metrics import ServerMetrics
from deepserve.server.params import sampling_params
from deepserve.server.pipeline import (
    Admission,
    APIError,
    ClientGone,
    Preparer,
    guarded_stream,
    until_done,
)
from deepserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    bad_text_path,
)
from deepserve.server.reasoning import (
    REASONING_PARSERS,
    prompt_opens_thinking,
    template_thinks,
)
from deepserve.server.serving import OpenAIServing
from deepserve.server.tokenize import add_tokenize_routes
from deepserve.server.tools import constraint, plan_tools, render_history

logger = logging.getLogger(__name__)

PREFIX_CACHE_SCOPES = ("global", "key")
# pydantic names the union member in an error's location ("prompt.list[int].0"): dropped.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\])$")
# Documented in the OpenAPI schema for every route that takes a body.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what} for code, what in (
        (400, "Invalid request (the message names the field and the fix)"),
        (401, "Missing or wrong API key"), (402, "Budget exhausted"),
        (404, "Unknown model"), (408, "Request timed out"),
        (413, "Request body too large"), (429, "Capacity, rate or quota limit reached"),
        (500, "Internal error in one request"), (503, "Draining or engine failed"))}


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
    max_request_bytes: int = 8 * 2**20  # larger bodies get 413 before they are read whole
    request_timeout: float | None = 600.0  # seconds; past it 408 (or an SSE error event)
    max_tokens_default: int = 4096  # chat requests that give no max_tokens
    metrics_port: int | None = None  # serve /metrics here too, without a key
    prefix_cache_scope: str = "global"  # "key": tenants never share cached KV blocks
    # "deepseek_r1": <think> text -> reasoning_content; None: on if the template thinks
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        if self.prefix_cache_scope not in PREFIX_CACHE_SCOPES:
            raise DeepserveError(f"prefix_cache_scope={self.prefix_cache_scope!r} is not one "
                                 f"of {', '.join(PREFIX_CACHE_SCOPES)}",
                                 param="prefix_cache_scope")
        if self.max_request_bytes < 1024:
            raise DeepserveError(f"max_request_bytes={self.max_request_bytes} is too small; "
                                 "give at least 1024", param="max_request_bytes")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise DeepserveError("request_timeout must be > 0 seconds (or unset for none)",
                                 param="request_timeout")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise DeepserveError(f"reasoning_parser={self.reasoning_parser!r} is not one of "
                                 f"{', '.join(REASONING_PARSERS)}", param="reasoning_parser")
        if self.max_tokens_default < 1:
            raise DeepserveError("max_tokens_default must be >= 1", param="max_tokens_default")


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers=headers)


class ServerState:
    """What the routes share: engine, metrics, meter, admission, draining flag."""

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
        self.admission = Admission(engine.engine.config.max_num_seqs + cfg.max_queue)
        self.preparer = Preparer()
        self.chat_template = getattr(engine.tokenizer, "chat_template", None)
        if not isinstance(self.chat_template, str):
            self.chat_template = None
        self.reasoning = cfg.reasoning_parser is not None or template_thinks(
            self.chat_template)
        self.draining = False
        self.started = time.time()

    def check_key(self, key: str | None) -> str | tuple[int, str, str] | None:
        """Bearer key -> key id (None without a key file), or (status, message, code)."""
        if self.meter.keys is not None:
            try:
                return self.meter.authorize(key)
            except BillingError as exc:
                return exc.status, exc.message, exc.code
        if self.cfg.api_key and not same_key(key, self.cfg.api_key):
            why = "missing" if key is None else "wrong"
            return (401, f"API key {why}: send 'Authorization: Bearer <key>' with the key "
                    "the server was started with", "invalid_api_key")
        return None

    def cache_salt(self, req: ChatCompletionRequest | CompletionRequest,
                   key_id: str | None) -> str | None:
        """Which requests may share prefix-cache blocks: same ``cache_salt``, and with
        ``--prefix-cache-scope key`` the same API key too."""
        if self.cfg.prefix_cache_scope == "key":
            return f"key:{key_id or ''}\0{req.cache_salt or ''}"
        return req.cache_salt or None


def create_app(engine: AsyncEngine, cfg: ServerConfig | None = None) -> FastAPI:
    cfg = cfg or ServerConfig()
    state = ServerState(engine, cfg)
    app = FastAPI(title="deepserve", version="0.1.0",
                  description="OpenAI-compatible LLM serving")
    app.state.deepserve = state

    def count_error(status: int) -> None:
        state.metrics.errors.labels(state.model_name, str(status)).inc()

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        count_error(exc.status)
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(DeepserveError)
    async def _user_error(_: Request, exc: DeepserveError) -> JSONResponse:
        count_error(exc.status)
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(BillingError)
    async def _billing_error(_: Request, exc: BillingError) -> JSONResponse:
        count_error(exc.status)
        return error_response(exc.status, exc.message, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        count_error(400)
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body" and not _TYPE_TAG.match(str(x))]
        param = ".".join(loc) or None
        if first.get("type") == "extra_forbidden":
            msg = (f"Unrecognized request argument supplied: {param}; see GET /openapi.json "
                   "for the fields this server takes")
        elif first.get("type") == "json_invalid":
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
        # Keeps the exception's headers: a 405 carries its Allow header.
        return error_response(exc.status_code, str(exc.detail),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(503, str(exc), code="engine_dead")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in a request")
        count_error(500)
        return error_response(500, f"internal error ({type(exc).__name__}); the server goes "
                              "on serving, retry, and report it if it repeats",
                              code="internal_error")

    if state.meter.keys is not None or cfg.api_key:
        app.add_middleware(KeyCheck, check=state.check_key, on_refuse=count_error)
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)

    def admit(model: str | None, weight: int) -> Any:
        if state.draining:
            raise APIError(503, "server is shutting down and takes no new requests; retry "
                           "on another replica", code="draining")
        if model not in (None, "", state.model_name):
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                           f"{state.model_name!r} (see GET /v1/models)", param="model",
                           code="model_not_found")
        return state.admission.enter(weight)

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

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(state.started),
            "owned_by": "deepserve", "max_model_len": engine.engine.max_model_len}]}

    async def run(req: ChatCompletionRequest | CompletionRequest, request: Request) -> Response:
        chat = isinstance(req, ChatCompletionRequest)
        where = bad_text_path(req.model_dump(exclude_none=True))
        if where is not None:
            raise APIError(400, f"{where} is not valid Unicode text (it holds a lone UTF-16 "
                           "surrogate such as \\ud800); send text that encodes as UTF-8",
                           param=where)
        if not chat and req.suffix is not None:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported by this model: "
                           "it has no FIM tokens; remove suffix", param="suffix")
        prompts = [None] if chat else _prompt_list(req.prompt)
        release = admit(req.model, len(prompts))
        handed_off = False
        key_id = getattr(request.state, "key_id", None)
        bill: BillingContext | None = None
        try:
            ctx = None
            if chat:
                plan = plan_tools(req, state.chat_template)
                params = sampling_params(req, None, constraint(plan) if plan else None)
                messages = render_history(req, plan, state.chat_template)
                options = {"add_generation_prompt": req.add_generation_prompt,
                           **(req.chat_template_kwargs or {})}
                if plan is not None and plan.native:
                    options["tools"] = plan.tools
            else:
                params = sampling_params(req, 16)
            salt = state.cache_salt(req, key_id)
            if chat:
                text, ids = await state.preparer.run(
                    engine.prepare, messages=messages, params=params,
                    default_max_tokens=cfg.max_tokens_default, chat_options=options)
                prepared = [(text, ids)]
                ctx = ChatContext(plan, state.reasoning,
                                  state.reasoning and prompt_opens_thinking(text or ""))
            else:
                prepared = await state.preparer.run(
                    lambda: [engine.prepare(prompt=p, params=params) for p in prompts])
            bill = state.meter.start(key_id, state.model_name)
            state.meter.reserve(bill, sum(len(ids) for _, ids in prepared),
                                (params.max_tokens or 0) * params.n * len(prepared))
            headers = _price_headers(bill)
            if req.stream:
                chunks = (state.serving.chat_stream(req, params, prepared[0][1], bill, salt,
                                                    ctx) if chat else
                          state.serving.completion_stream(req, params, prepared, bill, salt))

                def end(b: BillingContext = bill) -> None:
                    state.meter.release(b)
                    release()

                handed_off = True
                return StreamingResponse(guarded_stream(chunks, cfg.request_timeout, end),
                                         media_type="text/event-stream", headers=headers)
            work = (state.serving.chat(req, params, prepared[0][1], bill, salt, ctx) if chat
                    else state.serving.completion(req, params, prepared, bill, salt))
            try:
                body = await until_done(request, work, cfg.request_timeout)
            except ClientGone:
                logger.info("client went away before its response; request cancelled")
                return Response(status_code=499)
            return JSONResponse(body, headers=headers | _cost_header(body))
        finally:
            if not handed_off:
                if bill is not None:
                    state.meter.release(bill)
                release()

    add_tokenize_routes(app, state, ERROR_RESPONSES)

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        return await run(req, request)

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await run(req, request)

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

    if cfg.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(cfg.metrics_port, addr=cfg.host, registry=state.metrics.registry)
        logger.info("metrics on http://%s:%d/metrics (no key needed there)", cfg.host,
                    cfg.metrics_port)

    def serve() -> None:
        try:
            server.run()
        finally:
            engine.shutdown()
            state.preparer.shutdown()
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
                            state.admission.in_flight, state.cfg.shutdown_grace_s)
                self._drain_deadline = time.monotonic() + state.cfg.shutdown_grace_s
                state.draining = True

            async def on_tick(self, counter: int) -> bool:
                if state.draining and (state.admission.in_flight == 0 or
                                       time.monotonic() > self._drain_deadline):
                    return True
                return await super().on_tick(counter)

        return Server(config)
