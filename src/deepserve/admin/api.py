"""The admin API (``/admin/...``, the admin key only), the tenant usage API
(``GET /v1/usage``, any key: its own usage) and the web console's files (``/console``),
mounted on ``deepserve serve`` and ``deepserve gateway`` alike. Torch-free.

Keys live in the ledger's database (``billing/key_table``); every change is written to
the ``audit`` table and reaches every process sharing the database within
``key_table.SYNC_S``. Database work runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from deepserve.billing.key_table import FIELDS, KeyTable, key_view
from deepserve.billing.meter import BillingError, Meter
from deepserve.billing.usage import daily, spend_by
from deepserve.errors import DeepserveError
from deepserve.protocol.http import bearer_of, same_key
from deepserve.protocol.models import ErrorResponse

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
# Documented in the OpenAPI schema for every admin and usage route.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what} for code, what in (
        (400, "Invalid field or parameter (the message names it)"),
        (401, "Missing, unknown, revoked or expired key"),
        (403, "A tenant key on an admin route"),
        (404, "No such key, no ledger, or the admin API is off (--admin-key)"),
        (409, "A key with that id exists"),
        (503, "Shared limits (Redis) unreachable"))}


class KeyFields(BaseModel):
    """What an admin sets on a key; a field sent as null clears it (no limit)."""

    model_config = ConfigDict(extra="forbid", strict=False)
    team: str | None = Field(None, max_length=128, description="whose spend it counts in")
    budget: float | None = Field(None, ge=0, allow_inf_nan=False,
                                 description="in the pricing currency; over it: 402")
    token_quota: int | None = Field(None, ge=0, description="prompt + completion tokens")
    rpm: int | None = Field(None, ge=0, description="requests per minute (0: none)")
    tpm: int | None = Field(None, ge=0, description="tokens per minute (0: none)")
    models: list[str] | None = Field(None, description="models or tiers it may use "
                                                       "(null: all)")
    weight: float | None = Field(None, gt=0, allow_inf_nan=False,
                                 description="its share of the batch (default 1)")
    expires_at: datetime | None = Field(None, description="ISO time; from then on: 401")


class KeyCreate(KeyFields):
    id: str | None = Field(None, description="shown in reports (default: generated)")


def _fields(body: KeyFields) -> dict[str, Any]:
    """The fields the admin sent, as the key table's columns."""
    out: dict[str, Any] = {}
    for name in body.model_fields_set - {"id"}:
        value = getattr(body, name)
        if name == "expires_at":
            if value is not None and value.tzinfo is None:
                from datetime import UTC

                value = value.replace(tzinfo=UTC)
            out["expires_ts"] = value.timestamp() if value is not None else None
        elif name == "weight" and value is None:
            out["weight"] = 1.0
        else:
            out[name] = value
    assert set(out) <= set(FIELDS)
    return out


class TCOBody(BaseModel):
    """The TCO comparison's inputs, as the sections of a TCO file (billing/tco.py)."""

    model_config = ConfigDict(extra="forbid")
    capacity: dict[str, float]
    cloud: dict[str, float]
    on_prem: dict[str, float]
    report: dict[str, list[int]] = Field(default_factory=dict)
    currency: str = "USD"
    since: str | None = None
    until: str | None = None
    gpu_hour_cost: float = 2.0


@dataclass
class AdminContext:
    """What the routes need from the front door they are mounted on."""

    meter: Meter | None
    front: str  # "server" or "gateway", recorded with each audit entry
    stats: Callable[[], dict[str, Any]]  # live load, for the console
    single_key: str | None = None  # a server's --api-key (one key, no key store)
    _reader: KeyTable | None = field(default=None, init=False, repr=False)

    @property
    def ledger_url(self) -> str | None:
        ledger = self.meter.ledger if self.meter is not None else None
        return ledger.url if ledger is not None else None

    def table(self) -> KeyTable:
        """The key table (also the connection usage is read through)."""
        if self.meter is not None and self.meter.key_table is not None:
            return self.meter.key_table
        if self.ledger_url is None:
            raise DeepserveError("this needs a ledger: start with --ledger PATH (a SQLite "
                                 "file or a postgresql:// URL)", status=404, code="no_ledger")
        if self._reader is None:  # a ledger without a key table: a connection to read
            self._reader = KeyTable(self.ledger_url)
        return self._reader

    def keys_table(self) -> KeyTable:
        if self.meter is None or self.meter.key_table is None:
            raise DeepserveError("API keys are managed in the ledger's database: start with "
                                 "--ledger and --admin-key (and optionally --api-keys to "
                                 "seed it)", status=404, code="no_key_table")
        return self.meter.key_table

    def currency(self) -> str | None:
        return self.meter.policy.currency if self.meter is not None else None


