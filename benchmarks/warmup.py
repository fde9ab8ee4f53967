"""The first request against steady state, with and without warm-up.

For each setting, start `deepserve serve` (default model), time launch to /health = 200,
then send streaming chat requests: first one alone, then a burst of 16 at once, then
the same again ten times (distinct prompts throughout, so no prefix-cache hits). TTFT
is read from the stream. Steady state = the median of the later singles / bursts.

    .venv/bin/python benchmarks/warmup.py
"""

from __future__ import annotations

import concurrent.futures
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def ttft(url: str, i: int) -> float:
    body = {"messages": [{"role": "user", "content": f"Request {i}: write a short poem "
                          f"about the number {i * 7919 % 1000} and the sea."}],
            "max_tokens": 8, "stream": True}
    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                event = json.loads(line[6:])
                if (event["choices"][0]["delta"].get("content") or ""):
                    return (time.perf_counter() - start) * 1000
    raise RuntimeError("no token came back")


def burst(url: str, base: int, n: int = 16) -> float:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return statistics.median(pool.map(lambda i: ttft(url, base + i), range(n)))


def main() -> None:
    from server_utils import ServerProcess

    out = {}
    for label, flag in (("no warm-up", "--no-warmup"), ("warm-up", "--warmup")):
        t = time.perf_counter()
        srv = ServerProcess(flag, "--num-threads", "2",
                            log_dir=Path(tempfile.mkdtemp(prefix="deepserve-warmup-")))
        ready = time.perf_counter() - t
        first = ttft(srv.url, 0)
        first_burst = burst(srv.url, 1000)
        singles = [ttft(srv.url, 10 + i) for i in range(10)]
        bursts = [burst(srv.url, 2000 + 100 * i) for i in range(5)]
        srv.stop()
        out[label] = {"ready_s": round(ready, 2), "first_ms": round(first, 1),
                      "steady_ms": round(statistics.median(singles), 1),
                      "first_burst16_ms": round(first_burst, 1),
                      "steady_burst16_ms": round(statistics.median(bursts), 1)}
        o = out[label]
        o["first_over_steady"] = round(o["first_ms"] / o["steady_ms"], 2)
        o["burst_over_steady"] = round(o["first_burst16_ms"] / o["steady_burst16_ms"], 2)
        print(label, o, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
