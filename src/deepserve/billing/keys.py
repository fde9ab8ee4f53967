"""API keys with optional budgets and token quotas, from a TOML key file or, with a
ledger, from the ledger's database (``billing/key_table``: the file then only seeds it).

    [[keys]]
    id = "team-a"             # what the ledger and reports show (never the key itself)
    key = "sk-team-a-secret"  # or key_sha256 = "<hex SHA-256 of the key>" (no plaintext)
    budget = 5.0              # in the pricing currency; over it: 402
    token_quota = 1000000     # prompt + completion tokens; over it: 429
    team = "research"         # optional: whose spend it counts in (admin reports)
    rpm = 60                  # optional: this key's requests / tokens per minute
    tpm = 100000
    models = ["lite"]         # optional: the models or gateway tiers it may use
    expires_at = "2027-01-01T00:00:00Z"  # optional: 401 from then on

A request reserves its largest possible cost and token count at admission (its
prompt plus max_tokens); the real figures are charged when it ends and the
reservation released, so neither concurrent nor back-to-back requests can take a
key past its budget or quota. This store keeps them in the process; with ``--redis``
``billing/shared.SharedKeyStore`` keeps them in Redis for every replica at once.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

from deepserve.config import read_toml
from deepserve.errors import DeepserveError


@dataclass
class APIKey:
    key_id: str
    key_hash: str
    budget: float | None = None
    token_quota: int | None = None
    spent: float = 0.0
    tokens: int = 0
    reserved: float = 0.0  # money held by requests in flight
    reserved_tokens: int = 0
    weight: float = 1.0  # this key's share of the batch against other keys' (fair scheduling)
    team: str | None = None
    rpm: int | None = None  # this key's own per-minute limits (None: the front's)
    tpm: int | None = None
    models: tuple[str, ...] | None = None  # models or tiers it may use (None: all)
    expires_ts: float | None = None
    revoked_ts: float | None = None
    created_ts: float | None = None
    key_hint: str | None = None  # the secret's first and last characters, for lists

    def refusal(self, now: float | None = None) -> str | None:
        """Why this key may not be used now (revoked, expired), or None."""
        import time
        from datetime import UTC, datetime

        if self.revoked_ts is not None:
            return (f"API key {self.key_id!r} was revoked; ask the service's admin for a "
                    "new key")
        if self.expires_ts is not None and (now or time.time()) >= self.expires_ts:
            when = datetime.fromtimestamp(self.expires_ts, UTC).isoformat()
            return (f"API key {self.key_id!r} expired at {when}; ask the service's admin "
                    "to extend it or for a new key")
        return None

    def allows(self, *names: str | None) -> bool:
        """Whether the key may use a model or tier called by any of ``names``."""
        return self.models is None or any(n in self.models for n in names if n)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Looks keys up by hash and tracks what each has spent (seeded from the ledger)."""

    def __init__(self, keys: list[APIKey]) -> None:
        self._by_hash = {k.key_hash: k for k in keys}
        self._by_id = {k.key_id: k for k in keys}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path) -> KeyStore:
        data = read_toml(path, "API key file", "api_keys")
        keys = []
        for i, k in enumerate(data.get("keys", [])):
            if "id" not in k or ("key" in k) == ("key_sha256" in k):
                raise DeepserveError(f"API key file {path}: keys[{i}] needs id and one of "
                                     "key or key_sha256", param="api_keys")
            digest = str(k.get("key_sha256", "")).lower()
            if "key_sha256" in k and (len(digest) != 64 or
                                      any(c not in "0123456789abcdef" for c in digest)):
                raise DeepserveError(f"API key file {path}: keys[{i}].key_sha256 must be 64 "
                                     "hex digits (e.g. the output of `printf %s KEY | "
                                     "sha256sum`)", param="api_keys")
            weight = k.get("weight", 1.0)
            if not isinstance(weight, int | float) or isinstance(weight, bool) or weight <= 0:
                raise DeepserveError(f"API key file {path}: keys[{i}].weight must be a "
                                     "positive number (its share of the batch; default 1)",
                                     param="api_keys")
            keys.append(APIKey(str(k["id"]), digest or hash_key(str(k["key"])),
                               k.get("budget"), k.get("token_quota"),
                               weight=float(weight), **_extras(k, f"API key file {path}: "
                                                               f"keys[{i}]")))
        if not keys:
            raise DeepserveError(f"API key file {path} defines no [[keys]]", param="api_keys")
        return cls(keys)

    def all(self) -> list[APIKey]:
        return list(self._by_id.values())

    def replace(self, keys: list[APIKey]) -> None:
        """Take a new set of keys (from the database): limits, revocations and spend as
        stored there; the holds of requests in flight carry over."""
        with self._lock:
            for k in keys:
                old = self._by_id.get(k.key_id)
                if old is not None:
                    k.reserved, k.reserved_tokens = old.reserved, old.reserved_tokens
            self._by_hash = {k.key_hash: k for k in keys}
            self._by_id = {k.key_id: k for k in keys}

    def seed(self, spend: dict[str, tuple[float, int]]) -> None:
        for key_id, (money, tokens) in spend.items():
            if key_id in self._by_id:
                self._by_id[key_id].spent = money
                self._by_id[key_id].tokens = tokens

    def get(self, key_id: str) -> APIKey | None:
        return self._by_id.get(key_id)

    def lookup(self, key: str) -> APIKey | None:
        return self._by_hash.get(hash_key(key))

    def reserve(self, key_id: str, money: float, tokens: int,
                hold_id: str | None = None) -> str | None:
        """Hold ``money`` and ``tokens`` for a request in flight if the key can afford
        them on top of what it spent and what its other requests hold; else return why
        not ("budget" or "quota") and hold nothing."""
        with self._lock:
            k = self._by_id.get(key_id)
            if k is None:
                return None
            if k.budget is not None and k.spent + k.reserved + money > k.budget + 1e-12:
                return "budget"
            if k.token_quota is not None and \
                    k.tokens + k.reserved_tokens + tokens > k.token_quota:
                return "quota"
            k.reserved += money
            k.reserved_tokens += tokens
            return None

    def release(self, key_id: str, money: float, tokens: int,
                hold_id: str | None = None) -> None:
        with self._lock:
            k = self._by_id.get(key_id)
            if k is not None:
                k.reserved = max(0.0, k.reserved - money)
                k.reserved_tokens = max(0, k.reserved_tokens - tokens)

    def charge(self, key_id: str, money: float, tokens: int) -> None:
        with self._lock:
            k = self._by_id.get(key_id)
            if k is not None:
                k.spent += money
                k.tokens += tokens


