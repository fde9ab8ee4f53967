"""Plugins: hooks a deployment adds without changing deepserve, the same in the server
and the gateway.

A plugin is any object with some of these methods:

- ``before_request(request: PluginRequest) -> dict | None``: runs before a generation
  request (``/v1/chat/completions``, ``/v1/completions``, the WebSocket route) is
  handled. Return a new body to rewrite the request, None to leave it, or raise
  ``Rejected(message, reason)`` to refuse it: the client gets a 400 naming the problem
  and the ledger records the refusal with its reason.
- ``after_response(request: PluginRequest, status: int, body: dict | None)``: runs once
  the response has gone out (an audit trail). ``body`` is the JSON answer, or None for
  a stream.
- ``on_usage(record: UsageRecord)``: runs for every billed request.

Loaded from the Python entry points in group ``deepserve.plugins`` (installed packages)
and from ``--plugin module:attr`` (repeatable). ``attr`` is a class or factory called
with the plugin's settings, the ``[NAME]`` table of ``--plugin-config FILE`` (NAME is
the plugin's ``name`` attribute, else its entry-point or attribute name), or an object
used as it is. A plugin that raises anything but ``Rejected`` is logged and skipped:
a broken plugin never fails a request.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from deepserve.errors import DeepserveError
from deepserve.protocol.http import body_once, error_body

logger = logging.getLogger(__name__)

GROUP = "deepserve.plugins"
HOOKED = ("/v1/chat/completions", "/v1/completions")


class Rejected(Exception):
    """Raised by ``before_request``: refuse the request with 400 ``message``; ``reason``
    is recorded in the ledger."""

    def __init__(self, message: str, reason: str | None = None,
                 code: str = "request_rejected") -> None:
        super().__init__(message)
        self.message, self.reason, self.code = message, reason or message, code
        self.plugin = ""  # set to the refusing plugin's name


@dataclass
class PluginRequest:
    """What a hook sees of a request."""

    path: str
    body: dict[str, Any]
    key_id: str | None
    request_id: str
    front: str  # "server" or "gateway"


@dataclass
class _Loaded:
    name: str
    obj: Any


class Plugins:
    """The loaded plugins of one process, called in load order."""

    def __init__(self, loaded: list[_Loaded], front: str) -> None:
        self.loaded = loaded
        self.front = front
        # Records a refusal (the ledger's write, to wait on); set by ``attach``.
        self.on_reject: Callable[[PluginRequest, str, str], Any] | None = None

    def __bool__(self) -> bool:
        return bool(self.loaded)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.loaded]

    def _each(self, hook: str) -> list[tuple[str, Callable[..., Any]]]:
        return [(p.name, getattr(p.obj, hook)) for p in self.loaded
                if callable(getattr(p.obj, hook, None))]

    def before_request(self, req: PluginRequest) -> dict[str, Any]:
        """The body after every plugin's rewrite; raises Rejected (after recording it)."""
        for name, hook in self._each("before_request"):
            try:
                new = hook(req)
            except Rejected as exc:
                logger.info("plugin %s rejected %s: %s", name, req.request_id, exc.reason)
                exc.plugin = name
                raise
            except Exception:
                logger.exception("plugin %s failed in before_request; skipped", name)
                continue
            if isinstance(new, dict):
                req.body = new
        return req.body

    def after_response(self, req: PluginRequest, status: int,
                       body: dict[str, Any] | None) -> None:
        for name, hook in self._each("after_response"):
            try:
                hook(req, status, body)
            except Exception:
                logger.exception("plugin %s failed in after_response; skipped", name)

    def on_usage(self, record: Any) -> None:
        for name, hook in self._each("on_usage"):
            try:
                hook(record)
            except Exception:
                logger.exception("plugin %s failed in on_usage; skipped", name)


def _instantiate(name: str, target: Any, settings: dict[str, dict[str, Any]]) -> _Loaded:
    if isinstance(target, type) or (callable(target) and not any(
            hasattr(target, h) for h in ("before_request", "after_response", "on_usage"))):
        name = getattr(target, "name", name)
        obj = target(settings.get(name, {}))
    else:
        obj = target
    return _Loaded(str(getattr(obj, "name", name)), obj)


