"""Revenue, cost and cost-profit margin from a usage ledger, the way the DeepSeek-V3/R1
overview reports a day of its service: tokens by class, revenue at list price and after
discounts, cost as accelerator-hours times an hourly price, and the margin.

The ledger is a SQLite file or a PostgreSQL database shared by a fleet; the cost is
the fleet's: every replica that wrote to the ledger recorded its uptime, and each
replica-hour is priced at the replica's own ``--hourly-cost`` when it gave one, else at
``--gpu-hour-cost`` per accelerator."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deepserve.billing.ledger_db import LedgerDB, open_db

GROUPS = {"model": "model", "key": "COALESCE(key_id, '-')", "tier": "COALESCE(tier, '-')",
          "hour": None}  # the start of the hour: the backend's own expression


def parse_time(value: str | None) -> float | None:
    """ISO time (UTC when no zone) or epoch seconds."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()


def _token_rows(db: LedgerDB, since: float, until: float,
                group: str | None) -> list[dict[str, Any]]:
    key = (GROUPS[group] or db.hour_expr) if group else "'all'"
    sql = (f"SELECT {key} AS grp, COUNT(*) AS requests, SUM(prompt_tokens) AS prompt, "
           "SUM(cache_hit_tokens) AS hit, SUM(cache_miss_tokens) AS miss, "
           "SUM(completion_tokens) AS output, SUM(list_cost) AS list_revenue, "
           "SUM(cost) AS revenue FROM usage WHERE start_ts >= ? AND start_ts < ? "
           "GROUP BY grp ORDER BY grp")
    rows = []
    for grp, req, prompt, hit, miss, out, lrev, rev in db.query(sql, (since, until)):
        prompt, hit = int(prompt or 0), int(hit or 0)
        rows.append({"group": int(grp) if group == "hour" else grp, "requests": int(req),
                     "prompt_tokens": prompt,
                     "cache_hit_tokens": hit, "cache_miss_tokens": int(miss or 0),
                     "output_tokens": int(out or 0),
                     "cache_hit_rate": hit / prompt if prompt else 0.0,
                     "theoretical_revenue": float(lrev or 0.0),
                     "revenue": float(rev or 0.0)})
    return rows


def fleet_hours(db: LedgerDB, since: float, until: float,
                gpu_hour_cost: float) -> tuple[float, float, int]:
    """(accelerator-hours, their cost, replicas) of every replica's uptime inside the
    period. A replica that gave ``--hourly-cost`` costs that per hour; the others cost
    ``gpu_hour_cost`` per accelerator-hour. A replica that died without a stop record
    counts up to its last heartbeat."""
    hours = cost = 0.0
    n = 0
    for start, last, stop, acc, hourly in db.query(
            "SELECT start_ts, last_seen_ts, stop_ts, accelerators, hourly_cost "
            "FROM replicas"):
        end = stop if stop is not None else last
        overlap = min(end, until) - max(start, since)
        if overlap > 0:
            n += 1
            h = overlap / 3600
            hours += h * (acc if acc is not None else 1)
            cost += h * hourly if hourly else h * (acc if acc is not None else 1) * \
                gpu_hour_cost
    return hours, cost, n


def accelerator_hours(db: LedgerDB, since: float, until: float) -> float:
    """Sum over replicas of (uptime inside the period) x accelerators, in hours."""
    return fleet_hours(db, since, until, 0.0)[0]


def build_report(ledger: str | Path, since: str | None = None, until: str | None = None,
                 by: str | None = None, gpu_hour_cost: float = 2.0,
                 node_hours: float | None = None, gpus_per_node: int = 8) -> dict[str, Any]:
    """Compute the report; ``node_hours`` (x ``gpus_per_node``) overrides replica uptime."""
    if by is not None and by not in GROUPS:
        raise ValueError(f"--by must be one of {', '.join(GROUPS)}")
    db = open_db(ledger)
    try:
        lo = parse_time(since) or 0.0
        hi = parse_time(until) or float("inf")
        (total,) = _token_rows(db, lo, hi, None) or [_empty()]
        replicas = 0
        if node_hours is not None:
            acc_hours = node_hours * gpus_per_node
            cost = acc_hours * gpu_hour_cost
            basis = f"{node_hours:g} node-hours x {gpus_per_node} GPUs"
        else:
            ((last,),) = db.query("SELECT MAX(end_ts) FROM usage")
            acc_hours, cost, replicas = fleet_hours(
                db, lo, hi if hi != float("inf") else max(last or 0, _now()), gpu_hour_cost)
            basis = f"uptime of {replicas} replicas in the ledger"
        total |= _money(total, cost)
        groups = []
        if by:
            for row in _token_rows(db, lo, hi, by):
                if by == "hour":
                    row["group"] = datetime.fromtimestamp(row["group"], UTC).strftime(
                        "%Y-%m-%d %H:00")
                    h0 = parse_time(row["group"].replace(" ", "T") + ":00") or 0.0
                    hour_cost = (fleet_hours(db, h0, h0 + 3600, gpu_hour_cost)[1]
                                 if node_hours is None else cost / 24)
                    row |= _money(row, hour_cost)
                groups.append(row)
        currency = (db.query("SELECT currency FROM usage LIMIT 1") or [("USD",)])[0][0]
        ((first, last_end),) = db.query("SELECT MIN(start_ts), MAX(end_ts) FROM usage "
                                        "WHERE start_ts >= ? AND start_ts < ?", (lo, hi))
        period_s = ((hi if hi != float("inf") else (last_end or 0)) -
                    (lo if since is not None else (first or 0)))
    finally:
        db.close()
    return {"period": {"since": since, "until": until}, "period_seconds": max(0.0, period_s),
            "currency": currency,
            "cost_basis": basis, "accelerator_hours": acc_hours, "replicas": replicas,
            "gpu_hour_cost": gpu_hour_cost, "total": total, "by": by, "groups": groups}