def _extras(k: dict, where: str) -> dict:
    """The optional per-key settings of a key file entry, checked."""
    from datetime import datetime

    out: dict = {}
    if "team" in k:
        out["team"] = str(k["team"])
    for name in ("rpm", "tpm"):
        if name in k:
            if not isinstance(k[name], int) or isinstance(k[name], bool) or k[name] < 0:
                raise DeepserveError(f"{where}.{name} must be a whole number >= 0",
                                     param="api_keys")
            out[name] = k[name]
    if "models" in k:
        if not isinstance(k["models"], list) or not all(isinstance(m, str)
                                                        for m in k["models"]):
            raise DeepserveError(f'{where}.models must be a list of model or tier names, '
                                 'e.g. ["lite"]', param="api_keys")
        out["models"] = tuple(k["models"])
    if "expires_at" in k:
        value = k["expires_at"]
        try:
            when = value if isinstance(value, datetime) else datetime.fromisoformat(
                str(value).replace("Z", "+00:00"))
        except ValueError:
            raise DeepserveError(f"{where}.expires_at={value!r} is not an ISO time like "
                                 "2027-01-01T00:00:00Z", param="api_keys") from None
        if when.tzinfo is None:
            from datetime import UTC

            when = when.replace(tzinfo=UTC)
        out["expires_ts"] = when.timestamp()
    return out
