"""Backends of a tier: health, load, latency estimates, and the choice of replica.

Cache-aware balancing sends requests whose prompts share a prefix to the same replica
(rendezvous hashing on the prefix, over healthy replicas), so that replica's prefix
cache serves them; when that replica is busier than the least loaded one by more than
``slack`` requests, the least loaded one is used instead.

Discovery: a backend URL whose host is a DNS name (a Kubernetes headless Service, say)
stands for every address the name resolves to. The pool resolves it at start and again
every ``resolve_interval_s``, adds a replica for each new address (health-checked before
it gets traffic), and drops the ones the name no longer lists. IP addresses and
``localhost`` are used as given, and ``discovery = "off"`` uses every URL as given.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import itertools
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

PREFIX_CHARS = 512  # prompt characters that name a prefix for affinity


@dataclass
class Backend:
    """One replica: its URL, health and what the gateway knows of its load and speed."""

    url: str
    healthy: bool = True
    outstanding: int = 0
    failures: int = 0
    ejected_until: float = 0.0
    model: str | None = None  # the name the backend serves (from its /v1/models)
    ttft_s: float | None = None  # recent mean, from the backend's own /metrics
    tpot_s: float | None = None
    utilization: float | None = None  # its deepserve_pricing_utilization (0-1)
    _hist: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.healthy and time.monotonic() >= self.ejected_until

    def note_failure(self) -> None:
        # Ejected at the first failure; the health checker brings it back when /health
        # answers again.
        self.failures += 1
        self.healthy = False
        self.ejected_until = time.monotonic() + 1.0

    def note_success(self) -> None:
        self.failures = 0

    def update_latency(self, metrics_text: str) -> None:
        """Mean TTFT/TPOT over the interval since the last scrape (sum and count deltas)."""
        sums: dict[str, float] = {}
        for fam in text_string_to_metric_families(metrics_text):
            if fam.name == "deepserve_pricing_utilization" and fam.samples:
                self.utilization = max(s.value for s in fam.samples)
                continue
            if fam.name not in ("deepserve_time_to_first_token_seconds",
                                "deepserve_time_per_output_token_seconds"):
                continue
            for s in fam.samples:
                if s.name.endswith("_sum") or s.name.endswith("_count"):
                    sums[s.name] = sums.get(s.name, 0.0) + s.value
        for base, attr in (("deepserve_time_to_first_token_seconds", "ttft_s"),
                           ("deepserve_time_per_output_token_seconds", "tpot_s")):
            total, count = sums.get(base + "_sum"), sums.get(base + "_count")
            if total is None or count is None:
                continue
            prev_total, prev_count = self._hist.get(base, (0.0, 0.0))
            if count > prev_count:
                setattr(self, attr, (total - prev_total) / (count - prev_count))
            self._hist[base] = (total, count)


def discoverable(url: str) -> bool:
    """True when the URL's host is a DNS name that may stand for many replicas."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return False
    try:
        ipaddress.ip_address(host)
        return False
    except ValueError:
        return True


def with_address(url: str, address: str) -> str:
    """``url`` with its host replaced by ``address`` (an IPv4 or IPv6 address)."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")


async def resolve(url: str) -> list[str]:
    """The replica URLs a DNS-named backend stands for, one per address, in order."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    infos = await asyncio.get_running_loop().getaddrinfo(
        parts.hostname, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(with_address(url, str(info[4][0])) for info in infos))


