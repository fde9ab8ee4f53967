"""The HTTP side of the OpenAI protocol, shared by the server, the gateway and the Ray
ingress: error bodies (and SSE error events), bearer keys, the model list, and what
every request passes before a route runs: a body-size limit and the API key check.

Both are plain ASGI middleware, so they see every path (``/metrics``, ``/openapi.json``
and ``/docs`` included) and work the same for streaming and non-streaming routes.
Only ``/health`` stays open, for load balancers and probes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout",
          413: "invalid_request_error", 429: "rate_limit_exceeded",
          500: "internal_server_error", 503: "service_unavailable"}


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


async def send_error(send: Send, status: int, message: str, code: str | None = None,
                     headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def bearer_of(header: str | None) -> str | None:
    """The key in an ``Authorization: Bearer <key>`` header: None when the header is
    absent, "" when it is not a bearer token."""
    if header is None:
        return None
    return header[7:] if header.startswith("Bearer ") else ""


def bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return bearer_of(value.decode("latin-1"))
    return None


def models_list(entries: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The body of ``GET /v1/models``: (model id, extra fields) for each model served."""
    return {"object": "list", "data": [{"id": name, "object": "model",
                                        "owned_by": "deepserve", **extra}
                                       for name, extra in entries]}


def model_object(entries: list[tuple[str, dict[str, Any]]], model_id: str
                 ) -> dict[str, Any] | None:
    """The body of ``GET /v1/models/{id}``, or None for a model not served here."""
    for entry in models_list(entries)["data"]:
        if entry["id"] == model_id:
            return entry
    return None


def model_not_found(model_id: str, served: list[str]) -> dict[str, Any]:
    """OpenAI's 404 body for a model id that is not served."""
    return error_body(404, f"The model {model_id!r} does not exist; this server serves "
                      f"{', '.join(repr(m) for m in served)} (see GET /v1/models)",
                      "model", "model_not_found")


def same_key(given: str | None, expected: str) -> bool:
    """Constant-time comparison, so response times do not reveal a key's prefix."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class BodyLimit:
    """413 for a body over ``limit`` bytes: from Content-Length before reading, or while
    reading a chunked body, so an oversized upload is never buffered whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await self._reject(send)
        seen = 0
        too_big = False

        async def counted() -> dict[str, Any]:
            nonlocal seen, too_big
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_big = True
                    raise _TooLarge
            return message

        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            if too_big:  # the app answered its failed body read: answer 413 instead
                if not started and message["type"] == "http.response.start":
                    started = True
                    await self._reject(send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._reject(send)
        except Exception:
            if not too_big:
                raise
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        mib = self.limit / 2**20
        await send_error(send, 413, f"request body is larger than this server's limit of "
                         f"{self.limit} bytes ({mib:g} MiB); send a shorter prompt, or start "
                         "the server with a larger --max-request-bytes",
                         code="request_too_large")


class _TooLarge(Exception):
    pass


class KeyCheck:
    """Requires ``Authorization: Bearer <key>`` on every path but ``/health`` (and, with
    ``skip_prefix``, paths under it that check keys themselves).

    ``check`` maps the bearer key (None when absent) to a key id for billing, or returns
    (status, message, code) to refuse the request. The key id is left in
    ``scope["state"]["key_id"]`` for the routes."""

    def __init__(self, app: ASGIApp,
                 check: Callable[[str | None], str | tuple[int, str, str] | None],
                 on_refuse: Callable[[int], None] | None = None,
                 skip_prefix: str | None = None) -> None:
        self.app, self.check, self.on_refuse = app, check, on_refuse
        self.skip_prefix = skip_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS or (
                self.skip_prefix and scope["path"].startswith(self.skip_prefix)):
            return await self.app(scope, receive, send)
        result = self.check(bearer(scope))
        if isinstance(result, tuple):
            status, message, code = result
            if self.on_refuse is not None:
                self.on_refuse(status)
            if scope["type"] == "websocket":  # refused at the handshake (HTTP 403)
                return await send({"type": "websocket.close", "code": 1008,
                                   "reason": message[:120]})
            return await send_error(send, status, message, code)
        scope.setdefault("state", {})["key_id"] = result
        await self.app(scope, receive, send)


SSE_DONE = "data: [DONE]\n\n"  # the last event of every OpenAI stream


def sse(event: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object, as OpenAI streams frame them."""
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def sse_error(status: int, message: str, code: str | None = None) -> str:
    """An error inside an event stream, after the 200 status has gone out."""
    return sse(error_body(status, message, code=code))


def body_once(body: bytes, then: Callable[[], Awaitable[dict[str, Any]]]
              ) -> Callable[[], Awaitable[dict[str, Any]]]:
    """An ASGI ``receive`` for a request run in-process: the whole body once, then
    whatever ``then`` returns (the client's own messages, or a disconnect when the
    caller says so)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then()

    return receive


def disconnect_on(event: asyncio.Event) -> Callable[[], Awaitable[dict[str, Any]]]:
    """For ``body_once``: an ``http.disconnect`` once ``event`` is set."""

    async def wait() -> dict[str, Any]:
        await event.wait()
        return {"type": "http.disconnect"}

    return wait


# Request bodies from this size are parsed in a worker thread: a few large bodies must
# not stall the event loop (and /health) while json.loads runs.
LARGE_BODY = 256 * 1024


def parse_json(body: bytes) -> Any:
    return json.loads(body)


async def json_of(body: bytes) -> Any:
    """A request body's JSON; off the event loop when the body is large."""
    if len(body) >= LARGE_BODY:
        return await asyncio.to_thread(parse_json, body)
    return parse_json(body)


def off_loop_json_route() -> type:
    """A FastAPI route class whose requests parse large JSON bodies in a worker thread
    (FastAPI reads a body model through ``request.json()``)."""
    from fastapi.routing import APIRoute
    from starlette.requests import Request

    class OffLoopJSONRequest(Request):
        async def json(self) -> Any:
            if not hasattr(self, "_json"):
                self._json = await json_of(await self.body())
            return self._json

    class OffLoopJSONRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Any], Awaitable[Any]]:
            handler = super().get_route_handler()

            async def route(request: Any) -> Any:
                return await handler(OffLoopJSONRequest(request.scope, request.receive))

            return route

    return OffLoopJSONRoute



_TYPE_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\])$")


def validation_message(errs: list[Any]) -> tuple[str, str | None]:
    """A 400's message and param for pydantic's errors on a request body or query."""
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
    return msg or "invalid request body", param
