"""Gateway routing policies on one workload: all-lite, all-pro, cascade and SLO routing.

Starts two deepserve backends (lite: the default model in bf16; pro: the same model at
full precision, float32) and a gateway whose pricing makes lite cheaper, then sends the
shipped chat prompt set through each policy and reports cost per 1K requests (from the
gateway's revenue counters, both cascade attempts included), P50/P99 end-to-end latency
and the share escalated.

    .venv/bin/python benchmarks/gateway_routing.py --num-requests 40 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from deepserve.bench.stats import summarize
from deepserve.bench.workloads import chat_workload

PRICING = """
currency = "USD"
[models.lite]
cache_hit_input = 0.035
cache_miss_input = 0.14
output = 0.55
[models.pro]
cache_hit_input = 0.14
cache_miss_input = 0.55
output = 2.19
"""

GATEWAY = """
[gateway]
port = {port}
pricing = "{pricing}"
health_interval_s = 0.5
[tiers.lite]
models = ["lite"]
backends = ["{lite}"]
[tiers.pro]
models = ["pro"]
backends = ["{pro}"]
[routing]
cascade_min_logprob = {threshold}
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, path: str, proc: subprocess.Popen) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited")
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not start")


def revenue(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "deepserve_revenue_total")


def escalations(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "deepserve_gateway_escalations_total")


async def run(url: str, reqs, concurrency: int, model: str, headers: dict[str, str]):
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tiers: list[str] = []
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(r) -> None:
            async with sem:
                t0 = time.perf_counter()
                resp = await client.post(url + "/v1/chat/completions", headers=headers,
                                         json={"model": model, "messages": r.messages,
                                               "max_tokens": r.max_tokens, "temperature": 0})
                resp.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                tiers.append(resp.headers["x-deepserve-tier"])

        await asyncio.gather(*(one(r) for r in reqs))
    return latencies, tiers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threshold", type=float, default=-1.0,
                    help="cascade: escalate when lite's mean token logprob is below this")
    ap.add_argument("--slo-ms", type=float, default=150.0)
    ap.add_argument("--threads-per-backend", type=int, default=1)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp())
    (tmp / "pricing.toml").write_text(PRICING)
    procs = []
    try:
        urls = {}
        for name, extra in (("lite", []), ("pro", ["--dtype", "float32"])):
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "deepserve.cli", "serve", "--port", str(port),
                 "--served-model-name", name, "--kv-cache-memory", "256MiB",
                 # One core each: two busy torch processes on the same two cores would
                 # fight over them (OpenMP threads spin), which no deployment would do.
                 "--num-threads", str(args.threads_per_backend), *extra],
                stdout=open(tmp / f"{name}.log", "w"), stderr=subprocess.STDOUT))
        for name, p in zip(urls, procs, strict=True):
            wait(urls[name], "/health", p)
        gport = free_port()
        (tmp / "gw.toml").write_text(GATEWAY.format(port=gport, pricing=tmp / "pricing.toml",
                                                    lite=urls["lite"], pro=urls["pro"],
                                                    threshold=args.threshold))
        gw = subprocess.Popen([sys.executable, "-m", "deepserve.cli", "gateway", "--config",
                               str(tmp / "gw.toml")], stdout=open(tmp / "gw.log", "w"),
                              stderr=subprocess.STDOUT)
        procs.append(gw)
        gurl = f"http://127.0.0.1:{gport}"
        wait(gurl, "/v1/models", gw)
        reqs = [r for r in chat_workload(args.num_requests, args.max_tokens, seed=7)]
        for r in reqs:
            r.max_tokens = args.max_tokens
        # Warm both tiers so the SLO policy has latency samples from the backends' metrics.
        asyncio.run(run(gurl, reqs[:4], 2, "lite", {}))
        asyncio.run(run(gurl, reqs[:4], 2, "pro", {}))
        time.sleep(1.5)
        rows = []
        runs = [("all-lite", "lite", {}), ("all-pro", "pro", {}),
                ("cascade", "auto", {"x-deepserve-route": "cascade"}),
                (f"slo {args.slo_ms:g} ms", "auto",
                 {"x-deepserve-route": "slo", "x-deepserve-slo-ms": str(args.slo_ms)})]
        for label, model, headers in runs:
            r0, e0 = revenue(gurl), escalations(gurl)
            t0 = time.perf_counter()
            lat, tiers = asyncio.run(run(gurl, reqs, args.concurrency, model, headers))
            wall = time.perf_counter() - t0
            cost = revenue(gurl) - r0
            esc = escalations(gurl) - e0
            s = summarize(lat)
            rows.append((label, cost / len(reqs) * 1000, s["p50"] * 1000, s["p99"] * 1000,
                         esc / len(reqs), tiers.count("pro") / len(tiers), len(reqs) / wall))
        print(f"\n{args.num_requests} chat requests, max_tokens {args.max_tokens}, "
              f"concurrency {args.concurrency}; cascade threshold {args.threshold}\n")
        print("| policy | cost per 1K requests (USD) | E2E p50 ms | E2E p99 ms | escalated |"
              " answered by pro | req/s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, cost, p50, p99, esc, pro, rps in rows:
            print(f"| {label} | {cost:.4f} | {p50:.0f} | {p99:.0f} | {esc:.0%} | {pro:.0%} |"
                  f" {rps:.2f} |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


if __name__ == "__main__":
    main()
