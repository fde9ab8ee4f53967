"""The fleet's costs, one run: how many usage records per second the ledger commits
(SQLite file and PostgreSQL), and how much latency the gateway adds in front of a
backend, with limits kept in the process and with limits shared through Redis.

PostgreSQL and Redis are started on loopback from the system's packages (as the tests
do, `make services` installs them) unless --postgres / --redis name running ones.

    .venv/bin/python benchmarks/fleet.py --records 2000 --requests 300

Ledger: ``Ledger.record`` for N records, then wait for all of them; each record is its
own committed transaction (a response waits for its commit), from one writer thread.
Gateway: N rounds of sequential non-streaming completions (max_tokens=1), each round
sending one request straight to a ``deepserve serve`` backend, one through a gateway
(API key, a per-key RPM limit, the PostgreSQL ledger) with limits in the process and
one through a second gateway with --redis; the paths are interleaved so all three see
the same machine. Added = gateway percentile - direct percentile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from deepserve.billing.ledger import Ledger, UsageRecord


def record(i: int) -> UsageRecord:
    now = time.time()
    return UsageRecord(f"bench-{now}-{i}", "team", "m", "lite", 100, 40, 60, 20, now,
                       now + 0.05, now + 0.2, "stop", 0.14, 0.55, 2.19, 1.0, "", "USD",
                       1e-4, 1e-4)


def ledger_rate(url: str, n: int) -> float:
    ledger = Ledger(url, "bench", "cpu")
    for i in range(50):  # warm the connection and the table
        ledger.record(record(-i - 1)).result(30)
    start = time.perf_counter()
    futures = [ledger.record(record(i)) for i in range(n)]
    for f in futures:
        f.result(300)
    rate = n / (time.perf_counter() - start)
    ledger.close()
    return rate


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if q < 100 else max(xs)


def timed(paths: dict[str, tuple[str, dict[str, str]]], n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in paths}
    with httpx.Client(timeout=60) as client:
        for i in range(n + 10):
            for name, (url, headers) in paths.items():
                t = time.perf_counter()
                r = client.post(f"{url}/v1/completions", headers=headers, json={
                    "model": "lite", "prompt": f"Hello {i % 7}", "max_tokens": 1})
                r.raise_for_status()
                if i >= 10:  # the first rounds warm connections and caches
                    out[name].append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--postgres", default=None, help="a running server's URL")
    ap.add_argument("--redis", default=None, help="a running server's URL")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    from server_utils import ServerProcess, free_port, wait_healthy
    from services import Postgres, Redis

    tmp = Path(tempfile.mkdtemp(prefix="deepserve-fleet-bench-"))
    started = []
    if args.postgres is None:
        pg = Postgres()
        started.append(pg)
        args.postgres = pg.url
    if args.redis is None:
        rd = Redis(tmp / "redis")
        started.append(rd)
        args.redis = rd.url
    results: dict[str, object] = {"records": args.records, "requests": args.requests}
    try:
        results["ledger_records_per_s"] = {
            "sqlite": round(ledger_rate(str(tmp / "ledger.db"), args.records)),
            "postgresql": round(ledger_rate(args.postgres, args.records))}
        print("ledger records/s:", results["ledger_records_per_s"], flush=True)
        srv = ServerProcess("--served-model-name", "lite", "--num-threads", "1",
                            log_dir=tmp)
        (tmp / "keys.toml").write_text('[[keys]]\nid = "team"\nkey = "sk-team"\n')
        paths = {"direct": (srv.url, {})}
        gateways = []
        for name, extra in (("gateway, local limits", ""),
                            ("gateway, Redis limits", f'redis = "{args.redis}"\n')):
            port = free_port()
            cfg = tmp / f"gw-{port}.toml"
            cfg.write_text(f'[gateway]\nport = {port}\nrate_limit_rpm = 1000000\n'
                           f'api_keys = "{tmp / "keys.toml"}"\nledger = "{args.postgres}"\n'
                           f'{extra}[tiers.lite]\nmodels = ["lite"]\n'
                           f'backends = ["{srv.url}"]\n')
            gw = subprocess.Popen([sys.executable, "-m", "deepserve.cli", "gateway",
                                   "--config", str(cfg)], stdout=open(tmp / "gw.log", "a"),
                                  stderr=subprocess.STDOUT)
            assert wait_healthy(f"http://127.0.0.1:{port}", gw, 60), "gateway did not start"
            gateways.append(gw)
            paths[name] = (f"http://127.0.0.1:{port}", {"Authorization": "Bearer sk-team"})
        lat = timed(paths, args.requests)
        for gw in gateways:
            gw.terminate()
            gw.wait(30)
        srv.stop()
        base = {q: pct(lat["direct"], q) for q in (50, 99)}
        results["latency_ms"] = {
            name: {"p50": round(pct(xs, 50), 2), "p99": round(pct(xs, 99), 2),
                   "added_p50": round(pct(xs, 50) - base[50], 2) if name != "direct" else 0,
                   "added_p99": round(pct(xs, 99) - base[99], 2) if name != "direct" else 0}
            for name, xs in lat.items()}
    finally:
        for s in started:
            s.stop()
    results["when"] = datetime.now(UTC).isoformat(timespec="seconds")
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
