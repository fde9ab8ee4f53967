"""Embeddings throughput: deepserve's ``/v1/embeddings`` against llama.cpp's
``llama-server --embeddings`` (mean pooling, L2-normalised, parallel slots), one server
at a time, the same GGUF and threads.

The workload: ``--texts`` inputs built from the bench prompts (each a prompt repeated to
about ``--tokens`` tokens), sent in requests of ``--batch`` inputs by ``--concurrency``
clients. Reported: inputs/s and input tokens/s (the server's own usage counts), and the
cosine between the two servers' vectors for the same inputs (both pool the final
normed hidden states, so it checks that they compute the same thing).

    .venv/bin/python benchmarks/embeddings.py --llama-server build/llama.cpp/bin/llama-server
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_vs_peers import peak_rss_mib, wait_ready

from deepserve.loader.resolve import resolve_model


def texts(n: int, tokens: int, gguf: str) -> list[str]:
    """``n`` inputs of ``tokens`` tokens each (bench prompts repeated, then cut)."""
    from importlib.resources import files

    from deepserve.loader.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(gguf), "gguf")
    prompts = [json.loads(line)["prompt"] for line in
               files("deepserve.bench").joinpath("chat_prompts.jsonl").read_text().splitlines()
               if line.strip()]
    out = []
    for i in range(n):
        p = prompts[i % len(prompts)]
        ids = tok.encode(f"[{i}] " + (p + " ") * (tokens // 4 + 1), add_special_tokens=False)
        out.append(tok.decode(ids[:tokens]))
    return out


def run(url: str, inputs: list[str], batch: int, concurrency: int) -> tuple[float, int,
                                                                             list[list[float]]]:
    chunks = [inputs[i:i + batch] for i in range(0, len(inputs), batch)]
    client = httpx.Client(timeout=600)

    def one(chunk: list[str]) -> tuple[int, list[list[float]]]:
        r = client.post(f"{url}/v1/embeddings", json={"input": chunk,
                                                      "encoding_format": "float"})
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
        body = r.json()
        data = sorted(body["data"], key=lambda d: d["index"])
        return body["usage"]["prompt_tokens"], [d["embedding"] for d in data]

    one(chunks[0])  # warm
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, chunks))
    wall = time.perf_counter() - t0
    return wall, sum(t for t, _ in results), [v for _, vs in results for v in vs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-server", default="build/llama.cpp/bin/llama-server")
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded model)")
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--port", type=int, default=8317)
    ap.add_argument("--shapes", nargs="*", metavar="NxT",
                    help="instead: deepserve alone, one request at a time of N inputs of "
                         "T tokens each (e.g. 1x2000 16x64)")
    args = ap.parse_args()
    gguf = str(resolve_model(args.model)[0])
    if args.shapes:
        return shapes(args, gguf)
    inputs = texts(args.texts, args.tokens, gguf)
    url = f"http://127.0.0.1:{args.port}"
    systems = {
        "deepserve": [sys.executable, "-m", "deepserve.cli", "serve", "--model", gguf,
                      "--port", str(args.port), "--task", "embed", "--num-threads",
                      str(args.threads), "--embedding-pooling", "mean"],
        "llama.cpp": [args.llama_server, "-m", gguf, "--port", str(args.port),
                      "--embeddings", "--pooling", "mean", "-t", str(args.threads),
                      "-np", str(args.concurrency * args.batch), "-c",
                      str(args.concurrency * args.batch * (2 * args.tokens + 64)),
                      "-b", "4096", "-ub", "4096"],
    }
    vectors = {}
    for name, cmd in systems.items():
        if name == "llama.cpp" and not Path(args.llama_server).exists():
            print(f"{name}: {args.llama_server} not found (make bench-peers builds it)")
            continue
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(url, proc)
            wall, tokens, vecs = run(url, inputs, args.batch, args.concurrency)
            vectors[name] = vecs
            print(f"{name}: {len(inputs)} inputs, {tokens} tokens in {wall:.2f} s: "
                  f"{len(inputs) / wall:.1f} inputs/s, {tokens / wall:.0f} tokens/s, "
                  f"peak RSS {peak_rss_mib(proc.pid):.0f} MiB")
        finally:
            proc.terminate()
            proc.wait(30)
    if len(vectors) == 2:
        a, b = vectors["deepserve"], vectors["llama.cpp"]
        cos = [sum(x * y for x, y in zip(u, v, strict=True)) for u, v in zip(a, b, strict=True)]
        print(f"cosine deepserve vs llama.cpp: min {min(cos):.4f}, "
              f"mean {sum(cos) / len(cos):.4f}")


def shapes(args: argparse.Namespace, gguf: str) -> None:
    url = f"http://127.0.0.1:{args.port}"
    proc = subprocess.Popen([sys.executable, "-m", "deepserve.cli", "serve", "--model", gguf,
                             "--port", str(args.port), "--task", "embed", "--num-threads",
                             str(args.threads)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc)
        for shape in ["1x64", *args.shapes]:  # the first warms up
            n, t = (int(x) for x in shape.split("x"))
            wall, tokens, _ = run(url, texts(n, t, gguf), n, 1)
            if shape != "1x64" or "1x64" in args.shapes:
                print(f"{shape}: {tokens} tokens in {wall:.2f} s, {tokens / wall:.0f} tokens/s")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
