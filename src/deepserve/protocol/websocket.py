"""Chat completions over a WebSocket (``/v1/chat/completions/ws``), in the server and
the gateway alike; ``/v1/responses/ws`` carries Responses API requests the same way (one
message per typed event).

The client sends a chat completion request as one JSON text message (``stream`` is
implied). The answer comes back as one message per ``chat.completion.chunk`` object,
the same objects an SSE stream carries, then the text ``[DONE]``. One socket carries
any number of requests, one after the other.

While an answer streams, any client message cancels it (send ``{"type": "cancel"}``):
generation stops, the server sends ``{"type": "cancelled"}`` and ``[DONE]``. A client
that disconnects cancels too. An error comes as an OpenAI error object, then
``[DONE]``; the socket stays open.

Each request runs through the front door's own HTTP route for chat completions,
middleware included: keys (the handshake's ``Authorization`` header), limits, plugins,
billing and, at the gateway, routing, all exactly as for HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect

from deepserve.protocol.http import body_once, disconnect_on, error_body

PATH = "/v1/chat/completions/ws"
RESPONSES_PATH = "/v1/responses/ws"  # the same for the Responses API: its typed events
DONE = "[DONE]"


async def serve_chat_socket(ws: WebSocket, target: str = "/v1/chat/completions") -> None:
    """Serve one WebSocket connection until the client closes it; each request runs
    through the HTTP route ``target``."""
    await ws.accept()
    try:
        while True:
            text = await _receive(ws)
            try:
                body = json.loads(text) if text is not None else None
            except ValueError:
                body = None
            if not isinstance(body, dict):
                what = "a binary frame" if text is None else "not a JSON object"
                await ws.send_text(json.dumps(error_body(
                    400, f"each message must be a request as a JSON object in a text frame "
                    f'(e.g. {{"model": "...", "messages": [...]}}); this one is {what}')))
                await ws.send_text(DONE)
                continue
            if body.get("type") == "cancel":
                continue  # nothing is running
            body["stream"] = True
            await _run(ws, body, target)
    except WebSocketDisconnect:
        return


async def _receive(ws: WebSocket) -> str | None:
    """The next message's text; None for a binary frame. WebSocketDisconnect when the
    client has gone."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    return message.get("text")


async def _run(ws: WebSocket, body: dict[str, Any], target: str) -> None:
    """One request through the app's own HTTP route, its SSE events relayed as messages;
    a client message or disconnect meanwhile is a disconnect for the route."""
    app = ws.scope["app"]
    raw = json.dumps(body).encode()
    headers = [(k, v) for k, v in ws.scope.get("headers", [])
               if k in (b"authorization", b"x-deepserve-route", b"x-deepserve-task",
                        b"x-deepserve-slo-ms", b"user-agent")]
    headers += [(b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": target,
             "raw_path": target.encode(), "query_string": b"", "root_path": "",
             "headers": headers, "client": ws.scope.get("client"),
             "server": ws.scope.get("server"), "app": app}
    stop = asyncio.Event()
    receive = body_once(raw, disconnect_on(stop))

    status = 0
    pending = b""
    error = b""

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, pending, error
        if message["type"] == "http.response.start":
            status = message["status"]
            return
        if message["type"] != "http.response.body" or stop.is_set():
            return
        if status != 200:
            error += message.get("body", b"")
            return
        pending += message.get("body", b"")
        while b"\n\n" in pending:
            event, pending = pending.split(b"\n\n", 1)
            for line in event.decode().splitlines():
                if line.startswith("data: ") and line[6:] != DONE:
                    await ws.send_text(line[6:])

    task = asyncio.create_task(app(scope, receive, send))
    listen = asyncio.create_task(_receive(ws))
    gone = False
    try:
        while not task.done():
            await asyncio.wait({task, listen}, return_when=asyncio.FIRST_COMPLETED)
            if listen.done() and not stop.is_set():
                stop.set()  # a message or a disconnect: cancel the generation
                gone = isinstance(listen.exception(), WebSocketDisconnect)
        await task
    finally:
        if not listen.done():
            listen.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                await listen
    if gone:
        raise WebSocketDisconnect()
    if stop.is_set():
        await ws.send_text(json.dumps({"type": "cancelled"}))
    elif status != 200:
        try:
            await ws.send_text(json.dumps(json.loads(error)))
        except ValueError:
            await ws.send_text(json.dumps(error_body(status, error.decode(errors="replace"))))
    await ws.send_text(DONE)
