"""The usage ledger: one append-only row per finished request, in SQLite (a path, WAL
mode) or PostgreSQL (a ``postgresql://`` URL) shared by a fleet (``ledger_db``).

Writes go through a queue to one writer thread, so the server's event loop never
waits on the database; each record is committed on its own, so a crash or SIGKILL loses
no committed record. A record is written once per request id: the insert skips an id
already on the books, so the writer can retry after a lost connection (it reconnects)
without ever billing twice. The writer also keeps this replica's uptime row current,
so cost can be computed from real replica-hours even after an unclean stop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deepserve.billing.ledger_db import LedgerDB, open_db, redact

logger = logging.getLogger(__name__)

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
    # What the client said of the request (schema version 4)
    endpoint: str | None = None  # chat.completions, completions, responses, embeddings
    user_id: str | None = None  # the request's ``user``
    safety_identifier: str | None = None
    metadata: str | None = None  # the request's ``metadata``, as JSON
    request_options: str | None = None  # e.g. {"reasoning_effort": "low"}, as JSON


class Ledger:
    """Append-only writer for one process (the thread is the ledger's writer).

    ``usage=False`` records only this replica's uptime (a backend behind a gateway that
    bills its requests)."""

    HEARTBEAT_S = 10.0
    RETRY_S = 30.0  # how long a write is retried while the database is unreachable

    def __init__(self, url: str | Path, model: str, hardware: str, accelerators: int = 1,
                 hourly_cost: float | None = None, usage: bool = True) -> None:
        self.url = str(url)
        self.usage = usage
        self.replica_id = f"{model}-{uuid.uuid4().hex[:8]}"
        self._db = open_db(url)
        now = time.time()
        self._db.execute(
            "INSERT INTO replicas (replica_id, model, hardware, accelerators, start_ts, "
            "last_seen_ts, hourly_cost) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (self.replica_id, model, hardware, accelerators, now, now, hourly_cost or None))
        self._db.commit()
        self._queue: queue.SimpleQueue[tuple[UsageRecord | Refusal, Future[bool]] | None] = \
            queue.SimpleQueue()
        self.written = 0
        self.duplicates = 0
        self._thread = threading.Thread(target=self._run, name="deepserve-ledger",
                                        daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"Ledger({redact(self.url)!r})"

    def key_spend(self) -> dict[str, tuple[float, int]]:
        """key_id -> (money spent, tokens used), from the rows on the books."""
        with_db = open_db(self.url)  # the writer thread owns self._db
        try:
            return key_spend(with_db)
        finally:
            with_db.close()

    def record(self, rec: UsageRecord | Refusal) -> Future[bool]:
        """Queue a record; returns at once with a future that resolves once committed
        (True: written now; False: that request id was already on the books)."""
        rec.replica_id = self.replica_id
        done: Future[bool] = Future()
        if not self.usage and isinstance(rec, UsageRecord):
            done.set_result(False)
            return done
        self._queue.put((rec, done))
        return done

    def _write(self, rec: UsageRecord | Refusal) -> bool:
        """Insert and commit; retried with a fresh connection while the database is
        unreachable (the insert skips an id already written, so a retry never doubles)."""
        deadline = time.monotonic() + self.RETRY_S
        delay = 0.1
        while True:
            try:
                new = insert(self._db, rec)
                self._db.execute("UPDATE replicas SET last_seen_ts=? WHERE replica_id=?",
                                 (time.time(), self.replica_id))
                self._db.commit()
                return new
            except self._db.transient as exc:
                self._db.rollback()
                if time.monotonic() > deadline:
                    raise
                logger.warning("ledger %s: write of %s failed (%s); retrying",
                               redact(self.url), rec.request_id, str(exc).strip()[:200])
                time.sleep(delay)
                delay = min(2.0, delay * 2)
                self._reconnect()

    def _reconnect(self) -> None:
        self._db.close()
        try:
            self._db.connect()
        except Exception as exc:
            logger.warning("ledger %s: reconnect failed: %s", redact(self.url), exc)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.HEARTBEAT_S)
            except queue.Empty:
                self._beat()
                continue
            if item is None:
                return
            rec, done = item
            try:
                new = self._write(rec)
            except Exception as exc:
                logger.exception("ledger write failed for %s", rec.request_id)
                done.set_exception(exc)
                continue
            if new:
                self.written += 1
            else:
                self.duplicates += 1
                logger.info("ledger: request %s was already recorded; not billed again",
                            rec.request_id)
            done.set_result(new)

    def _beat(self) -> None:
        try:
            self._db.execute("UPDATE replicas SET last_seen_ts=? WHERE replica_id=?",
                             (time.time(), self.replica_id))
            self._db.commit()
        except self._db.errors as exc:
            self._db.rollback()
            logger.warning("ledger heartbeat failed: %s", exc)
            if isinstance(exc, self._db.transient):
                self._reconnect()

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
        try:
            self._db.execute("UPDATE replicas SET stop_ts=?, last_seen_ts=? "
                             "WHERE replica_id=?", (now, now, self.replica_id))
            self._db.commit()
        except self._db.errors as exc:
            logger.warning("ledger: could not record this replica's stop: %s", exc)
        self._db.close()


@dataclass
class Refusal:
    """A request a plugin refused (nothing was generated or billed), and why."""

    request_id: str
    ts: float
    key_id: str | None
    path: str | None
    front: str | None
    plugin: str
    reason: str
    replica_id: str | None = None


def insert(db: LedgerDB, rec: UsageRecord | Refusal) -> bool:
    """Append one usage record unless its request id is already there, or a refusal
    (the caller commits); True when a row was added."""
    row = asdict(rec)
    cols = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    if isinstance(rec, Refusal):
        db.execute(f"INSERT INTO refusals ({cols}) VALUES ({marks})", tuple(row.values()))
        return True
    cur = db.execute(f"INSERT INTO usage ({cols}) VALUES ({marks}) "
                     "ON CONFLICT (request_id) DO NOTHING", tuple(row.values()))
    if cur.rowcount != 1:
        return False
    if rec.key_id is not None:  # the key's running spend, for every replica (key_table)
        db.execute("UPDATE api_keys SET spent = spent + ?, tokens = tokens + ? "
                   "WHERE key_id = ?", (rec.cost, rec.prompt_tokens + rec.completion_tokens,
                                        rec.key_id))
    return True


def key_spend(db: LedgerDB) -> dict[str, tuple[float, int]]:
    """key_id -> (money spent, tokens used) from the ledger."""
    rows = db.query("SELECT key_id, SUM(cost), SUM(prompt_tokens + completion_tokens) "
                    "FROM usage WHERE key_id IS NOT NULL GROUP BY key_id")
    return {k: (float(c or 0.0), int(t or 0)) for k, c, t in rows}


def as_dicts(db: LedgerDB, sql: str, args: tuple[Any, ...] = ()) -> list[dict]:
    cur = db.execute(sql, args)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
