"""Limits shared by every server and gateway replica through one Redis (``--redis URL``):
per-key budgets and token quotas (spend, and the holds of requests in flight) and the
gateway's requests- and tokens-per-minute windows. Each check-and-take is one Lua
script, so it is atomic across any number of processes; times come from Redis's own
clock, so replicas whose clocks differ still share one window.

Keys (prefix ``deepserve:``):

- ``key:{id}``        hash: ``spent`` (money), ``tokens`` (prompt + completion)
- ``holds:{id}``      hash: hold id -> "money tokens expiry" for requests in flight
- ``rpm:{who}``       sorted set of request times in the last minute
- ``tpm:{who}``       sorted set of "uid:tokens" entries at their times

(``who`` is a hash of the key id, key or client address: no key is stored in Redis.)

A hold whose process died is dropped after ``HOLD_TTL_S``, so a crash never locks a key.
Spend is seeded once from the ledger (``HSETNX``); after that Redis holds the running
totals and the ledger the rows behind them.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from typing import Any

from deepserve.billing.keys import APIKey, KeyStore
from deepserve.errors import DeepserveError

logger = logging.getLogger(__name__)

HOLD_TTL_S = 1800
PREFIX = "deepserve:"

# Sums the live holds of KEYS[2] (and drops the expired ones) at Redis's time ``now``.
_HELD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local held_money, held_tokens = 0, 0
local holds = redis.call('HGETALL', KEYS[2])
for i = 1, #holds, 2 do
  local m, n, exp = string.match(holds[i + 1], '(%S+) (%S+) (%S+)')
  if tonumber(exp) < now then
    redis.call('HDEL', KEYS[2], holds[i])
  else
    held_money = held_money + tonumber(m)
    held_tokens = held_tokens + tonumber(n)
  end
end
"""

# KEYS: key hash, holds hash. ARGV: budget (-1: none), quota (-1: none), money, tokens,
# hold id, ttl. Returns "ok", "budget" or "quota".
_RESERVE = _HELD + """
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local used = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0')
local budget, quota = tonumber(ARGV[1]), tonumber(ARGV[2])
local money, tokens = tonumber(ARGV[3]), tonumber(ARGV[4])
if budget >= 0 and spent + held_money + money > budget + 1e-12 then return 'budget' end
if quota >= 0 and used + held_tokens + tokens > quota then return 'quota' end
redis.call('HSET', KEYS[2], ARGV[5], ARGV[3] .. ' ' .. ARGV[4] .. ' ' ..
           string.format('%.3f', now + tonumber(ARGV[6])))
return 'ok'
"""

# KEYS: key hash, holds hash. Returns {spent, tokens, held money, held tokens} as strings.
_STATE = _HELD + """
return {redis.call('HGET', KEYS[1], 'spent') or '0', redis.call('HGET', KEYS[1], 'tokens')
        or '0', tostring(held_money), tostring(held_tokens)}
"""

# KEYS: requests zset, tokens zset. ARGV: rpm, tpm, window, member.
# Returns {} when allowed (and counted), else {which, seconds to wait}.
_CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local window = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
if rpm > 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {'requests', tostring(tonumber(first[2]) + window - now)}
end
if tpm > 0 then
  local items = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local sum = 0
  for i = 1, #items, 2 do sum = sum + tonumber(string.match(items[i], ':(%d+)$')) end
  if sum >= tpm then
    return {'tokens', tostring(tonumber(items[2]) + window - now)}
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(window) + 1)
return {}
"""

# KEYS: tokens zset. ARGV: window, member ("uid:tokens").
_ADD_TOKENS = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1e6, ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
return 1
"""


class SharedLimitsError(Exception):
    """Redis could not be reached while a limit was checked."""


def connect(url: str) -> Any:
    """A Redis client for ``url``; a clear error when the package or server is missing."""
    try:
        import redis
    except ImportError as exc:
        raise DeepserveError("shared limits (--redis) need the redis package: pip install "
                             "'deepserve[fleet]'", param="redis") from exc
    try:
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5,
                                      decode_responses=True, health_check_interval=30)
        client.ping()
    except (redis.RedisError, ValueError) as exc:
        raise DeepserveError(f"cannot reach Redis at {url}: {exc}; start Redis there or "
                             "drop --redis to keep limits per process", param="redis") from None
    return client


class _Redis:
    """A client plus the scripts, with Redis failures turned into SharedLimitsError."""

    def __init__(self, url: str) -> None:
        import redis

        self.url = url
        self.client = connect(url)
        self._error = redis.RedisError
        self._scripts = {name: self.client.register_script(src) for name, src in (
            ("reserve", _RESERVE), ("state", _STATE), ("check", _CHECK),
            ("add_tokens", _ADD_TOKENS))}

    def run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return self._scripts[name](keys=keys, args=args)
        except self._error as exc:
            raise SharedLimitsError(f"shared limits unavailable: Redis at {self.url} "
                                    f"failed ({exc})") from exc

    def call(self, fn: str, *args: Any) -> Any:
        try:
            return getattr(self.client, fn)(*args)
        except self._error as exc:
            raise SharedLimitsError(f"shared limits unavailable: Redis at {self.url} "
                                    f"failed ({exc})") from exc


