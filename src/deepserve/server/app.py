"""The FastAPI application: routes, OpenAI error bodies, auth, admission, draining."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepserve.admin.api import SELF_CHECKED, AdminContext, add_admin
from deepserve.billing.meter import BillingContext, BillingError, request_tags
from deepserve.billing.ratelimit import retry_after
from deepserve.billing.shared import SharedLimitsError
from deepserve.engine.async_engine import AsyncEngine, EngineDeadError
from deepserve.errors import DeepserveError
from deepserve.plugins import PluginHooks, attach, load_plugins
from deepserve.protocol.http import (
    BodyLimit,
    KeyCheck,
    bearer_of,
    model_not_found,
    model_object,
    models_list,
    off_loop_json_route,
    validation_message,
)
from deepserve.protocol.models import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ErrorResponse,
    check_metadata,
)
from deepserve.protocol.websocket import PATH as WS_PATH
from deepserve.protocol.websocket import RESPONSES_PATH as WS_RESPONSES_PATH
from deepserve.protocol.websocket import serve_chat_socket
from deepserve.sampling_params import SamplingParams
from deepserve.server.chat_output import ChatContext
from deepserve.server.chat_setup import chat_setup
from deepserve.server.embeddings import embed, inputs_of, pooling_for
from deepserve.server.params import sampling_params
from deepserve.server.pipeline import (
    APIError,
    ClientGone,
    check_text,
    guarded_stream,
    until_done,
)
from deepserve.server.reasoning import prompt_opens_thinking
from deepserve.server.responses_route import add_responses_routes
from deepserve.server.state import ServerConfig, ServerState, error_response
from deepserve.server.tokenize import add_tokenize_routes

logger = logging.getLogger(__name__)

# pydantic names the union member in an error's location ("prompt.list[int].0"): dropped.
# Documented in the OpenAPI schema for every route that takes a body.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what} for code, what in (
        (400, "Invalid request (the message names the field and the fix)"),
        (401, "Missing or wrong API key"), (402, "Budget exhausted"),
        (404, "Unknown model"), (408, "Request timed out"),
        (413, "Request body too large"), (429, "Capacity, rate or quota limit reached"),
        (500, "Internal error in one request"), (503, "Draining or engine failed"))}


def create_app(engine: AsyncEngine, cfg: ServerConfig | None = None) -> FastAPI:
    cfg = cfg or ServerConfig()
    state = ServerState(engine, cfg)
    app = FastAPI(title="deepserve", version="0.1.0",
                  description="OpenAI-compatible LLM serving")
    app.router.route_class = off_loop_json_route()  # large bodies parsed off the loop
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
        return error_response(400, *validation_message(exc.errors()))

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

    plugins = load_plugins(cfg.plugins, cfg.plugin_config, "server")
    if plugins:  # inside the key check: hooks see the key id
        attach(plugins, state.meter)
        app.add_middleware(PluginHooks, plugins=plugins)
    add_admin(app, AdminContext(state.meter, "server", state.live_stats, cfg.api_key))
    if state.meter.keys is not None or cfg.api_key:
        app.add_middleware(KeyCheck, check=state.check_key, on_refuse=count_error,
                           skip_prefix=SELF_CHECKED)
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

    def limit(request: Request, key_id: str | None) -> str | None:
        """Count the request against its key's per-minute limits (429 when over)."""
        state.meter.check_access(key_id, state.model_name)
        if state.limiter is None:
            return None
        who = key_id or bearer_of(request.headers.get("authorization")) or (
            request.client.host if request.client else "anon")
        rpm, tpm = state.meter.key_limits(key_id)
        try:
            over = state.limiter.check(who, rpm=rpm, tpm=tpm)
        except SharedLimitsError as exc:
            raise APIError(503, f"{exc}; retry shortly", code="limits_unavailable",
                           headers={"Retry-After": "1"}) from None
        if over is not None:
            which, wait = over
            raise APIError(429, f"rate limit reached: {which} per minute for this key; "
                           "retry after the Retry-After seconds", code="rate_limit_exceeded",
                           headers={"Retry-After": retry_after(wait)})
        return who

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

    def served() -> list[tuple[str, dict[str, Any]]]:
        return [(state.model_name, {"created": int(state.started),
                                    "max_model_len": engine.engine.max_model_len})]

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def models() -> dict[str, Any]:
        return models_list(served())

    @app.get("/v1/models/{model_id:path}", responses=ERROR_RESPONSES)
    async def model(model_id: str) -> Response:
        found = model_object(served(), model_id)
        if found is None:
            count_error(404)
            return JSONResponse(model_not_found(model_id, [state.model_name]),
                                status_code=404)
        return JSONResponse(found)

    async def run(req: ChatCompletionRequest | CompletionRequest, request: Request) -> Response:
        chat = isinstance(req, ChatCompletionRequest)
        check_text(req)
        if not chat and req.suffix is not None:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported by this model: "
                           "it has no FIM tokens; remove suffix", param="suffix")
        state.check_task("generate", request.url.path)
        prompts = [None] if chat else _prompt_list(req.prompt)
        if len(prompts) > state.admission.limit:
            raise APIError(400, f"prompt holds {len(prompts)} prompts; this server takes at "
                           f"most {state.admission.limit} in one request (max_num_seqs + "
                           "max_queue): split it", param="prompt")
        key_id = getattr(request.state, "key_id", None)
        who = limit(request, key_id)
        release = admit(req.model, len(prompts))
        handed_off = False
        bill: BillingContext | None = None
        try:
            ctx = None
            if chat:
                setup = chat_setup(req, state.chat_template)
                params = setup.params
            else:
                check_metadata(req.metadata)
                params = sampling_params(req, 16)
            salt = state.cache_salt(req, key_id)
            if chat:
                text, ids = await state.preparer.run(
                    engine.prepare, messages=setup.messages, params=params,
                    default_max_tokens=cfg.max_tokens_default, chat_options=setup.options,
                    literal_content=not cfg.allow_special_tokens_in_content)
                prepared = [(text, ids)]
                ctx = ChatContext(setup.plan, state.reasoning,
                                  state.reasoning and prompt_opens_thinking(text or ""))
            else:
                prepared = await state.preparer.run(
                    lambda: [engine.prepare(prompt=p, params=params) for p in prompts])
            bill = state.meter.start(key_id, state.model_name)
            bill.who = who
            state.share(bill, key_id, req.user)
            bill.tags = request_tags("chat.completions" if chat else "completions",
                                     req.model_dump(exclude_none=True))
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

    @app.post("/v1/embeddings", responses=ERROR_RESPONSES)
    async def embeddings(req: EmbeddingRequest, request: Request) -> Response:
        check_text(req)
        state.check_task("embed", "/v1/embeddings")
        check_metadata(req.metadata)
        hidden = engine.engine.model_config.hidden_size
        if req.dimensions is not None and req.dimensions != hidden:
            raise APIError(400, f"dimensions={req.dimensions} is not supported: this model's "
                           f"embeddings have {hidden} dimensions and cannot be shortened; "
                           "remove dimensions", param="dimensions")
        items = inputs_of(req)
        pooling = pooling_for(cfg.embedding_pooling, state.model_name)
        key_id = getattr(request.state, "key_id", None)
        who = limit(request, key_id)
        release = admit(req.model, min(len(items), engine.engine.config.max_num_seqs))
        bill: BillingContext | None = None
        try:
            params = SamplingParams(max_tokens=1, embed=pooling)

            def prepare() -> list[list[int]]:
                out = []
                for k, item in enumerate(items):
                    try:
                        _, ids = engine.engine.tokenize_prompt(prompt=item)
                        engine.engine.check_request(ids, params, "input")
                    except DeepserveError as exc:
                        raise DeepserveError(f"input[{k}]: {exc.message}", param="input",
                                             code=exc.code) from None
                    out.append(ids)
                return out

            prepared = await state.preparer.run(prepare)
            bill = state.meter.start(key_id, state.model_name)
            bill.who = who
            state.share(bill, key_id, req.user)
            bill.tags = request_tags("embeddings", req.model_dump(exclude_none=True))
            state.meter.reserve(bill, sum(len(ids) for ids in prepared), 0)
            try:
                body = await until_done(request, embed(state, req, prepared, bill, pooling),
                                        cfg.request_timeout)
            except ClientGone:
                return Response(status_code=499)
            return JSONResponse(body, headers=_price_headers(bill) | _cost_header(body))
        finally:
            if bill is not None:
                state.meter.release(bill)
            release()
    add_responses_routes(app, state, admit, limit, ERROR_RESPONSES, _price_headers)

    @app.websocket(WS_PATH)
    async def chat_socket(ws: WebSocket) -> None:
        await serve_chat_socket(ws)

    @app.websocket(WS_RESPONSES_PATH)
    async def responses_socket(ws: WebSocket) -> None:
        await serve_chat_socket(ws, "/v1/responses")

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


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        return list(prompt)
    raise DeepserveError("prompt must be a string, a list of strings, or token ids",
                         param="prompt")