def _now() -> float:
    return datetime.now(UTC).timestamp()


def _empty() -> dict[str, Any]:
    return {"group": "all", "requests": 0, "prompt_tokens": 0, "cache_hit_tokens": 0,
            "cache_miss_tokens": 0, "output_tokens": 0, "cache_hit_rate": 0.0,
            "theoretical_revenue": 0.0, "revenue": 0.0}


def _money(row: dict[str, Any], cost: float) -> dict[str, Any]:
    def margin(revenue: float) -> float | None:
        return (revenue - cost) / cost if cost > 0 else None

    return {"cost": cost, "profit": row["revenue"] - cost,
            "theoretical_profit": row["theoretical_revenue"] - cost,
            "margin": margin(row["revenue"]),
            "theoretical_margin": margin(row["theoretical_revenue"])}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _tok(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def to_markdown(rep: dict[str, Any]) -> str:
    t = rep["total"]
    c = rep["currency"]
    lines = [
        f"# Cost and margin ({rep['period']['since'] or 'start'} to "
        f"{rep['period']['until'] or 'now'})", "",
        "| figure | value |", "|---|---:|",
        f"| requests | {t['requests']:,} |",
        f"| input tokens | {_tok(t['prompt_tokens'])} |",
        f"| of which cache hit | {_tok(t['cache_hit_tokens'])} "
        f"({_pct(t['cache_hit_rate'])}) |",
        f"| of which cache miss | {_tok(t['cache_miss_tokens'])} |",
        f"| output tokens | {_tok(t['output_tokens'])} |",
        f"| theoretical revenue (list price) | {t['theoretical_revenue']:,.2f} {c} |",
        f"| actual revenue (after discounts) | {t['revenue']:,.2f} {c} |",
        f"| cost ({rep['accelerator_hours']:,.2f} accelerator-hours, {rep['cost_basis']}; "
        f"{rep['gpu_hour_cost']:g} {c} per accelerator-hour where a replica gave no "
        f"--hourly-cost) | {t['cost']:,.2f} {c} |",
        f"| profit (actual) | {t['profit']:,.2f} {c} |",
        f"| cost-profit margin (theoretical) | {_pct(t['theoretical_margin'])} |",
        f"| cost-profit margin (actual) | {_pct(t['margin'])} |",
    ]
    if rep["groups"]:
        lines += ["", f"## By {rep['by']}", "",
                  "| " + rep["by"] + " | requests | input | cache hit | output | "
                  "theoretical revenue | revenue |" +
                  (" cost | margin |" if rep["by"] == "hour" else ""),
                  "|---|---:|---:|---:|---:|---:|---:|" +
                  ("---:|---:|" if rep["by"] == "hour" else "")]
        for g in rep["groups"]:
            extra = (f" {g['cost']:,.4f} | {_pct(g['margin'])} |" if rep["by"] == "hour"
                     else "")
            lines.append(f"| {g['group']} | {g['requests']:,} | {_tok(g['prompt_tokens'])} | "
                         f"{_pct(g['cache_hit_rate'])} | {_tok(g['output_tokens'])} | "
                         f"{g['theoretical_revenue']:,.4f} | {g['revenue']:,.4f} |{extra}")
    return "\n".join(lines)


def to_csv(rep: dict[str, Any]) -> str:
    rows = rep["groups"] or [rep["total"]]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_json(rep: dict[str, Any]) -> str:
    return json.dumps(rep, indent=2, default=str)


def plot_hourly(ledger: str | Path, path: str | Path, gpu_hour_cost: float,
                since: str | None = None, until: str | None = None) -> None:
    """Per-hour tokens by class (bars) with revenue and cost (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = build_report(ledger, since, until, by="hour", gpu_hour_cost=gpu_hour_cost)
    hours = [g["group"][5:] for g in rep["groups"]]
    hit = [g["cache_hit_tokens"] for g in rep["groups"]]
    miss = [g["cache_miss_tokens"] for g in rep["groups"]]
    out = [g["output_tokens"] for g in rep["groups"]]
    fig, ax = plt.subplots(figsize=(10, 4))
    x = range(len(hours))
    ax.bar(x, hit, label="input, cache hit")
    ax.bar(x, miss, bottom=hit, label="input, cache miss")
    ax.bar(x, out, bottom=[a + b for a, b in zip(hit, miss, strict=True)], label="output")
    ax.set_xticks(list(x), hours, rotation=45, ha="right")
    ax.set_ylabel("tokens")
    ax2 = ax.twinx()
    ax2.plot(x, [g["revenue"] for g in rep["groups"]], "k-o", label="revenue")
    ax2.plot(x, [g["cost"] for g in rep["groups"]], "r--s", label="cost")
    ax2.set_ylabel(rep["currency"])
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax.set_title("Tokens, revenue and cost per hour (UTC)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
