"""Past one process: the ledger in SQLite and in a real PostgreSQL, limits shared through
a real Redis, two gateways over one ledger (quota enforced once, SIGKILL loses and
doubles nothing), and DNS discovery of replicas. The servers are started by the tests
on loopback (tests/services.py)."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime

import pytest

from deepserve.billing.keys import APIKey
from deepserve.billing.ledger import Ledger, UsageRecord, insert, key_spend
from deepserve.billing.ledger_db import SCHEMA_VERSION, USAGE_V4, open_db
from deepserve.billing.pricing import PricingPolicy
from deepserve.billing.report import build_report
from deepserve.errors import DeepserveError


def _record(rid: str, ts: float, key: str | None = "k", out: int = 10) -> UsageRecord:
    q = PricingPolicy().quote("m", datetime.fromtimestamp(ts, UTC), 0.6)
    lc = q.list_cost(0, 100, out)
    return UsageRecord(rid, key, "m", "lite", 100, 0, 100, out, ts, ts + 0.1, ts + 0.2,
                       "stop", 0.14, 0.55, 2.19, 1.0, "", "USD", lc, lc)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    pg = request.getfixturevalue("postgres")
    return pg.fresh_database(f"t_{uuid.uuid4().hex[:12]}")


def test_a_request_id_is_billed_once_and_the_report_reads_either_backend(ledger_url):
    now = time.time() - 3600
    ledger = Ledger(ledger_url, "m", "cpu", accelerators=1, hourly_cost=0.5)
    first = ledger.record(_record("req-1", now))
    again = ledger.record(_record("req-1", now))  # a replayed write of the same request
    other = ledger.record(_record("req-2", now + 1, key="k2", out=20))
    assert (first.result(10), again.result(10), other.result(10)) == (True, False, True)
    assert ledger.key_spend()["k"][1] == 110 and ledger.key_spend()["k2"][1] == 120
    ledger.close()
    # A second replica without --hourly-cost: priced per accelerator-hour.
    db = open_db(ledger_url)
    db.execute("INSERT INTO replicas (replica_id, model, hardware, accelerators, start_ts, "
               "last_seen_ts, stop_ts) VALUES ('r2', 'm', 'gpu', 2, ?, ?, ?)",
               (now, now + 1800, now + 1800))
    db.execute("UPDATE replicas SET start_ts = ?, stop_ts = ?, last_seen_ts = ? "
               "WHERE replica_id <> 'r2'", (now, now + 3600, now + 3600))
    db.commit()
    assert db.query("SELECT MAX(version) FROM schema_version")[0][0] == SCHEMA_VERSION
    db.close()
    rep = build_report(ledger_url, by="hour", gpu_hour_cost=3.0)
    assert rep["total"]["requests"] == 2 and rep["replicas"] == 2
    assert rep["accelerator_hours"] == pytest.approx(1.0 + 0.5 * 2)
    assert rep["total"]["cost"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 * 3.0)
    assert sum(g["requests"] for g in rep["groups"]) == 2
    assert rep["groups"][0]["group"].endswith(":00")
    out = subprocess.run([sys.executable, "-m", "deepserve.cli", "report", "--ledger",
                          ledger_url, "--format", "json", "--by", "key"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [(g["group"], g["requests"]) for g in json.loads(out.stdout)["groups"]] == [
        ("k", 1), ("k2", 1)]


def test_an_old_sqlite_ledger_is_migrated_and_duplicates_are_named(tmp_path):
    import sqlite3

    old_schema = ("CREATE TABLE usage (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id "
                  "TEXT NOT NULL, key_id TEXT, model TEXT NOT NULL, tier TEXT, prompt_tokens "
                  "INTEGER NOT NULL, cache_hit_tokens INTEGER NOT NULL, cache_miss_tokens "
                  "INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, start_ts REAL NOT "
                  "NULL, first_token_ts REAL, end_ts REAL NOT NULL, finish_reason TEXT, "
                  "price_cache_hit REAL NOT NULL, price_cache_miss REAL NOT NULL, "
                  "price_output REAL NOT NULL, multiplier REAL NOT NULL, rules TEXT, "
                  "currency TEXT NOT NULL, list_cost REAL NOT NULL, cost REAL NOT NULL, "
                  "replica_id TEXT);"
                  "CREATE TABLE replicas (replica_id TEXT PRIMARY KEY, model TEXT, hardware "
                  "TEXT NOT NULL, accelerators INTEGER NOT NULL DEFAULT 1, start_ts REAL NOT "
                  "NULL, last_seen_ts REAL NOT NULL, stop_ts REAL);")
    old_columns = [c for c in vars(_record("x", 0)) if c not in USAGE_V4]
    row = tuple(vars(_record("old-1", 1_800_000_000.0))[c] for c in old_columns)
    for name, rows in (("good.db", [row]), ("dup.db", [row, row])):
        conn = sqlite3.connect(tmp_path / name)
        conn.executescript(old_schema)
        for r in rows:
            conn.execute(f"INSERT INTO usage ({', '.join(old_columns)}) VALUES "
                         f"({', '.join('?' * len(r))})", r)
        conn.commit()
        conn.close()
    db = open_db(tmp_path / "good.db")
    assert db.query("SELECT MAX(version) FROM schema_version")[0][0] == SCHEMA_VERSION
    assert db.has_column("replicas", "hourly_cost")
    assert all(db.has_column("usage", c) for c in USAGE_V4)
    assert not insert(db, _record("old-1", 1.0))  # version 2: the id is taken
    assert key_spend(db)["k"][1] == 110
    db.close()
    with pytest.raises(DeepserveError, match="bills some request ids more than once"):
        open_db(tmp_path / "dup.db")


def test_postgres_writes_survive_a_dropped_connection(postgres):
    url = postgres.fresh_database(f"t_{uuid.uuid4().hex[:12]}")
    ledger = Ledger(url, "m", "cpu")
    assert ledger.record(_record("before", time.time())).result(10)
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:  # the server drops our session
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                      "datname = current_database() AND pid <> pg_backend_pid()")
    assert ledger.record(_record("after", time.time())).result(30)
    ledger.close()
    db = open_db(url)
    assert sorted(r[0] for r in db.query("SELECT request_id FROM usage")) == [
        "after", "before"]
    db.close()


def test_a_bad_ledger_or_redis_url_is_a_clear_error():
    with pytest.raises(DeepserveError, match="cannot open the PostgreSQL ledger "
                       r"postgresql://u:\*\*\*@127.0.0.1:1/x"):
        Ledger("postgresql://u:secret@127.0.0.1:1/x", "m", "cpu")
    from deepserve.billing.shared import SharedRateLimiter

    with pytest.raises(DeepserveError, match=r"cannot reach Redis at redis://127\.0\.0\.1:1/0"):
        SharedRateLimiter(5, 0, "redis://127.0.0.1:1/0")
    from deepserve.server.state import ServerConfig

    with pytest.raises(DeepserveError, match="not a redis:// URL"):
        ServerConfig(redis="127.0.0.1:6379")


def test_shared_budgets_hold_across_processes(redis_server):
    """Two stores (two replicas) on one Redis: concurrent holds never overdraw a budget,
    spend is seen by both, and a hold of a replica that died expires."""
    from deepserve.billing import shared

    redis_server.flush()
    keys = [APIKey("team", "h", budget=1.0, token_quota=1000)]
    a = shared.SharedKeyStore(keys, redis_server.url)
    b = shared.SharedKeyStore([APIKey("team", "h", budget=1.0, token_quota=1000)],
                              redis_server.url)
    a.seed({"team": (0.25, 100)})
    b.seed({"team": (0.0, 0)})  # already seeded: Redis keeps the first
    assert b.get("team").spent == pytest.approx(0.25) and b.get("team").tokens == 100

    def take(i: int) -> str | None:
        store = (a, b)[i % 2]
        return store.reserve("team", 0.1, 10, f"hold-{i}")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(take, range(20)))
    assert results.count(None) == 7  # 0.25 + 7 x 0.1 <= 1.0 < 0.25 + 8 x 0.1
    assert set(results) == {None, "budget"}
    a.charge("team", 0.05, 5)
    a.release("team", 0.1, 10, "hold-0" if results[0] is None else
              f"hold-{results.index(None)}")
    k = b.get("team")
    assert k.spent == pytest.approx(0.30) and k.tokens == 105
    assert k.reserved == pytest.approx(0.6)
    # A hold whose process died: expired holds are dropped at the next reserve.
    a.redis.client.hset(f"{shared.PREFIX}holds:team", "dead", "0.5 0 1.0")
    assert b.reserve("team", 0.05, 1, "x") is None


def test_shared_rate_limits_count_every_replica(redis_server):
    from deepserve.billing.shared import SharedRateLimiter

    redis_server.flush()
    limiters = [SharedRateLimiter(5, 0, redis_server.url) for _ in range(2)]
    verdicts = [limiters[i % 2].check("key-a") for i in range(12)]
    assert sum(v is None for v in verdicts) == 5
    assert all(v[0] == "requests" and 0 < v[1] <= 60 for v in verdicts if v)
    assert limiters[1].check("key-b") is None  # limits are per key
    tpm = [SharedRateLimiter(0, 100, redis_server.url) for _ in range(2)]
    assert tpm[0].check("key-c") is None
    tpm[0].add_tokens("key-c", 60)
    tpm[1].add_tokens("key-c", 50)
    assert tpm[1].check("key-c")[0] == "tokens"


def test_settings_that_would_be_ignored_are_refused():
    from deepserve.gateway.config import GatewayConfig
    from deepserve.server.state import ServerConfig

    with pytest.raises(DeepserveError, match="--no-ledger-usage records"):
        ServerConfig(ledger_usage=False)
    with pytest.raises(DeepserveError, match="--redis shares key budgets"):
        ServerConfig(redis="redis://127.0.0.1:6379/0")
    with pytest.raises(DeepserveError, match="redis shares key budgets"):
        GatewayConfig.from_dict({"gateway": {"redis": "redis://127.0.0.1:6379/0"},
                                 "tiers": {"lite": {"backends": ["http://127.0.0.1:1"]}}})


def _open_at(url: str, start: float, out) -> None:
    while time.time() < start:
        pass
    try:
        Ledger(url, "m", "cpu").close()
        out.put("ok")
    except Exception as exc:  # reported to the test
        out.put(f"{type(exc).__name__}: {exc}")


def test_replicas_started_together_create_a_new_ledger_without_error(tmp_path, postgres):
    """Eight processes open the same new ledger at the same instant, over and over (without
    the retry this failed within its first three rounds: "database is locked")."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    urls = [str(tmp_path / f"new-{k}.db") for k in range(10)] + [
        postgres.fresh_database(f"race_{uuid.uuid4().hex[:12]}") for _ in range(2)]
    for url in urls:
        out = ctx.Queue()
        start = time.time() + 0.3
        procs = [ctx.Process(target=_open_at, args=(url, start, out)) for _ in range(8)]
        for p in procs:
            p.start()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        assert results == ["ok"] * 8, (url, results)
        db = open_db(url)
        assert db.query("SELECT COUNT(*) FROM replicas")[0][0] == 8
        db.close()
