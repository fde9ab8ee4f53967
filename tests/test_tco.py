"""Total cost of ownership from a ledger's traffic (`deepserve report --tco`), with the
example file that compares two owned 8 x A100 servers with cloud replicas."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepserve.billing.ledger import Ledger, UsageRecord

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "tco" / \
    "two-a100-servers-vs-cloud.toml"


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepserve.cli", "report", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def day_ledger(tmp_path) -> Path:
    """One day of traffic: 1,000 requests of 500 output tokens, evenly spread."""
    path = tmp_path / "day.db"
    ledger = Ledger(path, "m", "cpu")
    t0 = time.time() - 86400
    for i in range(1000):
        ts = t0 + i * 86.4
        ledger.record(UsageRecord(f"r{i}", "k", "m", "lite", 100, 0, 100, 500, ts, ts + 0.1,
                                  ts + 1, "stop", 0.14, 0.55, 2.19, 1, "", "USD", 1e-3, 1e-3))
    ledger.close()
    return path


def test_tco_against_a_hand_computed_day(day_ledger, tmp_path):
    png = tmp_path / "tco.png"
    out = report("--ledger", str(day_ledger), "--tco", str(EXAMPLE), "--tco-plot", str(png),
                 "--format", "json")
    assert out.returncode == 0, out.stderr
    tco = json.loads(out.stdout)["tco"]
    assert tco["ledger"]["output_tokens_per_request"] == pytest.approx(500)
    assert tco["ledger"]["requests_per_day"] == pytest.approx(1000, rel=0.01)
    at = {a["volume"]: a for a in tco["at"]}
    # 500K/day x 500 tokens over 6000 tokens/s x 86400 s = 0.482 of one server busy.
    busy = 500_000 * 500 / (6000 * 86400)
    hours = -(-24 * busy // 0.7)  # replica-hours, whole hours, 70% busy
    assert at[500_000]["cloud"] == pytest.approx(hours * 32.77)
    power = 2 * 6.5 * 24 * 0.12 * (0.3 + 0.7 * busy / 2)
    owned = 2 * 200_000 / (4 * 365) + 60_000 / 365 + power
    assert at[500_000]["on_prem"] == pytest.approx(owned)
    # Renting wins at 100K a day, owning at 500K: the break-even lies between.
    assert at[100_000]["cloud"] < at[100_000]["on_prem"]
    assert at[500_000]["on_prem"] < at[500_000]["cloud"]
    assert 100_000 < tco["break_even_requests_per_day"] < 500_000
    assert png.read_bytes()[:4] == b"\x89PNG"
    md = report("--ledger", str(day_ledger), "--tco", str(EXAMPLE))
    assert "Break-even:" in md.stdout and "| 500,000 |" in md.stdout
    assert "200,000 USD over 4 years" in md.stdout  # the inputs are stated


def test_a_bad_tco_file_is_named(day_ledger, tmp_path):
    bad = tmp_path / "tco.toml"
    bad.write_text("[cloud]\nhourly_price = 2\n")
    out = report("--ledger", str(day_ledger), "--tco", str(bad))
    assert out.returncode == 2 and "[capacity] needs output_tokens_per_s" in out.stderr
