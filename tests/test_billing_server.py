"""Metering on a real server: ledger rows equal responses' usage, prices follow the
policy, keys are held to budgets and quotas, and a SIGKILL loses no completed request."""

from __future__ import annotations

import signal
import sqlite3

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prompts import LONG_CONTEXT
from server_utils import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
PRICING = """
currency = "USD"
[models.default]
cache_hit_input = 0.14
cache_miss_input = 0.55
output = 2.19
[[windows]]
name = "off-peak"
start = "16:30"
end = "00:30"
multiplier = 0.5
[[utilization]]
below = 0.5
multiplier = 0.7
"""
KEYS = """
[[keys]]
id = "rich"
key = "sk-rich"
[[keys]]
id = "poor"
key = "sk-poor"
budget = 0.0000001
[[keys]]
id = "capped"
key = "sk-capped"
token_quota = 20
"""


@pytest.fixture(scope="module")
def billed(tmp_path_factory):
    d = tmp_path_factory.mktemp("billing")
    (d / "pricing.toml").write_text(PRICING)
    (d / "keys.toml").write_text(KEYS)
    ledger = d / "ledger.db"
    # Clock injected: every request is priced as if at 17:00 UTC (off-peak).
    srv = ServerProcess("--ledger", str(ledger), "--pricing", str(d / "pricing.toml"),
                        "--api-keys", str(d / "keys.toml"), "--pricing-clock",
                        "2026-03-01T17:00:00Z", "--tier", "lite", log_dir=d)
    yield srv, ledger
    srv.stop(signal.SIGKILL)


def rows(ledger) -> list[dict]:
    conn = sqlite3.connect(ledger)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY id")]
    finally:
        conn.close()


def test_ledger_matches_usage_and_cache_hits_are_cheaper(billed):
    srv, ledger = billed
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sk-rich", max_retries=0)
    before = len(rows(ledger))
    first = client.completions.create(model=MODEL, prompt=LONG_CONTEXT, max_tokens=5,
                                      temperature=0)
    again = client.completions.create(model=MODEL, prompt=LONG_CONTEXT, max_tokens=5,
                                      temperature=0)
    chat = client.chat.completions.create(model=MODEL, max_tokens=6, stream=True,
                                          stream_options={"include_usage": True},
                                          messages=[{"role": "user", "content": "Hi"}])
    chunks = list(chat)
    recs = rows(ledger)[before:]
    assert len(recs) == 3
    usages = [first.usage, again.usage, chunks[-1].usage]
    for rec, usage in zip(recs, usages, strict=True):
        assert rec["prompt_tokens"] == usage.prompt_tokens
        assert rec["completion_tokens"] == usage.completion_tokens
        assert rec["cache_hit_tokens"] == usage.prompt_tokens_details.cached_tokens
        assert rec["key_id"] == "rich" and rec["tier"] == "lite" and rec["model"] == MODEL
        assert rec["cost"] == pytest.approx(usage.model_extra["cost"], abs=1e-9)
    # The repeated long prompt is billed mostly at the cache-hit price.
    assert recs[0]["cache_hit_tokens"] == 0 and recs[1]["cache_hit_tokens"] >= 160
    assert recs[1]["cost"] < recs[0]["cost"]
    expected = (recs[1]["cache_hit_tokens"] * 0.14 + recs[1]["cache_miss_tokens"] * 0.55
                + recs[1]["completion_tokens"] * 2.19) / 1e6
    assert recs[1]["list_cost"] == pytest.approx(expected)
    # Off-peak (0.5, injected clock) and low utilization (0.7) both apply.
    assert all(r["multiplier"] == pytest.approx(0.35) for r in recs)
    assert recs[1]["rules"] == "off-peak,utilization[0]"
    assert recs[1]["cost"] == pytest.approx(expected * 0.35)


def test_cost_is_shown_to_the_client(billed):
    srv, _ = billed
    r = httpx.post(f"{srv.url}/v1/completions", headers={"Authorization": "Bearer sk-rich"},
                   json={"model": MODEL, "prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
    usage = r.json()["usage"]
    assert usage["cost"] > 0 and usage["currency"] == "USD"
    assert float(r.headers["x-deepserve-cost"]) == pytest.approx(usage["cost"])
    assert r.headers["x-deepserve-price-multiplier"] == "0.35"


def test_budget_and_quota_are_enforced(billed):
    srv, _ = billed
    url = f"{srv.url}/v1/completions"
    post = lambda **kw: httpx.post(url, json=body, timeout=60, **kw)  # noqa: E731
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 30, "ignore_eos": True}
    assert post().status_code == 401
    assert post(headers={"Authorization": "Bearer sk-nope"}).status_code == 401
    poor = {"Authorization": "Bearer sk-poor"}
    # The request's largest cost is held at admission: a key that cannot cover it is
    # refused before anything runs, so no key ever spends past its budget.
    over = post(headers=poor)
    assert over.status_code == 402 and over.json()["error"]["code"] == "insufficient_quota"
    assert "lower max_tokens" in over.json()["error"]["message"]
    capped = {"Authorization": "Bearer sk-capped"}
    limited = post(headers=capped)  # prompt + 30 tokens cannot fit a 20-token quota
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "token_quota_exceeded"
    small = {"model": MODEL, "prompt": "Hello there", "max_tokens": 4, "ignore_eos": True}
    used, codes = 0, []
    for _ in range(6):
        r = httpx.post(url, json=small, headers=capped, timeout=60)
        codes.append(r.status_code)
        if r.status_code == 200:
            used += r.json()["usage"]["total_tokens"]
    assert codes[0] == 200 and codes[-1] == 429, codes
    assert used <= 20  # the quota is never exceeded


def test_revenue_counters_on_metrics(billed):
    srv, _ = billed
    assert httpx.get(f"{srv.url}/metrics").status_code == 401  # revenue needs a key
    text = httpx.get(f"{srv.url}/metrics", headers={"Authorization": "Bearer sk-rich"}).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    out_rev = samples[("deepserve_revenue_total",
                       (("model", MODEL), ("token_class", "output")))]
    hit_tokens = samples[("deepserve_billed_tokens_total",
                          (("model", MODEL), ("token_class", "cache_hit")))]
    assert out_rev > 0 and hit_tokens >= 160


def test_sigkill_leaves_every_completed_request(tmp_path):
    ledger = tmp_path / "ledger.db"
    srv = ServerProcess("--ledger", str(ledger), log_dir=tmp_path)
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
    done = 0
    for i in range(5):
        client.completions.create(model=MODEL, prompt=f"Request {i}", max_tokens=3)
        done += 1
    srv.stop(signal.SIGKILL)
    assert srv.proc.returncode == -signal.SIGKILL
    conn = sqlite3.connect(ledger)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == done
    (stop,) = conn.execute("SELECT stop_ts FROM replicas").fetchone()
    assert stop is None  # died without a clean stop; uptime comes from its heartbeat
    conn.close()
