"""The gateway's HTTP app: the routes, wired to the shared state (``core.Gateway``) and
the request handling (``handlers.Handlers``)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from deepserve.admin.api import SELF_CHECKED, AdminContext, add_admin
from deepserve.billing.keys import KeyStore
from deepserve.billing.meter import BillingError
from deepserve.errors import DeepserveError
from deepserve.gateway.config import GatewayConfig
from deepserve.gateway.core import Gateway, NoBackend
from deepserve.gateway.handlers import Handlers, error_response
from deepserve.plugins import PluginHooks, attach, load_plugins
from deepserve.protocol.http import (
    KeyCheck,
    bearer,
    model_not_found,
    model_object,
    models_list,
    off_loop_json_route,
    validation_message,
)
from deepserve.protocol.websocket import PATH as WS_PATH
from deepserve.protocol.websocket import RESPONSES_PATH as WS_RESPONSES_PATH
from deepserve.protocol.websocket import serve_chat_socket

logger = logging.getLogger(__name__)

__all__ = ["Gateway", "NoBackend", "create_gateway_app", "error_response", "run_gateway"]


def create_gateway_app(cfg: GatewayConfig) -> FastAPI:
    gw = Gateway(cfg)
    handlers = Handlers(gw)
    app = FastAPI(title="deepserve gateway", version="0.1.0")
    app.router.route_class = off_loop_json_route()  # large bodies parsed off the loop
    app.state.gateway = gw
    plugins = load_plugins(cfg.plugins, cfg.plugin_config, "gateway")
    if plugins:
        attach(plugins, gw.meter)
        keys = gw.meter.keys if gw.meter is not None else None

        def key_of(scope: dict[str, Any]) -> str | None:
            k = KeyStore.lookup(keys, bearer(scope) or "") if keys is not None else None
            return k.key_id if k is not None else None

        app.add_middleware(PluginHooks, plugins=plugins, key_of=key_of)
    if gw.meter is not None and gw.meter.keys is not None:
        meter = gw.meter

        def check(key: str | None) -> str | tuple[int, str, str] | None:
            # /v1 routes are authorized (with budgets and rate limits) by the route
            # itself; this guards the rest: /metrics (revenue), /docs, /openapi.json.
            try:  # revoked and expired keys are refused here too
                meter.identify(key)
            except BillingError as exc:
                return exc.status, exc.message, exc.code
            return None

        app.add_middleware(KeyCheck, check=check, skip_prefix=("/v1/", *SELF_CHECKED),
                           on_refuse=lambda status: gw.errors.labels("-", str(status)).inc())

    add_admin(app, AdminContext(gw.meter, "gateway", gw.live_stats))

    @app.on_event("startup")
    async def _start() -> None:
        await gw.refresh()
        gw._health_task = asyncio.create_task(gw.health_loop())

    @app.on_event("shutdown")
    async def _stop() -> None:
        if gw._health_task:
            gw._health_task.cancel()
        await gw.client.aclose()
        if gw.meter and gw.meter.ledger:
            gw.meter.ledger.close()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        gw.errors.labels("-", "400").inc()
        return error_response(400, *validation_message(exc.errors()))

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

    def served() -> list[tuple[str, dict[str, Any]]]:
        return [(m, {"tier": t.name}) for t in cfg.tiers for m in t.models]

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return models_list(served())

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        found = model_object(served(), model_id)
        if found is None:
            return JSONResponse(model_not_found(model_id, [m for m, _ in served()]),
                                status_code=404)
        return JSONResponse(found)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await handlers.relay(request, "/tokenize")

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await handlers.relay(request, "/detokenize")

    @app.websocket(WS_PATH)
    async def chat_socket(ws: WebSocket) -> None:
        await serve_chat_socket(ws)

    @app.websocket(WS_RESPONSES_PATH)
    async def responses_socket(ws: WebSocket) -> None:
        await serve_chat_socket(ws, "/v1/responses")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handlers.handle(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handlers.handle(request, "/v1/completions")

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await handlers.handle(request, "/v1/responses")

    @app.get("/v1/responses/{response_id}")
    async def response_get(response_id: str, request: Request) -> Response:
        return await handlers.relay_stored(request, f"/v1/responses/{response_id}", "GET")

    @app.delete("/v1/responses/{response_id}")
    async def response_delete(response_id: str, request: Request) -> Response:
        return await handlers.relay_stored(request, f"/v1/responses/{response_id}",
                                           "DELETE")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await handlers.handle(request, "/v1/embeddings")

    return app


def run_gateway(cfg: GatewayConfig) -> int:
    import uvicorn

    app = create_gateway_app(cfg)
    logger.info("gateway on http://%s:%d/v1: tiers %s, policy %s, balancing %s", cfg.host,
                cfg.port, ", ".join(f"{t.name}={len(t.backends)}" for t in cfg.tiers),
                cfg.policy, cfg.balancing)
    from deepserve.protocol.transport import http_protocol

    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                http=http_protocol(cfg.header_timeout),
                limit_concurrency=cfg.max_connections or None,
                timeout_graceful_shutdown=10)
    return 0
