"""Fair sharing between API keys: a light key's time to first token beside a hog key.

One server with two keys. The light key sends ``--requests`` short chat requests one
after the other (streamed, ``max_tokens`` 8) and the time to the first content token of
each is taken. First alone, then while the hog key streams one request with ``n``
answers of ``--hog-tokens`` tokens each (``ignore_eos``), which alone fills the batch
twice over. Reported: the light key's TTFT p50 / p99 / max in both runs.

    .venv/bin/python benchmarks/fairness.py            # n=128, 400 tokens, 20 requests
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_vs_peers import wait_ready

KEYS = '[[keys]]\nid = "hog"\nkey = "sk-hog"\n\n[[keys]]\nid = "light"\nkey = "sk-light"\n'


def ttfts(url: str, count: int) -> list[float]:
    out = []
    for i in range(count):
        t0 = time.perf_counter()
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=600,
                          headers={"Authorization": "Bearer sk-light"},
                          json={"messages": [{"role": "user", "content": f"Say hi ({i})"}],
                                "max_tokens": 8, "stream": True}) as r:
            first = None
            for line in r.iter_lines():
                if first is None and line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        first = time.perf_counter() - t0
            out.append(first if first is not None else time.perf_counter() - t0)
    return out


def summary(values: list[float]) -> str:
    v = sorted(values)
    p99 = v[min(len(v) - 1, round(0.99 * (len(v) - 1)))]
    return (f"p50 {v[len(v) // 2] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
            f"max {v[-1] * 1000:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--hog-tokens", type=int, default=400)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--port", type=int, default=8319)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        keys = Path(d) / "keys.toml"
        keys.write_text(KEYS)
        url = f"http://127.0.0.1:{args.port}"
        proc = subprocess.Popen([sys.executable, "-m", "deepserve.cli", "serve", "--port",
                                 str(args.port), "--api-keys", str(keys)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(url, proc)
            ttfts(url, 3)  # warm
            alone = ttfts(url, args.requests)
            print(f"light key alone: {summary(alone)}")
            started = threading.Event()
            stop = threading.Event()
            hog_chunks = [0]

            def hog() -> None:
                with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=3600,
                                  headers={"Authorization": "Bearer sk-hog"},
                                  json={"messages": [{"role": "user",
                                                      "content": "Tell a long story."}],
                                        "n": args.n, "max_tokens": args.hog_tokens,
                                        "ignore_eos": True, "stream": True}) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            hog_chunks[0] += 1
                            if hog_chunks[0] > args.n:
                                started.set()
                        if stop.is_set():
                            return

            t = threading.Thread(target=hog, daemon=True)
            t.start()
            started.wait(600)
            beside = ttfts(url, args.requests)
            finished_early = t.is_alive()
            stop.set()
            print(f"light key beside a hog (n={args.n}, {args.hog_tokens} tokens each): "
                  f"{summary(beside)}; the hog was still generating: {finished_early}")
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