class SharedKeyStore(KeyStore):
    """The key file's keys, with spend, quotas and holds kept in Redis."""

    def __init__(self, keys: list[APIKey], url: str) -> None:
        super().__init__(keys)
        self.redis = _Redis(url)

    @classmethod
    def from_store(cls, store: KeyStore, url: str) -> SharedKeyStore:
        return cls(list(store._by_id.values()), url)

    @staticmethod
    def _names(key_id: str) -> list[str]:
        return [f"{PREFIX}key:{key_id}", f"{PREFIX}holds:{key_id}"]

    def seed(self, spend: dict[str, tuple[float, int]]) -> None:
        """Set each key's totals from the ledger unless Redis already has them."""
        for key_id in self._by_id:
            money, tokens = spend.get(key_id, (0.0, 0))
            name = self._names(key_id)[0]
            self.redis.call("hsetnx", name, "spent", repr(float(money)))
            self.redis.call("hsetnx", name, "tokens", int(tokens))

    def replace(self, keys: list[APIKey]) -> None:
        """New settings from the key table; a key new to Redis starts from the table's
        spend (Redis keeps the running totals after that)."""
        new = [k for k in keys if k.key_id not in self._by_id]
        super().replace(keys)
        for k in new:
            name = self._names(k.key_id)[0]
            self.redis.call("hsetnx", name, "spent", repr(float(k.spent)))
            self.redis.call("hsetnx", name, "tokens", int(k.tokens))

    def _refresh(self, k: APIKey | None) -> APIKey | None:
        if k is not None:
            spent, tokens, held, held_tokens = self.redis.run(
                "state", self._names(k.key_id), [])
            k.spent, k.tokens = float(spent), int(float(tokens))
            k.reserved, k.reserved_tokens = float(held), int(float(held_tokens))
        return k

    def get(self, key_id: str) -> APIKey | None:
        return self._refresh(self._by_id.get(key_id))

    def lookup(self, key: str) -> APIKey | None:
        k = super().lookup(key)
        return self._refresh(k)

    def reserve(self, key_id: str, money: float, tokens: int,
                hold_id: str | None = None) -> str | None:
        k = self._by_id.get(key_id)
        if k is None:
            return None
        why = self.redis.run("reserve", self._names(key_id), [
            -1 if k.budget is None else k.budget,
            -1 if k.token_quota is None else k.token_quota,
            repr(float(money)), int(tokens), hold_id or uuid.uuid4().hex, HOLD_TTL_S])
        return None if why == "ok" else why

    def release(self, key_id: str, money: float, tokens: int,
                hold_id: str | None = None) -> None:
        if hold_id is not None:
            self.redis.call("hdel", self._names(key_id)[1], hold_id)

    def charge(self, key_id: str, money: float, tokens: int) -> None:
        name = self._names(key_id)[0]
        try:
            pipe = self.redis.client.pipeline(transaction=True)
            pipe.hincrbyfloat(name, "spent", float(money))
            pipe.hincrby(name, "tokens", int(tokens))
            pipe.execute()
        except self.redis._error as exc:
            # The ledger has the row; Redis is behind by this request until it is back.
            logger.error("could not add %s tokens / %.6f to key %s in Redis: %s", tokens,
                         money, key_id, exc)


class SharedRateLimiter:
    """The gateway's per-key RPM/TPM windows, shared through Redis (same interface as
    ``gateway.ratelimit.RateLimiter``)."""

    WINDOW = 60.0

    def __init__(self, rpm: int, tpm: int, url: str) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.redis = _Redis(url)

    @staticmethod
    def _who(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    def check(self, key: str, rpm: int | None = None,
              tpm: int | None = None) -> tuple[str, float] | None:
        rpm = self.rpm if rpm is None else rpm
        tpm = self.tpm if tpm is None else tpm
        if not (rpm or tpm):
            return None
        who = self._who(key)
        out = self.redis.run("check", [f"{PREFIX}rpm:{who}", f"{PREFIX}tpm:{who}"],
                             [rpm, tpm, self.WINDOW, uuid.uuid4().hex])
        if not out:
            return None
        return out[0], max(0.0, float(out[1]))

    def add_tokens(self, key: str, n: int) -> None:
        if n <= 0:
            return
        try:
            self.redis.run("add_tokens", [f"{PREFIX}tpm:{self._who(key)}"],
                           [self.WINDOW, f"{uuid.uuid4().hex}:{int(n)}"])
        except SharedLimitsError as exc:
            logger.error("could not count %d tokens for %s: %s", n, key, exc)