def load_plugins(specs: list[str] | tuple[str, ...] | None, config: str | None,
                 front: str) -> Plugins:
    """Entry-point plugins, then each ``module:attr`` in ``specs``."""
    settings: dict[str, dict[str, Any]] = {}
    if config:
        from deepserve.config import read_toml

        settings = read_toml(config, "plugin config", "plugin_config")
    loaded = []
    for ep in entry_points(group=GROUP):
        try:
            loaded.append(_instantiate(ep.name, ep.load(), settings))
        except Exception as exc:
            raise DeepserveError(f"plugin entry point {ep.name!r} ({ep.value}) failed to "
                                 f"load: {exc}", param="plugin") from exc
    for spec in specs or ():
        module, _, attr = spec.partition(":")
        if not module or not attr:
            raise DeepserveError(f"--plugin {spec!r} is not module:attr (e.g. "
                                 "deepserve.compliance:ComplianceFilter)", param="plugin")
        try:
            target = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise DeepserveError(f"--plugin {spec!r} cannot be loaded: {exc}",
                                 param="plugin") from None
        try:
            loaded.append(_instantiate(attr, target, settings))
        except DeepserveError:
            raise
        except Exception as exc:
            raise DeepserveError(f"--plugin {spec!r} failed to start: {exc}",
                                 param="plugin") from exc
    unknown = sorted(set(settings) - {p.name for p in loaded})
    if config and unknown:  # one file may serve a fleet whose processes load others
        logger.warning("--plugin-config %s has settings for %s, which no loaded plugin "
                       "uses (loaded: %s)", config, unknown,
                       ", ".join(p.name for p in loaded) or "none")
    if loaded:
        logger.info("plugins: %s", ", ".join(p.name for p in loaded))
    return Plugins(loaded, front)


def attach(plugins: Plugins, meter: Any) -> None:
    """Wire plugins to a front door's meter: ``on_usage`` sees every billed record, and
    refusals are written to the meter's ledger (when it has one)."""
    from deepserve.billing.ledger import Refusal

    if meter is None:
        return
    meter.usage_hooks.append(plugins.on_usage)
    if meter.ledger is not None:
        ledger = meter.ledger
        plugins.on_reject = lambda req, name, reason: ledger.record(Refusal(
            req.request_id, time.time(), req.key_id, req.path, req.front, name, reason))


class PluginHooks:
    """ASGI middleware: runs ``before_request`` on generation requests' JSON bodies
    (reject -> 400, rewrite -> the new body goes on), and ``after_response`` once the
    answer is out. Place it inside the key check so the key id is known."""

    def __init__(self, app: Any, plugins: Plugins,
                 key_of: Callable[[dict[str, Any]], str | None] | None = None) -> None:
        self.app, self.plugins, self.key_of = app, plugins, key_of

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or \
                scope["path"] not in HOOKED:
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):  # the route answers malformed bodies itself
            return await self.app(scope, body_once(raw, receive), send)
        key_id = (scope.get("state") or {}).get("key_id")
        if key_id is None and self.key_of is not None:
            key_id = self.key_of(scope)
        req = PluginRequest(scope["path"], body, key_id, f"plugin-{uuid.uuid4().hex}",
                            self.plugins.front)
        try:
            new = self.plugins.before_request(req)
        except Rejected as exc:
            if self.plugins.on_reject is not None:
                written = self.plugins.on_reject(req, exc.plugin, exc.reason)
                if written is not None:  # the refusal is on the books before the 400
                    await asyncio.wrap_future(written)
            data = json.dumps(error_body(400, exc.message, code=exc.code)).encode()
            await send({"type": "http.response.start", "status": 400, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})
            return
        if new is not body:
            raw = json.dumps(new).encode()
            scope = dict(scope, headers=[
                (k, str(len(raw)).encode() if k == b"content-length" else v)
                for k, v in scope.get("headers", [])])
        status = 0
        stream = False
        out: list[bytes] = []

        async def watched(message: dict[str, Any]) -> None:
            nonlocal status, stream
            if message["type"] == "http.response.start":
                status = message["status"]
                heads = dict(message.get("headers") or [])
                stream = heads.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not stream:
                out.append(message.get("body", b""))
            await send(message)

        await self.app(scope, body_once(raw, receive), watched)
        answer = None
        if not stream:
            try:
                answer = json.loads(b"".join(out))
            except (ValueError, UnicodeDecodeError):
                answer = None
        self.plugins.after_response(req, status, answer)
