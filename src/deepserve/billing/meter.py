"""Metering for one server: authorize keys, quote prices at start, bill at the end."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from deepserve.billing.keys import APIKey, KeyStore
from deepserve.billing.ledger import Ledger, UsageRecord
from deepserve.billing.pricing import PricingPolicy, Quote
from deepserve.billing.shared import SharedLimitsError
from deepserve.engine.sequence import RequestOutput

logger = logging.getLogger(__name__)
# One structured line per finished request (with --log-format json, a JSON object).
request_log = logging.getLogger("deepserve.requests")


class BillingError(Exception):
    """A key that may not spend: carries the HTTP status and OpenAI error code."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass(frozen=True)
class Usage:
    """What one request used, as billed."""

    request_id: str
    prompt: int
    hit: int  # prompt tokens served from the prefix cache
    completion: int
    finish_reason: str | None
    first_token_ts: float | None = None
    tier: str | None = None  # None: the meter's own tier

    @property
    def miss(self) -> int:
        return self.prompt - self.hit


@dataclass
class BillingContext:
    """What a request carries from admission to its bill."""

    key_id: str | None
    quote: Quote
    start: float
    reserved_money: float = 0.0  # held against the key's budget until release()
    reserved_tokens: int = 0
    hold_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    who: str | None = None  # whom per-minute token limits count (a server's limiter)
    tenant: str = ""  # whose share of the batch the request runs in (key, else user)
    weight: float = 1.0  # that tenant's weight (the key file's ``weight``)
    # Recorded with the ledger row: endpoint, user, safety_identifier, metadata (JSON),
    # request_options (JSON); see ``request_tags``.
    tags: dict[str, str | None] = field(default_factory=dict)


TAGGED_OPTIONS = ("reasoning_effort", "verbosity", "prompt_cache_key")


def request_tags(endpoint: str, body: dict[str, Any]) -> dict[str, str | None]:
    """What the ledger records of a request besides its tokens, from its JSON body."""
    import json

    options = {k: body[k] for k in TAGGED_OPTIONS if body.get(k) is not None}
    metadata = body.get("metadata")
    return {"endpoint": endpoint,
            "user_id": body["user"] if isinstance(body.get("user"), str) else None,
            "safety_identifier": body["safety_identifier"]
            if isinstance(body.get("safety_identifier"), str) else None,
            "metadata": json.dumps(metadata, ensure_ascii=False) if metadata else None,
            "request_options": json.dumps(options, ensure_ascii=False) if options else None}


