"""Plugins the tests load into real server and gateway processes (by entry point and by
--plugin module:attr)."""

from __future__ import annotations

import json
from typing import Any


class AuditLog:
    """Appends one JSON line per response and per billed record to ``path``."""

    name = "audit"

    def __init__(self, settings: dict[str, Any]) -> None:
        self.path = settings["path"]

    def _write(self, **fields: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(fields) + "\n")

    def after_response(self, req: Any, status: int, body: dict | None) -> None:
        self._write(event="response", front=req.front, path=req.path, key_id=req.key_id,
                    status=status, id=(body or {}).get("id"))

    def on_usage(self, record: Any) -> None:
        self._write(event="usage", request_id=record.request_id,
                    completion_tokens=record.completion_tokens)


class CapTokens:
    """Rewrites every request to at most ``max_tokens`` output tokens."""

    name = "cap"

    def __init__(self, settings: dict[str, Any]) -> None:
        self.cap = int(settings.get("max_tokens", 3))

    def before_request(self, req: Any) -> dict:
        body = dict(req.body)
        body["max_tokens"] = min(int(body.get("max_tokens") or self.cap), self.cap)
        body.pop("max_completion_tokens", None)
        return body


class Broken:
    """Fails in every hook: the server must log it and go on."""

    name = "broken"

    def __init__(self, settings: dict[str, Any]) -> None:
        pass

    def before_request(self, req: Any) -> None:
        raise RuntimeError("this plugin is broken on purpose")

    def on_usage(self, record: Any) -> None:
        raise RuntimeError("this plugin is broken on purpose")


class Explode(BaseException):
    """Not an Exception: no handler in the app catches it, so the server answers 500."""


class FailOn:
    """A fault one request causes: the server answers 500 to a request whose ``user`` is
    "explode" (a gateway must not hold that against the replica)."""

    name = "fail_on"

    def __init__(self, settings: dict[str, Any]) -> None:
        pass

    def before_request(self, req: Any) -> None:
        if req.body.get("user") == "explode":
            raise Explode("this request breaks the server on purpose")