def _admin_off() -> DeepserveError:
    return DeepserveError("the admin API is off: start with --admin-key (or set "
                          "DEEPSERVE_ADMIN_KEY)", status=404, code="admin_off")


def admin_router(ctx: AdminContext) -> APIRouter:
    meter = ctx.meter

    def require_admin(request: Request) -> str:
        if meter is None or not meter.admin_key:
            raise _admin_off()
        key = bearer_of(request.headers.get("authorization"))
        if meter.is_admin(key):
            return f"admin@{request.client.host if request.client else '-'}"
        tenant = meter.keys is not None and key and meter.keys.lookup(key) is not None
        if tenant:
            raise DeepserveError("this is a tenant key: /admin needs the admin key; a "
                                 "tenant reads its own usage at GET /v1/usage", status=403,
                                 code="not_admin")
        raise DeepserveError("admin key missing or wrong: send 'Authorization: Bearer "
                             "<admin key>' with the key the server was started with "
                             "(--admin-key)", status=401, code="invalid_api_key")

    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                       responses=ERRORS)

    async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def synced(result: Any) -> Any:
        if meter is not None and meter.key_sync is not None:
            await off_loop(meter.key_sync.now)  # this process sees its change at once
        return result

    @router.get("/whoami")
    async def whoami(actor: str = Depends(require_admin)) -> dict[str, Any]:
        """Who this key is (the console asks to show its admin pages)."""
        return {"role": "admin", "actor": actor, "front": ctx.front,
                "keys": meter is not None and meter.key_table is not None,
                "ledger": ctx.ledger_url is not None, "currency": ctx.currency()}

    @router.get("/keys")
    async def list_keys() -> dict[str, Any]:
        keys = await off_loop(ctx.keys_table().load)
        keys.sort(key=lambda k: k.created_ts or 0)
        return {"object": "list", "data": [key_view(k, ctx.currency()) for k in keys]}

    @router.post("/keys", status_code=201)
    async def create_key(body: KeyCreate, actor: str = Depends(require_admin)
                         ) -> dict[str, Any]:
        """Create a key: its secret is in ``key``, shown this once."""
        k, secret = await off_loop(ctx.keys_table().create, _fields(body), body.id, actor,
                                   ctx.front)
        return await synced(key_view(k, ctx.currency()) | {"key": secret})

    @router.get("/keys/{key_id}")
    async def get_key(key_id: str) -> dict[str, Any]:
        k = await off_loop(ctx.keys_table().get, key_id)
        if k is None:
            raise DeepserveError(f"no API key with id {key_id!r} (see GET /admin/keys)",
                                 status=404, param="key_id", code="key_not_found")
        return key_view(k, ctx.currency())

    @router.patch("/keys/{key_id}")
    async def update_key(key_id: str, body: KeyFields, actor: str = Depends(require_admin)
                         ) -> dict[str, Any]:
        """Change a key's limits; a field sent as null clears it."""
        k = await off_loop(ctx.keys_table().update, key_id, _fields(body), actor, ctx.front)
        return await synced(key_view(k, ctx.currency()))

    @router.post("/keys/{key_id}/rotate")
    async def rotate_key(key_id: str, actor: str = Depends(require_admin)) -> dict[str, Any]:
        """A new secret for the key (in ``key``, shown once); the old one stops working."""
        k, secret = await off_loop(ctx.keys_table().rotate, key_id, actor, ctx.front)
        return await synced(key_view(k, ctx.currency()) | {"key": secret})

    @router.post("/keys/{key_id}/revoke")
    async def revoke_key(key_id: str, actor: str = Depends(require_admin)) -> dict[str, Any]:
        """Revoke a key: from now on it gets 401 (its usage stays on the books)."""
        k = await off_loop(ctx.keys_table().revoke, key_id, actor, ctx.front)
        return await synced(key_view(k, ctx.currency()))

    @router.delete("/keys/{key_id}")
    async def delete_key(key_id: str, actor: str = Depends(require_admin)) -> dict[str, Any]:
        """The same as revoke: a key's row stays, for its usage and the audit."""
        return await revoke_key(key_id, actor)

    @router.get("/spend")
    async def spend(group_by: Literal["key", "team"] = "key",
                    days: int = Query(30, ge=1, le=366)) -> dict[str, Any]:
        """Daily spend per key or per team over the last ``days`` UTC days."""
        series = await off_loop(lambda: ctx.table().run(
            lambda db: spend_by(db, group_by, days)))
        return {"object": "spend", "group_by": group_by, "days": days,
                "currency": ctx.currency(), "series": series}

    @router.get("/report")
    async def report(since: str | None = None, until: str | None = None,
                     by: Literal["model", "key", "tier", "hour"] | None = None,
                     gpu_hour_cost: float = Query(2.0, ge=0)) -> dict[str, Any]:
        """The cost and margin report (``deepserve report`` as JSON)."""
        from deepserve.billing.report import build_report

        url = ctx.table().url
        try:
            return await off_loop(build_report, url, since, until, by, gpu_hour_cost)
        except ValueError as exc:
            raise DeepserveError(str(exc), param="since") from None

    @router.post("/tco")
    async def tco(body: TCOBody) -> dict[str, Any]:
        """The total cost of ownership for the ledger's traffic: cloud against owned."""
        from deepserve.billing import tco as tco_mod
        from deepserve.billing.report import build_report

        inputs = tco_mod.TCOInputs.from_dict(body.model_dump(), "request body")
        url = ctx.table().url
        rep = await off_loop(build_report, url, body.since, body.until, None,
                             body.gpu_hour_cost)
        return {"report": rep, "tco": tco_mod.build_tco(rep, inputs)}

    @router.get("/audit")
    async def audit(limit: int = Query(200, ge=1, le=5000),
                    key_id: str | None = None) -> dict[str, Any]:
        """The admin actions, newest first."""
        rows = await off_loop(ctx.keys_table().audit_log, limit, key_id)
        return {"object": "list", "data": rows}

    @router.get("/stats")
    async def stats() -> dict[str, Any]:
        """Live load of this front door (the console polls it)."""
        return ctx.stats()

    return router


