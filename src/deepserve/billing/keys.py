"""API keys with optional budgets and token quotas, from a TOML key file.

    [[keys]]
    id = "team-a"             # what the ledger and reports show (never the key itself)
    key = "sk-team-a-secret"
    budget = 5.0              # in the pricing currency; over it: 402
    token_quota = 1000000     # prompt + completion tokens; over it: 429
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
            if "key" not in k or "id" not in k:
                raise DeepserveError(f"API key file {path}: keys[{i}] needs id and key",
                                     param="api_keys")
            keys.append(APIKey(str(k["id"]), hash_key(str(k["key"])), k.get("budget"),
                               k.get("token_quota")))
        if not keys:
            raise DeepserveError(f"API key file {path} defines no [[keys]]", param="api_keys")
        return cls(keys)

    def seed(self, spend: dict[str, tuple[float, int]]) -> None:
        for key_id, (money, tokens) in spend.items():
            if key_id in self._by_id:
                self._by_id[key_id].spent = money
                self._by_id[key_id].tokens = tokens

    def lookup(self, key: str) -> APIKey | None:
        return self._by_hash.get(hash_key(key))

    def charge(self, key_id: str, money: float, tokens: int) -> None:
        with self._lock:
            k = self._by_id.get(key_id)
            if k is not None:
                k.spent += money
                k.tokens += tokens