class Meter:
    """Pricing, ledger, keys and the revenue counters of one server."""

    def __init__(self, policy: PricingPolicy, ledger: Ledger | None, keys: KeyStore | None,
                 registry: CollectorRegistry, utilization: Callable[[], float],
                 tier: str | None = None, clock: Callable[[], datetime] | None = None) -> None:
        self.policy = policy
        self.ledger = ledger
        self.keys = keys
        self.tier = tier
        self.utilization = utilization
        self.clock = clock or (lambda: datetime.now(UTC))
        self.limiter: Any = None  # a server's RPM/TPM limiter: billed tokens count there
        self.usage_hooks: list[Callable[[UsageRecord], None]] = []  # plugins' on_usage
        self.admin_key: str | None = None  # may also call the API (key id "admin")
        self.key_table: Any = None  # billing/key_table.KeyTable when keys live in the ledger
        self.key_sync: Any = None
        if keys is not None and ledger is not None:
            keys.seed(ledger.key_spend())
        self.tokens = Counter("deepserve_billed_tokens", "Billed tokens by class",
                              ["model", "token_class"], registry=registry)
        self.revenue = Counter("deepserve_revenue",
                               f"Revenue after discounts, in {policy.currency}",
                               ["model", "token_class"], registry=registry)
        self.list_revenue = Counter("deepserve_list_revenue",
                                    f"Revenue at list price, in {policy.currency}",
                                    ["model"], registry=registry)

    def is_admin(self, key: str | None) -> bool:
        from deepserve.protocol.http import same_key

        return bool(self.admin_key) and same_key(key, self.admin_key or "")

    def identify(self, key: str | None) -> APIKey | None:
        """The key a bearer token names (None: the admin key), whatever it has spent;
        BillingError 401 when it is unknown, revoked or expired."""
        if self.keys is None or self.is_admin(key):
            return None
        try:
            k = self.keys.lookup(key or "")
        except SharedLimitsError as exc:
            raise BillingError(503, f"{exc}; retry shortly", "limits_unavailable") from None
        if k is None:
            where = "the service's admin" if self.key_table is not None else \
                "the server's key file"
            raise BillingError(401, "API key missing or not recognised: send 'Authorization: "
                               f"Bearer <key>' with a key from {where}", "invalid_api_key")
        why = k.refusal()
        if why is not None:
            raise BillingError(401, why, "key_revoked" if k.revoked_ts is not None
                               else "key_expired")
        return k

    def check_access(self, key_id: str | None, *names: str | None) -> None:
        """403 when the key may not use the model or tier called ``names``."""
        k = self.keys.get(key_id) if key_id and self.keys is not None else None
        if k is not None and not k.allows(*names):
            wanted = next((n for n in names if n), "?")
            raise BillingError(403, f"API key {k.key_id!r} may not use {wanted!r}; it may "
                               f"use {', '.join(repr(m) for m in k.models or ())}",
                               "model_not_allowed")

    def key_limits(self, key_id: str | None) -> tuple[int | None, int | None]:
        """The key's own requests and tokens per minute (None: the front's)."""
        k = self.keys.get(key_id) if key_id and self.keys is not None else None
        return (k.rpm, k.tpm) if k is not None else (None, None)

    def authorize(self, key: str | None) -> str | None:
        """Map a bearer key to its id, or raise BillingError (401/402/429)."""
        if self.keys is None:
            return None
        if self.is_admin(key):
            return "admin"
        k = self.identify(key)
        assert k is not None
        if k.budget is not None and k.spent >= k.budget:
            raise BillingError(402, f"API key {k.key_id!r} has spent {k.spent:.6f} of its "
                               f"budget of {k.budget} {self.policy.currency}; ask the "
                               "service's admin to raise the budget", "insufficient_quota")
        if k.token_quota is not None and k.tokens >= k.token_quota:
            raise BillingError(429, f"API key {k.key_id!r} has used {k.tokens} of its "
                               f"{k.token_quota}-token quota", "token_quota_exceeded")
        return k.key_id

    def start(self, key_id: str | None, model: str) -> BillingContext:
        return BillingContext(key_id, self.policy.quote(model, self.clock(),
                                                         self.utilization()), time.time())

    def reserve(self, ctx: BillingContext, prompt_tokens: int, max_output_tokens: int) -> None:
        """Hold the request's largest possible cost (every prompt token a cache miss,
        every output token produced) against its key; BillingError (402/429) if the key
        cannot cover it. ``release`` gives the hold back once the real cost is charged."""
        if self.keys is None or ctx.key_id is None:
            return
        q = ctx.quote
        money = q.list_cost(0, prompt_tokens, max_output_tokens) * q.multiplier
        tokens = prompt_tokens + max_output_tokens
        try:
            why = self.keys.reserve(ctx.key_id, money, tokens, ctx.hold_id)
            k = self.keys.get(ctx.key_id) if why else None  # only to say why not
        except SharedLimitsError as exc:
            raise BillingError(503, f"{exc}; retry shortly", "limits_unavailable") from None
        if why is None or k is None:
            ctx.reserved_money, ctx.reserved_tokens = money, tokens
            return
        if why == "budget":
            left = max(0.0, k.budget - k.spent - k.reserved)
            raise BillingError(402, f"API key {k.key_id!r} cannot cover this request: it may "
                               f"cost up to {money:.6f} {self.policy.currency} ({prompt_tokens}"
                               f" prompt + {max_output_tokens} output tokens) and the key has "
                               f"{left:.6f} of its budget of {k.budget} left; lower max_tokens "
                               "or ask the service's admin to raise the budget",
                               "insufficient_quota")
        if why == "quota":
            left = max(0, k.token_quota - k.tokens - k.reserved_tokens)
            raise BillingError(429, f"API key {k.key_id!r} cannot cover this request: it may "
                               f"use up to {tokens} tokens ({prompt_tokens} prompt + "
                               f"{max_output_tokens} output) and {left} of its "
                               f"{k.token_quota}-token quota are left; lower max_tokens",
                               "token_quota_exceeded")

    def release(self, ctx: BillingContext) -> None:
        """Give back the request's hold (after its real cost was charged)."""
        if self.keys is not None and ctx.key_id is not None and (
                ctx.reserved_money or ctx.reserved_tokens):
            try:
                self.keys.release(ctx.key_id, ctx.reserved_money, ctx.reserved_tokens,
                                  ctx.hold_id)
            except SharedLimitsError as exc:  # the hold expires in Redis by itself
                logger.error("could not release hold %s of key %s: %s", ctx.hold_id,
                             ctx.key_id, exc)
            ctx.reserved_money, ctx.reserved_tokens = 0.0, 0

    async def settle(self, ctx: BillingContext, request_id: str, out: RequestOutput,
                     finish_reason: str | None) -> dict[str, Any]:
        """Bill a request and wait (without blocking the event loop) until its ledger
        record is committed, so a response is only sent for a request on the books."""
        cost, committed = self.finish(ctx, request_id, out, finish_reason)
        if committed is not None:
            await asyncio.wrap_future(committed)
        return cost

    def finish(self, ctx: BillingContext, request_id: str, out: RequestOutput,
               finish_reason: str | None) -> tuple[dict[str, Any], Future[bool] | None]:
        """Bill a finished (or aborted) request: the cost fields for `usage`, and the
        ledger write's future (None without a ledger)."""
        return self.bill(ctx, Usage(request_id, out.num_prompt_tokens, out.num_cached_tokens,
                                    out.num_output_tokens, finish_reason,
                                    out.first_token_time))

    def bill(self, ctx: BillingContext, usage: Usage) -> tuple[dict[str, Any],
                                                               Future[bool] | None]:
        """Bill token counts (the gateway bills from its backends' `usage`): price them,
        record them, charge the key, log the request and count the revenue."""
        list_cost = ctx.quote.list_cost(usage.hit, usage.miss, usage.completion)
        cost = list_cost * ctx.quote.multiplier
        committed = self._record(ctx, usage, list_cost, cost)
        if self.keys is not None and ctx.key_id is not None:
            self.keys.charge(ctx.key_id, cost, usage.prompt + usage.completion)
        if self.limiter is not None and ctx.who is not None:
            self.limiter.add_tokens(ctx.who, usage.prompt + usage.completion)
        self._log(ctx, usage, cost)
        self._count(ctx.quote, usage, list_cost)
        return {"cost": round(cost, 10), "currency": ctx.quote.currency,
                "price_multiplier": ctx.quote.multiplier}, committed

    def _record(self, ctx: BillingContext, u: Usage, list_cost: float,
                cost: float) -> Future[bool] | None:
        if self.ledger is None and not self.usage_hooks:
            return None
        q, p = ctx.quote, ctx.quote.list_prices
        rec = UsageRecord(
            request_id=u.request_id, key_id=ctx.key_id, model=q.model,
            tier=u.tier or self.tier, prompt_tokens=u.prompt, cache_hit_tokens=u.hit,
            cache_miss_tokens=u.miss, completion_tokens=u.completion, start_ts=ctx.start,
            first_token_ts=u.first_token_ts, end_ts=time.time(),
            finish_reason=u.finish_reason, price_cache_hit=p.cache_hit_input,
            price_cache_miss=p.cache_miss_input, price_output=p.output,
            multiplier=q.multiplier, rules=",".join(q.rules), currency=q.currency,
            list_cost=list_cost, cost=cost, **ctx.tags)
        for hook in self.usage_hooks:
            hook(rec)
        return self.ledger.record(rec) if self.ledger is not None else None

    def _log(self, ctx: BillingContext, u: Usage, cost: float) -> None:
        request_log.info("request finished", extra={"fields": {
            "event": "request_finished", "request_id": u.request_id, "key_id": ctx.key_id,
            "model": ctx.quote.model, "tier": u.tier or self.tier, "prompt_tokens": u.prompt,
            "cached_tokens": u.hit, "completion_tokens": u.completion,
            "finish_reason": u.finish_reason,
            "ttft_ms": round((u.first_token_ts - ctx.start) * 1000, 1) if u.first_token_ts
            else None, "e2e_ms": round((time.time() - ctx.start) * 1000, 1),
            "cost": round(cost, 10), "currency": ctx.quote.currency}})

    def _count(self, q: Quote, u: Usage, list_cost: float) -> None:
        p = q.list_prices
        for cls, n, price in (("cache_hit", u.hit, p.cache_hit_input),
                              ("cache_miss", u.miss, p.cache_miss_input),
                              ("output", u.completion, p.output)):
            self.tokens.labels(q.model, cls).inc(n)
            self.revenue.labels(q.model, cls).inc(n * price / 1e6 * q.multiplier)
        self.list_revenue.labels(q.model).inc(list_cost)