class TierPool:
    """The replicas of one tier and the balancing policy across them."""

    def __init__(self, name: str, urls: tuple[str, ...], balancing: str, slack: int,
                 discovery: bool = True) -> None:
        self.name = name
        self.sources = urls
        self.named = [u for u in urls if discovery and discoverable(u)]
        # Named backends join once resolved (``discover``); the rest are fixed.
        self.backends = [Backend(u) for u in urls if u not in self.named]
        self.balancing = balancing
        self.slack = slack
        self._rr = itertools.count()
        self._resolved: dict[str, list[str]] = {}

    async def discover(self) -> bool:
        """Re-resolve the DNS-named backends; True when the set of replicas changed."""
        if not self.named:
            return False
        fixed = [u for u in self.sources if u not in self.named]
        for source in self.named:
            try:
                self._resolved[source] = await resolve(source)
            except OSError as exc:
                # Keep the last known replicas until the name resolves again.
                logger.warning("tier %s: cannot resolve %s (%s); keeping %d known replicas",
                               self.name, source, exc, len(self._resolved.get(source, [])))
        wanted = list(dict.fromkeys(fixed + [u for s in self.named
                                             for u in self._resolved.get(s, [])]))
        have = {b.url: b for b in self.backends}
        if list(have) == wanted:
            return False
        added = [u for u in wanted if u not in have]
        gone = [u for u in have if u not in wanted]
        # New replicas wait for their first health check before they get traffic.
        self.backends = [have.get(u) or Backend(u, healthy=False) for u in wanted]
        if added or gone:
            logger.info("tier %s: replicas %s (added %s, removed %s)", self.name,
                        ", ".join(wanted) or "none", ", ".join(added) or "none",
                        ", ".join(gone) or "none")
        return True

    def candidates(self, prefix_key: str) -> list[Backend]:
        """Replicas in the order to try them (first choice first)."""
        live = [b for b in self.backends if b.available] or \
            [b for b in self.backends if b.healthy] or list(self.backends)
        if not live:
            return []
        if self.balancing == "round_robin":
            start = next(self._rr) % len(live)
            return live[start:] + live[:start]
        by_load = sorted(live, key=lambda b: b.outstanding)
        if self.balancing == "least_loaded" or not prefix_key:
            return by_load
        ranked = sorted(live, key=lambda b: _score(prefix_key, b.url), reverse=True)
        affine = ranked[0]
        if affine.outstanding > by_load[0].outstanding + self.slack:
            return by_load
        return [affine] + [b for b in by_load if b is not affine]

    def utilization(self) -> float | None:
        """Mean utilization its available replicas report (None: none reported yet)."""
        seen = [b.utilization for b in self.backends if b.available and
                b.utilization is not None]
        return sum(seen) / len(seen) if seen else None

    def latency(self) -> tuple[float | None, float | None]:
        """Best recent TTFT and TPOT among available replicas."""
        live = [b for b in self.backends if b.available]
        ttfts = [b.ttft_s for b in live if b.ttft_s is not None]
        tpots = [b.tpot_s for b in live if b.tpot_s is not None]
        return (min(ttfts) if ttfts else None, min(tpots) if tpots else None)

    async def check(self, client: httpx.AsyncClient) -> None:
        """Probe /health (and scrape /metrics for latency) of every replica."""
        for b in list(self.backends):
            try:
                r = await client.get(f"{b.url}/health", timeout=2.0)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok and not b.healthy:
                logger.info("backend %s is healthy again", b.url)
            if not ok and b.healthy:
                logger.warning("backend %s failed its health check; ejected", b.url)
            b.healthy = ok
            if ok:
                b.failures = 0
                b.ejected_until = 0.0
                if b.model is None:
                    try:
                        r = await client.get(f"{b.url}/v1/models", timeout=2.0)
                        b.model = r.json()["data"][0]["id"]
                    except (httpx.HTTPError, KeyError, IndexError, ValueError):
                        pass
                try:
                    m = await client.get(f"{b.url}/metrics", timeout=2.0)
                    if m.status_code == 200:
                        b.update_latency(m.text)
                except httpx.HTTPError:
                    pass


def _score(key: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{url}".encode(), digest_size=8).digest(),
                          "big")


def prefix_key(body: dict) -> str:
    """The text that decides prefix affinity: the start of the prompt or conversation;
    a ``prompt_cache_key`` decides it alone (requests sharing one go to one replica)."""
    if isinstance(body.get("prompt_cache_key"), str) and body["prompt_cache_key"]:
        return "prompt_cache_key:" + body["prompt_cache_key"]
    if "input" in body and "messages" not in body and "prompt" not in body:
        text = str(body.get("instructions") or "") + json.dumps(body["input"])[:PREFIX_CHARS]
        return text[:PREFIX_CHARS]
    if "messages" in body and isinstance(body["messages"], list):
        text = "".join(str(m.get("content", "")) for m in body["messages"]
                       if isinstance(m, dict))
    else:
        p = body.get("prompt", "")
        text = p if isinstance(p, str) else str(p)[:PREFIX_CHARS * 4]
    return text[:PREFIX_CHARS]
