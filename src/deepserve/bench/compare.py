"""Side-by-side runs: deepserve and llama.cpp servers on free loopback ports with the same
GGUF and workload, plus HF transformers' offline `generate` at batch = concurrency."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from deepserve.bench.loadgen import LoadConfig, results_to_json, run_load, summarize_run
from deepserve.bench.workloads import BenchRequest

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class Managed:
    """A server subprocess that is stopped on exit, with its log kept for errors."""

    def __init__(self, name: str, cmd: list[str], port: int, log_dir: Path,
                 health: str = "/v1/models", timeout: float = 300) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: see {self.log_path}")
            try:
                if httpx.get(self.url + health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{name} did not start in {timeout}s: see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def start_deepserve(model: Path, threads: int, max_num_seqs: int, log_dir: Path) -> Managed:
    port = free_port()
    cmd = [sys.executable, "-m", "deepserve.cli", "serve", "--model", str(model), "--port",
           str(port), "--num-threads", str(threads), "--max-num-seqs", str(max_num_seqs),
           "--kv-cache-memory", "1GiB", "--served-model-name", "bench"]
    return Managed("deepserve", cmd, port, log_dir)


def start_llamacpp(model: Path, threads: int, ctx: int, log_dir: Path) -> Managed:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host",
           "127.0.0.1", "--port", str(port), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--n_ctx", str(ctx), "--model_alias", "bench",
           # Its default cuts a running stream short when a new request arrives.
           "--interrupt_requests", "False"]
    return Managed("llama.cpp", cmd, port, log_dir)


def run_transformers(model: Path, requests: list[BenchRequest], batch: int,
                     threads: int) -> dict[str, Any]:
    """HF transformers `generate` (bf16, static batches of `batch`), the offline baseline."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(model.parent), gguf_file=model.name)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    hf = AutoModelForCausalLM.from_pretrained(str(model.parent), gguf_file=model.name,
                                              dtype=torch.bfloat16).eval()
    out_tokens = 0
    in_tokens = 0
    latencies = []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(requests), batch):
            group = requests[i:i + batch]
            enc = tok([r.prompt or "" for r in group], return_tensors="pt", padding=True)
            n_new = max(r.max_tokens for r in group)
            t0 = time.perf_counter()
            gen = hf.generate(**enc, max_new_tokens=n_new, min_new_tokens=n_new,
                              do_sample=False, pad_token_id=tok.pad_token_id)
            latencies.append(time.perf_counter() - t0)
            out_tokens += (gen.shape[1] - enc.input_ids.shape[1]) * len(group)
            in_tokens += int(enc.attention_mask.sum())
    wall = time.perf_counter() - start
    nan = float("nan")
    pct = {"mean": nan, "p50": nan, "p90": nan, "p95": nan, "p99": nan}
    from deepserve.bench.stats import summarize

    return {"meta": {"label": f"transformers {version('transformers')} (offline generate, "
                     f"batch {batch}, {threads} threads)", "concurrency": batch},
            "summary": {"requests": len(requests), "completed": len(requests), "errors": 0,
                        "duration_s": wall, "request_throughput": len(requests) / wall,
                        "output_throughput": out_tokens / wall,
                        "total_token_throughput": (in_tokens + out_tokens) / wall,
                        "ttft_ms": pct, "tpot_ms": pct, "itl_ms": pct,
                        "e2e_ms": {k: v * 1000 for k, v in summarize(latencies).items()},
                        "goodput_requests_per_s": nan},
            "requests": []}


def run_server_system(server: Managed, label: str, requests: list[BenchRequest],
                      concurrency: int, ignore_eos: bool) -> dict[str, Any]:
    cfg = LoadConfig(base_url=server.url, model="bench", concurrency=concurrency, warmup=1,
                     ignore_eos=ignore_eos)
    results, wall, _ = asyncio.run(run_load(cfg, requests))
    return {"meta": {"label": label, "concurrency": concurrency, "base_url": server.url},
            "summary": summarize_run(results, wall), "requests": results_to_json(results)}


def compare_systems(model: Path, requests_for: Any, concurrencies: list[int],
                    systems: list[str], threads: int, log_dir: Path) -> list[dict[str, Any]]:
    """Run every system at every concurrency on the same requests; returns the runs."""
    runs: list[dict[str, Any]] = []
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if "deepserve" in systems:
        server = start_deepserve(model, threads, max(concurrencies), log_dir)
        try:
            for c in concurrencies:
                runs.append(run_server_system(
                    server, f"deepserve {version('deepserve')} ({threads} threads)",
                    requests_for(c), c, ignore_eos=True))
                logger.info("deepserve c=%d: %.1f out tok/s", c,
                            runs[-1]["summary"]["output_throughput"])
        finally:
            server.stop()
    if "llamacpp" in systems:
        if version("llama-cpp-python") == "not installed":
            logger.warning("llama-cpp-python is not installed (make bench-deps); skipping")
        else:
            server = start_llamacpp(model, threads, 4096, log_dir)
            try:
                for c in concurrencies:
                    runs.append(run_server_system(
                        server, f"llama.cpp (llama-cpp-python {version('llama-cpp-python')} "
                        f"server, {threads} threads)", requests_for(c), c, ignore_eos=True))
                    logger.info("llama.cpp c=%d: %.1f out tok/s", c,
                                runs[-1]["summary"]["output_throughput"])
            finally:
                server.stop()
    if "transformers" in systems:
        for c in concurrencies:
            runs.append(run_transformers(model, requests_for(c), c, threads))
            logger.info("transformers batch=%d: %.1f out tok/s", c,
                        runs[-1]["summary"]["output_throughput"])
    return runs
