"""Where a ledger lives: a SQLite file (a path, the embedded default) or a PostgreSQL
database (a ``postgresql://`` URL). Both hold the same schema, which deepserve creates
and migrates itself; SQL is written once with ``?`` placeholders for both.

Schema versions (the ``schema_version`` table; a ledger without it is version 1):

1. ``usage`` (one row per billed request) and ``replicas`` (uptime per replica).
2. ``usage.request_id`` is unique, so a retried or replayed write never bills twice;
   ``replicas.hourly_cost`` records what each replica costs per hour.
3. ``refusals``: requests a plugin refused (the compliance filter), with the reason.
4. ``usage`` records the endpoint and what the client said of the request (``user``,
   ``safety_identifier``, ``metadata``, and options such as ``reasoning_effort``);
   ``responses`` holds stored Responses API responses (``store: true``) for
   ``previous_response_id`` and ``GET /v1/responses/{id}``.
5. ``api_keys``: the API keys (hashed) with their limits and running spend, managed
   through the admin API (``billing/key_table``); ``audit``: every admin action.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from pathlib import Path
from typing import Any

from deepserve.errors import DeepserveError

SCHEMA_VERSION = 5
PG_SCHEMES = ("postgresql://", "postgres://")

_TABLES = """
CREATE TABLE IF NOT EXISTS usage (
    id {id},
    request_id TEXT NOT NULL,
    key_id TEXT,
    model TEXT NOT NULL,
    tier TEXT,
    prompt_tokens BIGINT NOT NULL,
    cache_hit_tokens BIGINT NOT NULL,
    cache_miss_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    start_ts DOUBLE PRECISION NOT NULL,
    first_token_ts DOUBLE PRECISION,
    end_ts DOUBLE PRECISION NOT NULL,
    finish_reason TEXT,
    price_cache_hit DOUBLE PRECISION NOT NULL,
    price_cache_miss DOUBLE PRECISION NOT NULL,
    price_output DOUBLE PRECISION NOT NULL,
    multiplier DOUBLE PRECISION NOT NULL,
    rules TEXT,
    currency TEXT NOT NULL,
    list_cost DOUBLE PRECISION NOT NULL,
    cost DOUBLE PRECISION NOT NULL,
    replica_id TEXT,
    endpoint TEXT,
    user_id TEXT,
    safety_identifier TEXT,
    metadata TEXT,
    request_options TEXT
);
CREATE INDEX IF NOT EXISTS usage_start ON usage(start_ts);
CREATE INDEX IF NOT EXISTS usage_key ON usage(key_id);
CREATE TABLE IF NOT EXISTS replicas (
    replica_id TEXT PRIMARY KEY,
    model TEXT,
    hardware TEXT NOT NULL,
    accelerators INTEGER NOT NULL DEFAULT 1,
    start_ts DOUBLE PRECISION NOT NULL,
    last_seen_ts DOUBLE PRECISION NOT NULL,
    stop_ts DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS refusals (
    id {id},
    request_id TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    key_id TEXT,
    path TEXT,
    front TEXT,
    plugin TEXT NOT NULL,
    reason TEXT NOT NULL,
    replica_id TEXT
);
CREATE TABLE IF NOT EXISTS responses (
    response_id TEXT PRIMARY KEY,
    key_id TEXT,
    created_ts DOUBLE PRECISION NOT NULL,
    model TEXT,
    previous_response_id TEXT,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    key_hint TEXT,
    team TEXT,
    budget DOUBLE PRECISION,
    token_quota BIGINT,
    rpm INTEGER,
    tpm INTEGER,
    models TEXT,
    weight DOUBLE PRECISION NOT NULL DEFAULT 1,
    expires_ts DOUBLE PRECISION,
    created_ts DOUBLE PRECISION NOT NULL,
    updated_ts DOUBLE PRECISION NOT NULL,
    revoked_ts DOUBLE PRECISION,
    spent DOUBLE PRECISION NOT NULL DEFAULT 0,
    tokens BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS audit (
    id {id},
    ts DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    key_id TEXT,
    detail TEXT,
    front TEXT
)
"""
# Columns added to ``usage`` by version 4 (old ledgers gain them, empty).
USAGE_V4 = ("endpoint", "user_id", "safety_identifier", "metadata", "request_options")


def is_postgres(url: str | Path) -> bool:
    return str(url).startswith(PG_SCHEMES)


def redact(url: str | Path) -> str:
    """The ledger's address with any password hidden (for logs and errors)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", str(url))


class LedgerDB:
    """One connection to a ledger, either backend. Not thread-safe: one user at a time."""

    dialect = "sqlite"
    transient: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    # The start of the hour a request began in, as epoch seconds.
    hour_expr = "CAST(start_ts / 3600 AS INTEGER) * 3600"
    day_expr = "CAST(start_ts / 86400 AS INTEGER) * 86400"  # the start of its UTC day

    def __init__(self, url: str | Path) -> None:
        self.url = str(url)
        self._conn: Any = None
        self.connect()

    def connect(self) -> None:
        path = Path(self.url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed transaction survives a process crash or SIGKILL.
        self._conn.execute("PRAGMA synchronous=NORMAL")

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        return self._conn.execute(sql, args)

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return list(self.execute(sql, args).fetchall())

    def commit(self) -> None:
        self._conn.commit()

    def rollback(self) -> None:
        with contextlib.suppress(self.errors):
            self._conn.rollback()

    def close(self) -> None:
        with contextlib.suppress(self.errors):
            self._conn.close()

    def lock_for_migration(self) -> None:
        self.execute("BEGIN IMMEDIATE")

    def has_column(self, table: str, column: str) -> bool:
        return any(r[1] == column for r in self.query(f"PRAGMA table_info({table})"))

    def script(self, sql: str) -> None:
        for stmt in sql.split(";"):
            if stmt.strip():
                self.execute(stmt)


class PostgresDB(LedgerDB):
    dialect = "postgresql"
    hour_expr = "FLOOR(start_ts / 3600) * 3600"
    day_expr = "FLOOR(start_ts / 86400) * 86400"

    def connect(self) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise DeepserveError(
                "a PostgreSQL ledger needs psycopg: pip install 'deepserve[fleet]'",
                param="ledger") from exc
        self.errors = (psycopg.Error,)
        self.transient = (psycopg.OperationalError, psycopg.InterfaceError)
        try:
            self._conn = psycopg.connect(self.url, connect_timeout=10)
        except psycopg.Error as exc:
            raise DeepserveError(
                f"cannot open the PostgreSQL ledger {redact(self.url)}: "
                f"{str(exc).strip().splitlines()[0]}; check the URL "
                "(postgresql://user:password@host:5432/dbname) and that the server is up",
                param="ledger") from None

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), args)

    def lock_for_migration(self) -> None:
        # Replicas starting together migrate one at a time (the lock ends with the commit).
        self.execute("SELECT pg_advisory_xact_lock(4242017)")

    def has_column(self, table: str, column: str) -> bool:
        return bool(self.query("SELECT 1 FROM information_schema.columns WHERE "
                               "table_name = ? AND column_name = ?", (table, column)))


OPEN_RETRY_S = 30.0  # how long a new SQLite ledger waits out another process creating it


def open_db(url: str | Path) -> LedgerDB:
    """Open a ledger (created and migrated to the current schema).

    Servers started together on a new SQLite file race to create it: switching the file
    to WAL takes a lock that SQLite's busy timeout does not wait for, so a "database is
    locked" there is retried (with a fresh connection) for up to ``OPEN_RETRY_S``."""
    import random
    import time

    deadline = time.monotonic() + OPEN_RETRY_S
    while True:
        try:
            db = PostgresDB(url) if is_postgres(url) else LedgerDB(url)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.02, 0.2))
            continue
        try:
            migrate(db)
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.02, 0.2))
            continue
        except BaseException:
            db.close()
            raise
        return db


