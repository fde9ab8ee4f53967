"""The usage ledger: one append-only SQLite row per finished request (WAL mode).

Writes go through a queue to one writer thread, so the server's event loop never
waits on disk; each record is committed on its own, so a crash or SIGKILL loses no
committed record. The writer also keeps this replica's uptime row current, so cost
can be computed from real replica-hours even after an unclean stop.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    key_id TEXT,
    model TEXT NOT NULL,
    tier TEXT,
    prompt_tokens INTEGER NOT NULL,
    cache_hit_tokens INTEGER NOT NULL,
    cache_miss_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    start_ts REAL NOT NULL,
    first_token_ts REAL,
    end_ts REAL NOT NULL,
    finish_reason TEXT,
    price_cache_hit REAL NOT NULL,
    price_cache_miss REAL NOT NULL,
    price_output REAL NOT NULL,
    multiplier REAL NOT NULL,
    rules TEXT,
    currency TEXT NOT NULL,
    list_cost REAL NOT NULL,
    cost REAL NOT NULL,
    replica_id TEXT
);
CREATE INDEX IF NOT EXISTS usage_start ON usage(start_ts);
CREATE INDEX IF NOT EXISTS usage_key ON usage(key_id);
CREATE TABLE IF NOT EXISTS replicas (
    replica_id TEXT PRIMARY KEY,
    model TEXT,
    hardware TEXT NOT NULL,
    accelerators INTEGER NOT NULL DEFAULT 1,
    start_ts REAL NOT NULL,
    last_seen_ts REAL NOT NULL,
    stop_ts REAL
);
"""


@dataclass
class UsageRecord:
    """One finished request, as billed."""

    request_id: str
    key_id: str | None
    model: str
    tier: str | None
    prompt_tokens: int
    cache_hit_tokens: int
    cache_miss_tokens: int
    completion_tokens: int
    start_ts: float
    first_token_ts: float | None
    end_ts: float
    finish_reason: str | None
    price_cache_hit: float
    price_cache_miss: float
    price_output: float
    multiplier: float
    rules: str
    currency: str
    list_cost: float
    cost: float
    replica_id: str | None = None


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (and create) a ledger in WAL mode."""
    conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a committed transaction survives a process crash or SIGKILL.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    conn.commit()
    return conn


class Ledger:
    """Append-only writer for one server process (the thread is the ledger's writer)."""

    HEARTBEAT_S = 10.0

    def __init__(self, path: str | Path, model: str, hardware: str,
                 accelerators: int = 1) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.replica_id = f"{model}-{uuid.uuid4().hex[:8]}"
        self._conn = connect(self.path)
        now = time.time()
        self._conn.execute(
            "INSERT INTO replicas (replica_id, model, hardware, accelerators, start_ts, "
            "last_seen_ts) VALUES (?, ?, ?, ?, ?, ?)",
            (self.replica_id, model, hardware, accelerators, now, now))
        self._conn.commit()
        self._queue: queue.SimpleQueue[tuple[UsageRecord, Future[None]] | None] = \
            queue.SimpleQueue()
        self._written = 0
        self._thread = threading.Thread(target=self._run, name="deepserve-ledger",
                                        daemon=True)
        self._thread.start()

    def key_spend(self) -> dict[str, tuple[float, int]]:
        """key_id -> (money spent, tokens used), from the rows on disk."""
        return key_spend(self._conn)

    def record(self, rec: UsageRecord) -> Future[None]:
        """Queue a record; returns at once with a future that resolves once committed."""
        rec.replica_id = self.replica_id
        done: Future[None] = Future()
        self._queue.put((rec, done))
        return done

    def _write(self, rec: UsageRecord) -> None:
        insert(self._conn, rec)
        self._conn.execute("UPDATE replicas SET last_seen_ts=? WHERE replica_id=?",
                           (time.time(), self.replica_id))
        self._conn.commit()
        self._written += 1

    def _run(self) -> None:
        while True:
            try:
                rec = self._queue.get(timeout=self.HEARTBEAT_S)
            except queue.Empty:
                self._beat()
                continue
            if rec is None:
                return
            item, done = rec
            try:
                self._write(item)
                done.set_result(None)
            except sqlite3.Error as exc:
                logger.exception("ledger write failed for %s", item.request_id)
                done.set_exception(exc)

    def _beat(self) -> None:
        try:
            self._conn.execute("UPDATE replicas SET last_seen_ts=? WHERE replica_id=?",
                               (time.time(), self.replica_id))
            self._conn.commit()
        except sqlite3.Error:
            logger.exception("ledger heartbeat failed")

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued record is committed (used by tests and shutdown)."""
        deadline = time.time() + timeout
        while not self._queue.empty() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(30)
        now = time.time()
        self._conn.execute("UPDATE replicas SET stop_ts=?, last_seen_ts=? WHERE replica_id=?",
                           (now, now, self.replica_id))
        self._conn.commit()
        self._conn.close()


def insert(conn: sqlite3.Connection, rec: UsageRecord) -> None:
    """Append one record (the caller commits)."""
    row = asdict(rec)
    cols = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    conn.execute(f"INSERT INTO usage ({cols}) VALUES ({marks})", tuple(row.values()))


def key_spend(conn: sqlite3.Connection) -> dict[str, tuple[float, int]]:
    """key_id -> (money spent, tokens used) from the ledger."""
    rows = conn.execute("SELECT key_id, SUM(cost), SUM(prompt_tokens + completion_tokens) "
                        "FROM usage WHERE key_id IS NOT NULL GROUP BY key_id").fetchall()
    return {k: (c or 0.0, int(t or 0)) for k, c, t in rows}


def as_dicts(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...] = ()) -> list[dict]:
    cur = conn.execute(sql, args)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
