"""The gateway's shared state: tier pools, router, limits, metrics, meter, and the one
way to reach a backend (``open``: retries and failover before the first byte)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from deepserve.billing.meter import Meter, build_meter
from deepserve.billing.ratelimit import make_limiter
from deepserve.gateway.config import GatewayConfig
from deepserve.gateway.pool import Backend, TierPool, prefix_key
from deepserve.gateway.router import Router

logger = logging.getLogger("deepserve.gateway.app")


class NoBackend(Exception):
    """Every replica of a tier failed before sending a byte."""


class BackendCollector:
    """Per-replica gauges, read at each scrape (replicas come and go with discovery)."""

    def __init__(self, pools: dict[str, TierPool]) -> None:
        self.pools = pools

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("deepserve_gateway_backend_up",
                               "1 when a backend is in rotation", labels=["tier", "backend"])
        out = GaugeMetricFamily("deepserve_gateway_backend_outstanding",
                                "Requests in flight per backend", labels=["tier", "backend"])
        for name, pool in self.pools.items():
            for b in pool.backends:
                up.add_metric([name, b.url], float(b.available))
                out.add_metric([name, b.url], float(b.outstanding))
        yield up
        yield out


RETRY_STATUSES = (502, 503, 504)  # a backend that cannot take the request now


class Gateway:
    """Shared state of the gateway process."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.pools = {t.name: TierPool(t.name, t.backends, cfg.balancing, cfg.affinity_slack,
                                       cfg.discovery == "dns")
                      for t in cfg.tiers}
        self.router = Router(cfg, self.pools)
        self.limiter = make_limiter(cfg.rate_limit_rpm, cfg.rate_limit_tpm, cfg.redis)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=2.0),
                                        limits=httpx.Limits(max_connections=1000,
                                                            max_keepalive_connections=200))
        self.registry = r = CollectorRegistry()
        self.requests = Counter("deepserve_gateway_requests", "Requests answered by a backend",
                                ["tier", "backend", "status"], registry=r)
        self.errors = Counter("deepserve_gateway_errors", "Requests answered with an error",
                              ["tier", "status"], registry=r)
        self.retries = Counter("deepserve_gateway_retries",
                               "Attempts moved to another replica", ["tier"], registry=r)
        self.escalations = Counter("deepserve_gateway_escalations",
                                   "Cascade escalations", ["from_tier", "to_tier", "reason"],
                                   registry=r)
        self.latency = Histogram("deepserve_gateway_request_latency_seconds",
                                 "End-to-end latency through the gateway", ["tier"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
                                 registry=r)
        r.register(BackendCollector(self.pools))
        self.meter = self._meter(cfg)
        self._health_task: asyncio.Task | None = None

    def _meter(self, cfg: GatewayConfig) -> Meter | None:
        if not (cfg.api_keys or cfg.ledger or cfg.pricing or cfg.admin_key):
            return None
        from deepserve.billing.ledger import Ledger

        ledger = Ledger(cfg.ledger, "gateway", "gateway", accelerators=0) if cfg.ledger \
            else None
        return build_meter(self.registry, self.utilization, pricing=cfg.pricing,
                           api_keys=cfg.api_keys, ledger=ledger, redis=cfg.redis,
                           admin_key=cfg.admin_key)

    def key_limits(self, key_id: str | None) -> dict[str, int | None]:
        """The key's own requests and tokens per minute (None: the gateway's)."""
        rpm, tpm = self.meter.key_limits(key_id) if self.meter is not None else (None, None)
        return {"rpm": rpm, "tpm": tpm}

    def check_access(self, key_id: str | None, tiers: list[str], body: dict) -> None:
        """BillingError 403 when the key may not use a tier the request would run on."""
        if self.meter is not None:
            for tier in tiers:
                self.meter.check_access(key_id, tier, str(body.get("model") or ""))

    def live_stats(self) -> dict[str, Any]:
        """The console's live view: each tier's replicas, their load and speed."""
        return {"front": "gateway", "utilization": self.utilization(), "tiers": {
            name: [{"url": b.url, "up": b.available, "outstanding": b.outstanding,
                    "utilization": b.utilization, "ttft_s": b.ttft_s, "tpot_s": b.tpot_s}
                   for b in pool.backends] for name, pool in self.pools.items()}}

    def utilization(self, tier: str | None = None) -> float:
        """The utilization pricing reads: what the tier's replicas report on /metrics
        (deepserve_pricing_utilization, mean over available replicas); every tier's when
        no tier is named; 0.5 until a replica has reported."""
        pools = [self.pools[tier]] if tier in self.pools else list(self.pools.values())
        seen = [u for p in pools if (u := p.utilization()) is not None]
        return sum(seen) / len(seen) if seen else 0.5

    async def refresh(self) -> None:
        """Re-resolve DNS-named backends, then health-check every replica."""
        await asyncio.gather(*(p.discover() for p in self.pools.values()))
        await asyncio.gather(*(p.check(self.client) for p in self.pools.values()))

    async def health_loop(self) -> None:
        last_resolve = time.monotonic()
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)
            if time.monotonic() - last_resolve >= self.cfg.resolve_interval_s:
                last_resolve = time.monotonic()
                await asyncio.gather(*(p.discover() for p in self.pools.values()))
            await asyncio.gather(*(p.check(self.client) for p in self.pools.values()))

    # -- forwarding ---------------------------------------------------------------------------
    async def open(self, tier: str, path: str, body: dict[str, Any],
                   headers: dict[str, str], method: str = "POST"
                   ) -> tuple[httpx.Response, Backend]:
        """Send to the tier's best replica; on a connect error or 5xx before any byte,
        try the next one. Returns the open (streaming) response and its backend."""
        pool = self.pools[tier]
        order = pool.candidates(prefix_key(body))
        if not order:
            raise NoBackend(f"tier {tier!r} has no replica (its backends "
                            f"{', '.join(pool.sources)} resolve to no address yet)")
        last_error = "no replica"
        for attempt in range(max(1, self.cfg.max_attempts)):
            backend = order[attempt % len(order)]
            if attempt:
                self.retries.labels(tier).inc()
            # Public names are the gateway's; each backend gets the name it serves.
            sent = dict(body)
            if backend.model:
                sent["model"] = backend.model
            else:
                sent.pop("model", None)
            req = self.client.build_request(method, backend.url + path,
                                            json=sent if method == "POST" else None,
                                            headers=headers)
            backend.outstanding += 1
            try:
                resp = await self.client.send(req, stream=True)
            except asyncio.CancelledError:  # the client left: the connection is dropped
                backend.outstanding -= 1
                raise
            except httpx.TransportError as exc:
                backend.outstanding -= 1
                backend.note_failure()
                last_error = f"{backend.url}: {type(exc).__name__}"
                logger.warning("tier %s: %s failed (%s); trying another replica", tier,
                               backend.url, type(exc).__name__)
                continue
            if resp.status_code in RETRY_STATUSES:
                # Unavailable now (draining, overloaded): another replica may answer. Not
                # an ejection: connection errors, timeouts and health checks decide that.
                await resp.aclose()
                backend.outstanding -= 1
                last_error = f"{backend.url}: HTTP {resp.status_code}"
                continue
            # Any other answer, a 4xx or a 500 that one request caused included, goes back
            # to the client as it is: the replica is not at fault, and retrying the same
            # request elsewhere would only fail again.
            backend.note_success()
            return resp, backend
        raise NoBackend(f"tier {tier!r}: every replica failed ({last_error})")

    def release(self, backend: Backend) -> None:
        backend.outstanding -= 1