def migrate(db: LedgerDB) -> None:
    """Create the tables if they are missing and bring them to SCHEMA_VERSION."""
    db.lock_for_migration()
    try:
        ident = ("BIGSERIAL PRIMARY KEY" if db.dialect == "postgresql"
                 else "INTEGER PRIMARY KEY AUTOINCREMENT")
        db.script(_TABLES.format(id=ident))
        row = db.query("SELECT MAX(version) FROM schema_version")
        version = int(row[0][0] or 1) if row else 1
        if version > SCHEMA_VERSION:
            raise DeepserveError(f"ledger {redact(db.url)} has schema version {version}, "
                                 f"newer than this deepserve's ({SCHEMA_VERSION}); upgrade "
                                 "deepserve", param="ledger")
        if version < 2:
            dup = db.query("SELECT request_id, COUNT(*) FROM usage GROUP BY request_id "
                           "HAVING COUNT(*) > 1 LIMIT 3")
            if dup:
                raise DeepserveError(
                    f"ledger {redact(db.url)} bills some request ids more than once "
                    f"(e.g. {', '.join(repr(d[0]) for d in dup)}); version 2 makes request "
                    "ids unique: remove or rename the duplicate rows, then start again",
                    param="ledger")
            db.execute("CREATE UNIQUE INDEX IF NOT EXISTS usage_request ON usage(request_id)")
            if not db.has_column("replicas", "hourly_cost"):
                db.execute("ALTER TABLE replicas ADD COLUMN hourly_cost DOUBLE PRECISION")
        for column in USAGE_V4:
            if not db.has_column("usage", column):
                db.execute(f"ALTER TABLE usage ADD COLUMN {column} TEXT")
        if version < SCHEMA_VERSION or not row or row[0][0] is None:
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        db.commit()
    except BaseException:
        db.rollback()
        raise
