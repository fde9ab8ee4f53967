"""Daily usage from the ledger, for the tenant API (``GET /v1/usage``: one key's own) and
the admin API (``GET /admin/spend``: per key or per team). Days are UTC days."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from deepserve.billing.ledger_db import LedgerDB

DAY_S = 86400


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def _bucket(row: tuple[Any, ...]) -> dict[str, Any]:
    day, requests, hit, miss, out, cost = row
    return {"date": _day(float(day)), "requests": int(requests),
            "input_cache_hit_tokens": int(hit or 0), "input_cache_miss_tokens": int(miss or 0),
            "output_tokens": int(out or 0), "cost": round(float(cost or 0.0), 10)}


def since_days(days: int) -> float:
    """The start of the UTC day ``days - 1`` days before today."""
    today = int(time.time() // DAY_S) * DAY_S
    return float(today - (days - 1) * DAY_S)


_SUMS = ("COUNT(*), SUM(cache_hit_tokens), SUM(cache_miss_tokens), SUM(completion_tokens), "
         "SUM(cost)")


def daily(db: LedgerDB, key_id: str | None, days: int, every_key: bool = False
          ) -> list[dict[str, Any]]:
    """One key's daily buckets (``key_id`` None: requests made without a key), or every
    key's together with ``every_key``."""
    where, args = ("", ()) if every_key else (
        ("AND key_id = ? ", (key_id,)) if key_id is not None else ("AND key_id IS NULL ", ()))
    rows = db.query(f"SELECT {db.day_expr} AS day, {_SUMS} FROM usage WHERE start_ts >= ? "
                    f"{where}GROUP BY day ORDER BY day", (since_days(days), *args))
    return [_bucket(r) for r in rows]


def spend_by(db: LedgerDB, group: str, days: int) -> list[dict[str, Any]]:
    """Daily buckets per key or per team (the team a key has now), busiest first."""
    col = "u.key_id" if group == "key" else "k.team"
    rows = db.query(f"SELECT {db.day_expr} AS day, {col} AS grp, {_SUMS} FROM usage u "
                    "LEFT JOIN api_keys k ON u.key_id = k.key_id WHERE start_ts >= ? "
                    "GROUP BY day, grp ORDER BY day", (since_days(days),))
    series: dict[str | None, list[dict[str, Any]]] = {}
    for day, grp, *sums in rows:
        series.setdefault(grp, []).append(_bucket((day, *sums)))
    out = [{"name": name, "cost": round(sum(b["cost"] for b in points), 10),
            "requests": sum(b["requests"] for b in points), "daily": points}
           for name, points in series.items()]
    return sorted(out, key=lambda s: -s["cost"])
