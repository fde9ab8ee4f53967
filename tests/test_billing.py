"""Pricing policy, the SQLite ledger, and the cost / margin report."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from deepserve.billing.ledger import Ledger, UsageRecord, insert
from deepserve.billing.ledger_db import open_db
from deepserve.billing.pricing import PricingPolicy
from deepserve.billing.report import build_report, to_csv, to_markdown
from deepserve.errors import DeepserveError

POLICY = PricingPolicy.from_dict({
    "currency": "USD",
    "models": {"default": {"cache_hit_input": 0.14, "cache_miss_input": 0.55, "output": 2.19},
               "pro": {"cache_hit_input": 0.5, "cache_miss_input": 2.0, "output": 8.0}},
    "windows": [{"name": "off-peak", "start": "16:30", "end": "00:30", "multiplier": 0.5}],
    "utilization": [{"below": 0.5, "multiplier": 0.7}, {"above": 0.8, "multiplier": 1.2}],
})


def at(hh: int, mm: int) -> datetime:
    return datetime(2026, 1, 1, hh, mm, tzinfo=UTC)


@pytest.mark.parametrize("when, util, mult, rules", [
    (at(12, 0), 0.6, 1.0, ()),  # peak, mid utilization: list price
    (at(16, 30), 0.6, 0.5, ("off-peak",)),  # window start is inside
    (at(0, 15), 0.6, 0.5, ("off-peak",)),  # wraps past midnight
    (at(0, 30), 0.6, 1.0, ()),  # window end is outside
    (at(12, 0), 0.2, 0.7, ("utilization[0]",)),
    (at(12, 0), 0.9, 1.2, ("utilization[1]",)),
    (at(20, 0), 0.9, 0.6, ("off-peak", "utilization[1]")),
])
def test_windows_and_utilization_rules(when, util, mult, rules):
    q = POLICY.quote("SmolLM2", when, util)
    assert q.multiplier == pytest.approx(mult) and q.rules == rules
    assert q.list_prices.cache_miss_input == 0.55  # unnamed model -> default prices
    assert q.cost(1_000_000, 1_000_000, 1_000_000) == pytest.approx((0.14 + 0.55 + 2.19) * mult)
    assert POLICY.quote("pro", when, util).list_prices.output == 8.0


def test_bad_pricing_files_are_named(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("[models.x]\ncache_hit_input = 1\n")
    with pytest.raises(DeepserveError, match=r"models\.x lacks cache_miss_input"):
        PricingPolicy.load(f)
    f.write_text('[[windows]]\nstart = "25:00"\nend = "01:00"\nmultiplier = 0.5\n')
    with pytest.raises(DeepserveError, match=r"windows\[0\]"):
        PricingPolicy.load(f)


def _record(rid: str, hit: int, miss: int, out: int, ts: float, key: str | None = None,
            model: str = "deepseek-r1") -> UsageRecord:
    q = PricingPolicy().quote(model, datetime.fromtimestamp(ts, UTC), 0.6)
    lc = q.list_cost(hit, miss, out)
    return UsageRecord(rid, key, model, "pro", hit + miss, hit, miss, out, ts, ts + 1, ts + 2,
                       "stop", 0.14, 0.55, 2.19, 1.0, "", "USD", lc, lc)


def test_deepseek_day_cost_and_margin(tmp_path):
    """The DeepSeek-V3/R1 overview's day: 608B input tokens (342B cache hits), 168B output,
    226.75 nodes x 8 H800 x 24 h at $2/GPU-hour -> cost $87,072, theoretical revenue
    about $562K, cost-profit margin about 545%."""
    path = tmp_path / "day.db"
    ledger = Ledger(path, "deepseek-r1", "H800", accelerators=8)
    day = datetime(2025, 2, 28, tzinfo=UTC).timestamp()
    # 24 hourly aggregates adding up to the day's totals.
    hit, miss, out = 342 * 10**9, (608 - 342) * 10**9, 168 * 10**9
    def share(n: int, h: int) -> int:
        return n // 24 + (n % 24 if h == 23 else 0)

    for h in range(24):
        ledger.record(_record(f"h{h}", share(hit, h), share(miss, h), share(out, h),
                              day + h * 3600))
    ledger.flush()
    rep = build_report(path, node_hours=226.75 * 24, gpus_per_node=8, gpu_hour_cost=2.0)
    t = rep["total"]
    assert t["prompt_tokens"] == 608 * 10**9 and t["cache_hit_tokens"] == 342 * 10**9
    assert t["output_tokens"] == 168 * 10**9
    assert t["cost"] == pytest.approx(87_072)
    # 342B x 0.14 + 266B x 0.55 + 168B x 2.19 per million = $562,100 (published: $562,027)
    assert t["theoretical_revenue"] == pytest.approx(562_100, rel=1e-9)
    assert t["theoretical_margin"] == pytest.approx(5.4556, abs=1e-3)  # "545%"
    assert t["cache_hit_rate"] == pytest.approx(342 / 608)
    md = to_markdown(rep)
    assert "545.6%" in md and "87,072.00" in md and "608.00B" in md
    ledger.close()


def test_report_by_groups_and_replica_hours(tmp_path):
    path = tmp_path / "l.db"
    conn = open_db(path)
    now = 1_800_000_000.0
    cols = "(replica_id, model, hardware, accelerators, start_ts, last_seen_ts, stop_ts)"
    conn.execute(f"INSERT INTO replicas {cols} VALUES ('a', 'm', 'cpu', 1, ?, ?, ?)",
                 (now, now + 7200, now + 7200))
    conn.execute(f"INSERT INTO replicas {cols} VALUES ('b', 'm', 'cpu', 2, ?, ?, NULL)",
                 (now, now + 1800))  # died: counts to its last heartbeat
    for i, key in enumerate(["k1", "k1", "k2"]):
        insert(conn, _record(f"r{i}", 100, 900, 50, now + i * 3600, key))
    conn.commit()
    conn.close()
    rep = build_report(path, by="key", gpu_hour_cost=3.0,
                       since=str(now), until=str(now + 4 * 3600))
    assert rep["accelerator_hours"] == pytest.approx(2 + 0.5 * 2)
    assert rep["total"]["cost"] == pytest.approx(9.0)
    assert [(g["group"], g["requests"]) for g in rep["groups"]] == [("k1", 2), ("k2", 1)]
    hourly = build_report(path, by="hour", gpu_hour_cost=3.0)
    assert len(hourly["groups"]) == 3 and hourly["groups"][0]["cost"] == pytest.approx(6.0)
    assert to_csv(rep).splitlines()[0].startswith("group,requests")


def test_report_cli(tmp_path):
    path = tmp_path / "l.db"
    ledger = Ledger(path, "m", "cpu")
    ledger.record(_record("r1", 0, 1000, 100, time.time()))
    ledger.close()
    png = tmp_path / "hourly.png"
    proc = subprocess.run([sys.executable, "-m", "deepserve.cli", "report", "--ledger",
                           str(path), "--format", "json", "--by", "model", "--plot", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["total"]["requests"] == 1 and rep["groups"][0]["group"] == "deepseek-r1"
    assert png.read_bytes()[:4] == b"\x89PNG"
    missing = subprocess.run([sys.executable, "-m", "deepserve.cli", "report", "--ledger",
                              str(tmp_path / "nope.db")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