def usage_router(ctx: AdminContext) -> APIRouter:
    router = APIRouter(tags=["usage"], responses=ERRORS)

    @router.get("/v1/usage")
    async def usage(request: Request, days: int = Query(30, ge=1, le=366)) -> JSONResponse:
        """The calling key's own usage: daily requests, input tokens (cache hit / miss),
        output tokens and cost, and what is left of its budget and quota. The admin key
        sees every key's together; without keys, the requests made without one."""
        meter = ctx.meter
        key = bearer_of(request.headers.get("authorization"))
        try:
            k = meter.identify(key) if meter is not None else None
        except BillingError as exc:
            raise DeepserveError(exc.message, status=exc.status, code=exc.code) from None
        if ctx.single_key and (meter is None or meter.keys is None) and \
                not same_key(key, ctx.single_key) and not (meter and meter.is_admin(key)):
            raise DeepserveError("API key missing or wrong: send 'Authorization: Bearer "
                                 "<key>' with the key the server was started with",
                                 status=401, code="invalid_api_key")
        admin = meter is not None and meter.is_admin(key)
        key_id = k.key_id if k is not None else None
        if k is not None and meter is not None and meter.key_table is not None:
            k = await asyncio.to_thread(meter.key_table.get, k.key_id) or k  # spend now
        buckets = await asyncio.to_thread(lambda: ctx.table().run(
            lambda db: daily(db, key_id, days, every_key=admin)))
        body: dict[str, Any] = {"object": "usage", "key_id": key_id, "days": days,
                                "currency": ctx.currency(), "daily": buckets,
                                "total_cost": round(sum(b["cost"] for b in buckets), 10)}
        if k is not None:
            body |= {k2: v for k2, v in key_view(k, ctx.currency()).items()
                     if k2 in ("team", "budget", "spent", "remaining_budget", "token_quota",
                               "tokens_used", "rpm", "tpm", "models", "expires_at")}
            body["remaining_tokens"] = None if k.token_quota is None else \
                max(0, k.token_quota - k.tokens)
        return JSONResponse(body)

    return router


def mount_console(app: FastAPI) -> None:
    """The web console's static files at /console (no build step: plain HTML and JS)."""
    from starlette.responses import RedirectResponse
    from starlette.staticfiles import StaticFiles

    @app.get("/console", include_in_schema=False)
    async def console_root() -> RedirectResponse:
        return RedirectResponse("/console/")

    app.mount("/console/", StaticFiles(directory=CONSOLE_DIR, html=True), name="console")


# Paths that check keys themselves (or need none): the KeyCheck middleware lets them by.
SELF_CHECKED = ("/admin/", "/console", "/v1/usage")


def add_admin(app: FastAPI, ctx: AdminContext) -> None:
    app.include_router(admin_router(ctx))
    app.include_router(usage_router(ctx))
    mount_console(app)