def build_meter(registry: CollectorRegistry, utilization: Callable[[], float], *,
                pricing: str | None = None, api_keys: str | None = None,
                ledger: Ledger | None = None, tier: str | None = None,
                pricing_clock: str | None = None, redis: str | None = None,
                admin_key: str | None = None) -> Meter:
    """A meter from the settings files every front door takes: the pricing TOML (None:
    DeepSeek-R1 list prices), the key file, a ledger the caller opened, an optional
    fixed ISO time to price at (simulations and tests), an optional Redis URL that
    makes the keys' budgets and quotas shared by every replica, and the admin key.

    With a ledger and a key file or an admin key, the keys live in the ledger's
    database (``billing/key_table``): the file seeds it, the admin API changes it, and
    every process sharing it follows within ``key_table.SYNC_S``."""
    from deepserve.errors import DeepserveError

    policy = PricingPolicy.load(pricing) if pricing else PricingPolicy()
    keys = KeyStore.load(api_keys) if api_keys else None
    table = None
    if ledger is not None and (api_keys or admin_key):
        from deepserve.billing.key_table import KeyTable

        table = KeyTable(ledger.url)
        if keys is not None:
            table.seed(keys.all(), f"key file {api_keys}")
        keys = KeyStore(table.load())
    if keys is not None and redis:
        from deepserve.billing.shared import SharedKeyStore

        keys = SharedKeyStore.from_store(keys, redis)
    clock = None
    if pricing_clock:
        try:
            fixed = datetime.fromisoformat(pricing_clock.replace("Z", "+00:00"))
        except ValueError:
            raise DeepserveError(f"pricing_clock={pricing_clock!r} is not an ISO time like "
                                 "2026-01-01T17:00:00Z", param="pricing_clock") from None
        clock = lambda: fixed  # noqa: E731
    meter = Meter(policy, ledger, keys if table is None else None, registry, utilization,
                  tier, clock)
    meter.admin_key = admin_key
    if table is not None:  # spend comes from the table itself, not the ledger's rows
        from deepserve.billing.key_table import KeySync

        meter.keys, meter.key_table = keys, table
        keys.seed({k.key_id: (k.spent, k.tokens) for k in keys.all()})
        meter.key_sync = KeySync(table, keys)
    return meter
