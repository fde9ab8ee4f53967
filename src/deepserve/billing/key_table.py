"""API keys in the ledger's database (schema version 5), so every server, gateway and
Ray replica that shares the database shares the keys, and an admin changes them
without a restart.

- ``api_keys``: one row per key, the SHA-256 of the secret (never the secret), its
  limits (budget, token quota, RPM/TPM, models or tiers, expiry, weight), its created /
  updated / revoked times, and its running spend, which the ledger's writer adds to in
  the same transaction as each usage row (``ledger.insert``).
- ``audit``: every admin action: when, who, what, on which key, with which fields.

``KeySync`` re-reads the table every ``SYNC_S`` seconds into the process's
``KeyStore`` (or ``SharedKeyStore``, whose spend lives in Redis): a key created,
limited or revoked on one replica holds on all of them within that time. A key file
given with ``--api-keys`` only seeds the table: ids already there keep the database's
settings.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from deepserve.billing.keys import APIKey, KeyStore, hash_key
from deepserve.billing.ledger_db import LedgerDB, open_db, redact
from deepserve.errors import DeepserveError

logger = logging.getLogger(__name__)

SYNC_S = 1.0
# What an admin may set on a key (``models`` as a list, ``expires_ts`` epoch seconds).
FIELDS = ("team", "budget", "token_quota", "rpm", "tpm", "models", "weight", "expires_ts")
KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_COLUMNS = ("key_id, key_hash, key_hint, team, budget, token_quota, rpm, tpm, models, "
            "weight, expires_ts, created_ts, updated_ts, revoked_ts, spent, tokens")


def new_secret() -> str:
    return "sk-ds-" + secrets.token_urlsafe(24)


def hint(secret: str) -> str:
    return f"{secret[:8]}...{secret[-4:]}"


def _key(row: tuple[Any, ...]) -> APIKey:
    (key_id, key_hash, key_hint, team, budget, quota, rpm, tpm, models, weight, expires,
     created, _updated, revoked, spent, tokens) = row
    return APIKey(key_id, key_hash, None if budget is None else float(budget),
                  None if quota is None else int(quota), spent=float(spent or 0.0),
                  tokens=int(tokens or 0), weight=float(weight or 1.0), team=team,
                  rpm=rpm, tpm=tpm,
                  models=tuple(json.loads(models)) if models is not None else None,
                  expires_ts=expires, revoked_ts=revoked, created_ts=created,
                  key_hint=key_hint)


def key_view(k: APIKey, currency: str | None = None) -> dict[str, Any]:
    """A key as the admin API shows it (never its secret or hash)."""
    return {"object": "api_key", "id": k.key_id, "team": k.team, "key_hint": k.key_hint,
            "budget": k.budget, "spent": round(k.spent, 10),
            "remaining_budget": None if k.budget is None else
            round(max(0.0, k.budget - k.spent), 10), "currency": currency,
            "token_quota": k.token_quota, "tokens_used": k.tokens, "rpm": k.rpm,
            "tpm": k.tpm, "models": list(k.models) if k.models is not None else None,
            "weight": k.weight, "expires_at": k.expires_ts, "created_at": k.created_ts,
            "revoked_at": k.revoked_ts,
            "status": "revoked" if k.revoked_ts is not None else
            "expired" if k.refusal() else "active"}


class KeyTable:
    """The ``api_keys`` and ``audit`` tables, through one connection of its own."""

    def __init__(self, url: str) -> None:
        self.url = str(url)
        self._db: LedgerDB = open_db(url)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KeyTable({redact(self.url)!r})"

    def run(self, fn: Callable[[LedgerDB], Any]) -> Any:
        """``fn(db)`` in one transaction, committed; retried once on a fresh connection
        when the database dropped the old one."""
        with self._lock:
            for attempt in (0, 1):
                try:
                    out = fn(self._db)
                    self._db.commit()
                    return out
                except self._db.transient:
                    self._db.rollback()
                    if attempt:
                        raise
                    self._db.close()
                    self._db.connect()
                except BaseException:
                    self._db.rollback()
                    raise
        return None

    def load(self) -> list[APIKey]:
        return self.run(lambda db: [_key(r) for r in db.query(
            f"SELECT {_COLUMNS} FROM api_keys")])

    def get(self, key_id: str) -> APIKey | None:
        rows = self.run(lambda db: db.query(f"SELECT {_COLUMNS} FROM api_keys WHERE "
                                            "key_id = ?", (key_id,)))
        return _key(rows[0]) if rows else None

    def seed(self, keys: list[APIKey], source: str) -> list[str]:
        """Add the key file's keys the table does not have yet (their spend so far from
        the ledger's rows); the ids it already has keep the database's settings."""

        def add(db: LedgerDB) -> list[str]:
            have = {r[0] for r in db.query("SELECT key_id FROM api_keys")}
            added = []
            for k in keys:
                if k.key_id in have:
                    continue
                taken = db.query("SELECT key_id FROM api_keys WHERE key_hash = ?",
                                 (k.key_hash,))
                if taken:
                    raise DeepserveError(f"{source}: key {k.key_id!r} has the same secret "
                                         f"as key {taken[0][0]!r} in the ledger's key "
                                         "table; give it another key", param="api_keys")
                ((spent, tokens),) = db.query(
                    "SELECT SUM(cost), SUM(prompt_tokens + completion_tokens) FROM usage "
                    "WHERE key_id = ?", (k.key_id,))
                _insert(db, k, spent or 0.0, tokens or 0)
                _audit(db, "key-file", "seed", k.key_id, {"source": source}, None)
                added.append(k.key_id)
            return added

        added = self.run(add)
        if added:
            logger.info("keys from %s added to the ledger's key table: %s", source,
                        ", ".join(added))
        return added

    def create(self, fields: dict[str, Any], key_id: str | None, actor: str,
               front: str) -> tuple[APIKey, str]:
        key_id = key_id or f"key-{secrets.token_hex(4)}"
        if not KEY_ID.match(key_id):
            raise DeepserveError(f"id={key_id!r} must be 1-64 letters, digits, '.', '_' or "
                                 "'-', starting with a letter or digit", param="id")
        secret = new_secret()
        now = time.time()
        k = APIKey(key_id, hash_key(secret), key_hint=hint(secret), created_ts=now)
        _apply(k, fields)

        def add(db: LedgerDB) -> None:
            if db.query("SELECT 1 FROM api_keys WHERE key_id = ?", (key_id,)):
                raise DeepserveError(f"a key with id {key_id!r} exists; pick another id, "
                                     f"or PATCH /admin/keys/{key_id} to change it",
                                     status=409, param="id", code="key_exists")
            _insert(db, k, 0.0, 0)
            _audit(db, actor, "create", key_id, fields, front)

        self.run(add)
        return k, secret

    def update(self, key_id: str, fields: dict[str, Any], actor: str, front: str) -> APIKey:
        def change(db: LedgerDB) -> None:
            _exists(db, key_id)
            sets = ", ".join(f"{f} = ?" for f in fields)
            values = [json.dumps(v) if f == "models" and v is not None else v
                      for f, v in fields.items()]
            db.execute(f"UPDATE api_keys SET {sets}, updated_ts = ? WHERE key_id = ?",
                       (*values, time.time(), key_id))
            _audit(db, actor, "update", key_id, fields, front)

        if fields:
            self.run(change)
        return self._must(key_id)

    def rotate(self, key_id: str, actor: str, front: str) -> tuple[APIKey, str]:
        secret = new_secret()

        def change(db: LedgerDB) -> None:
            _exists(db, key_id)
            db.execute("UPDATE api_keys SET key_hash = ?, key_hint = ?, updated_ts = ? "
                       "WHERE key_id = ?", (hash_key(secret), hint(secret), time.time(),
                                            key_id))
            _audit(db, actor, "rotate", key_id, {}, front)

        self.run(change)
        return self._must(key_id), secret

    def revoke(self, key_id: str, actor: str, front: str) -> APIKey:
        def change(db: LedgerDB) -> None:
            _exists(db, key_id)
            now = time.time()
            db.execute("UPDATE api_keys SET revoked_ts = COALESCE(revoked_ts, ?), "
                       "updated_ts = ? WHERE key_id = ?", (now, now, key_id))
            _audit(db, actor, "revoke", key_id, {}, front)

        self.run(change)
        return self._must(key_id)

    def audit_log(self, limit: int = 200, key_id: str | None = None) -> list[dict[str, Any]]:
        where, args = ("WHERE key_id = ? ", (key_id,)) if key_id else ("", ())
        rows = self.run(lambda db: db.query(
            f"SELECT id, ts, actor, action, key_id, detail, front FROM audit {where}"
            "ORDER BY id DESC LIMIT ?", (*args, limit)))
        return [{"id": i, "ts": ts, "actor": actor, "action": action, "key_id": kid,
                 "detail": json.loads(detail) if detail else {}, "front": front}
                for i, ts, actor, action, kid, detail, front in rows]

    def note(self, actor: str, action: str, detail: dict[str, Any], front: str) -> None:
        """Record an admin action that changes no key (e.g. reading the margin report)."""
        self.run(lambda db: _audit(db, actor, action, None, detail, front))

    def _must(self, key_id: str) -> APIKey:
        k = self.get(key_id)
        if k is None:
            raise _missing(key_id)
        return k

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _missing(key_id: str) -> DeepserveError:
    return DeepserveError(f"no API key with id {key_id!r} (see GET /admin/keys)",
                          status=404, param="key_id", code="key_not_found")


def _exists(db: LedgerDB, key_id: str) -> None:
    if not db.query("SELECT 1 FROM api_keys WHERE key_id = ?", (key_id,)):
        raise _missing(key_id)


def _apply(k: APIKey, fields: dict[str, Any]) -> None:
    for f, v in fields.items():
        setattr(k, f, tuple(v) if f == "models" and v is not None else v)
    if k.weight is None:
        k.weight = 1.0


def _insert(db: LedgerDB, k: APIKey, spent: float, tokens: int) -> None:
    now = time.time()
    db.execute(f"INSERT INTO api_keys ({_COLUMNS}) VALUES "
               "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (k.key_id, k.key_hash, k.key_hint, k.team, k.budget, k.token_quota, k.rpm,
                k.tpm, json.dumps(list(k.models)) if k.models is not None else None,
                k.weight, k.expires_ts, k.created_ts or now, now, k.revoked_ts,
                float(spent), int(tokens)))


def _audit(db: LedgerDB, actor: str, action: str, key_id: str | None,
           detail: dict[str, Any], front: str | None) -> None:
    db.execute("INSERT INTO audit (ts, actor, action, key_id, detail, front) VALUES "
               "(?, ?, ?, ?, ?, ?)", (time.time(), actor, action, key_id,
                                      json.dumps(detail, default=str), front))


class KeySync:
    """Keeps a process's key store equal to the table: re-read every ``interval``
    seconds in a daemon thread, and at once after this process's own admin actions."""

    def __init__(self, table: KeyTable, store: KeyStore, interval: float = SYNC_S) -> None:
        self.table, self.store, self.interval = table, store, interval
        self._stop = threading.Event()
        self._failing = False
        self.now()
        self._thread = threading.Thread(target=self._run, name="deepserve-keys", daemon=True)
        self._thread.start()

    def now(self) -> None:
        self.store.replace(self.table.load())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.now()
                if self._failing:
                    logger.warning("key table %s readable again", redact(self.table.url))
                self._failing = False
            except Exception as exc:  # keep the last keys; say so once
                if not self._failing:
                    logger.warning("key table %s unreadable (%s); serving with the keys "
                                   "read last", redact(self.table.url), exc)
                self._failing = True

    def stop(self) -> None:
        self._stop.set()
