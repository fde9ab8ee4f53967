"""Serving throughput, load time and resident memory: deepserve (each weight format)
against llama.cpp's own ``llama-server`` with parallel slots and vLLM's CPU build, one
system at a time.

For every system: start the server, time it from launch to ``/health`` answering 200
("load"), run ``deepserve bench serve`` (random 128-token prompts, 128 output tokens,
``ignore_eos``, fresh prompts for each concurrency) at each concurrency, read the
server's peak resident memory (VmHWM) and stop it. Both sides get the same KV capacity
in tokens (``--kv-tokens``) and the same threads. Nothing else should run meanwhile:
llama.cpp's threads spin.

    .venv/bin/python benchmarks/serve_vs_peers.py \\
        --llama-server /path/to/llama-server --systems auto none int8 int4 mixed llama.cpp
    DEEPSERVE_ISA=avx2 .venv/bin/python benchmarks/serve_vs_peers.py ...   # the AVX2 path
    .venv/bin/python benchmarks/serve_vs_peers.py --systems vllm \
        --vllm-python build/vllm-venv/bin/python --vllm-model build/smollm2-hf   # make bench-vllm

``--repeat N`` runs the systems in turn N times (A B A B ...) and prints each pass's
ratio of the first system to each other one: this VM's speed drifts over minutes, and
neighbouring runs compare best.

    .venv/bin/python benchmarks/serve_vs_peers.py --systems auto vllm --concurrency 64 \
        --repeat 3 --vllm-python build/vllm-venv/bin/python --vllm-model build/smollm2-hf

vLLM 0.32 reads no GGUF, so it serves the same weights exported by
``benchmarks/export_hf.py`` (the GGUF dequantized to a safetensors checkpoint) in
bfloat16, with ``VLLM_CPU_KVCACHE_SPACE`` sized to the same KV tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from deepserve.loader.resolve import resolve_model


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError("server did not become ready")


def vllm_preload(vllm_python: str) -> list[str]:
    """What vLLM's CPU docs ask to preload: tcmalloc (Debian's libtcmalloc-minimal4) and
    Intel's OpenMP (the intel-openmp wheel in vLLM's venv), where found."""
    import glob

    venv = Path(vllm_python).absolute().parent.parent  # (not resolved: bin/python links out)
    found = []
    for pattern in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4*",
                    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4*", f"{venv}/lib/libiomp5.so"):
        hits = sorted(glob.glob(pattern))
        if hits and not (found and "tcmalloc" in hits[0] and "tcmalloc" in found[0]):
            found.append(hits[0])
    return found


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) of the server and every process it started (vLLM
    runs its engine in a child), summed: an upper bound when their peaks differ in time."""
    import psutil

    total = 0
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            pass
    return total / 1024 if total else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", nargs="+", default=["auto", "llama.cpp"],
                    help="deepserve --quantization values, and/or llama.cpp, vllm")
    ap.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server")
    ap.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu")
    ap.add_argument("--vllm-model", default=None, help="HF directory from export_hf.py")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=2, help="requests = concurrency x rounds")
    ap.add_argument("--repeat", type=int, default=1,
                    help="passes over --systems, in turn (A B A B ...): the VM drifts over "
                         "minutes, so each pass's ratios compare neighbours")
    ap.add_argument("--out", default="results/serve_vs_peers.json")
    ap.add_argument("--model", default=None,
                    help="a GGUF for deepserve and llama-server (default: the packaged model)")
    args = ap.parse_args()
    gguf = str(resolve_model(args.model)[0])
    port = 8931
    url = f"http://127.0.0.1:{port}"
    rows = []
    for n in range(args.repeat):
        for system in args.systems:
            row = measure(system, args, gguf, url, port)
            row["pass"] = n + 1
            rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"isa": os.environ.get("DEEPSERVE_ISA", "auto"),
                                          "rows": rows}, indent=2))
    cs = args.concurrency
    print("| system | " + " | ".join(f"conc {c}" for c in cs) +
          f" | TPOT p50 at conc {cs[0]} | load to ready | peak RSS |")
    print("|---|" + "---:|" * (len(cs) + 3))
    for r in rows:
        b = r["by_concurrency"]
        name = r["system"] + (f" (pass {r['pass']})" if args.repeat > 1 else "")
        print(f"| {name} | " + " | ".join(f"{b[c]['output_tok_s']}" for c in cs) +
              f" | {b[cs[0]]['tpot_p50_ms']} ms | {r['load_s']} s | {r['peak_rss_mib']} MiB |")
    k = len(args.systems)
    for j in range(1, k) if args.repeat > 1 else []:
        for c in cs:
            ratios = [rows[n * k]["by_concurrency"][c]["output_tok_s"] /
                      rows[n * k + j]["by_concurrency"][c]["output_tok_s"]
                      for n in range(args.repeat)]
            print(f"{args.systems[0]} / {args.systems[j]} at conc {c}: " +
                  " ".join(f"{x:.2f}x" for x in ratios) +
                  f", mean {sum(ratios) / len(ratios):.2f}x")


def measure(system: str, args: argparse.Namespace, gguf: str, url: str, port: int) -> dict:
    """Start one system's server, run every concurrency against it, stop it: its row."""
    if system == "llama.cpp":
        if not args.llama_server:
            sys.exit("--llama-server is needed for the llama.cpp system")
        cmd = [args.llama_server, "-m", gguf, "-t", str(args.threads), "-np",
               str(max(args.concurrency)), "-c", str(args.kv_tokens), "--port", str(port),
               "--host", "127.0.0.1", "--no-webui"]
        label = f"llama.cpp llama-server -np {max(args.concurrency)}"
    elif system == "vllm":
        if not (args.vllm_python and args.vllm_model):
            sys.exit("--vllm-python and --vllm-model are needed for the vllm system")
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
               args.vllm_model, "--served-model-name", "smollm2", "--port", str(port),
               "--host", "127.0.0.1", "--dtype", "bfloat16", "--max-model-len", "2048",
               "--max-num-seqs", str(max(args.concurrency))]
        label = f"vLLM CPU {_vllm_version(args.vllm_python)} (bfloat16)"
    else:
        # KV bytes for kv_tokens tokens in the compute dtype the server will pick
        cmd = [sys.executable, "-m", "deepserve.cli", "serve", "--port", str(port),
               "--model", gguf, "--quantization", system, "--num-threads", str(args.threads),
               "--max-num-seqs", str(max(args.concurrency)),
               "--kv-cache-memory", str(args.kv_tokens * _kv_bytes_per_token(gguf))]
        label = f"deepserve --quantization {system}"
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    env = dict(os.environ)
    if system == "vllm":  # GiB of KV cache: the same tokens as the others, in bf16
        kv_gib = args.kv_tokens * 30 * 2 * 3 * 64 * 2 / 2**30
        env.update(VLLM_CPU_KVCACHE_SPACE=str(max(1, round(kv_gib + 0.49))),
                   OMP_NUM_THREADS=str(args.threads),
                   VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}")
        preload = vllm_preload(args.vllm_python)
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
        print("vLLM preloads:", ", ".join(preload) or "nothing found", flush=True)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        load = wait_ready(url, proc)
        row = {"system": label, "load_s": round(load, 2), "by_concurrency": {}}
        for c in args.concurrency:
            with tempfile.TemporaryDirectory() as out:
                subprocess.run(
                    [sys.executable, "-m", "deepserve.cli", "bench", "serve", "--base-url",
                     url, "--workload", "random", "--input-len", "128", "--output-len",
                     "128", "--ignore-eos", "--concurrency", str(c), "--workload-seed",
                     str(c), "--num-requests",
                     str(max(4, c * args.rounds)), "--warmup", "1", "--out", out],
                    check=True, capture_output=True)
                run = json.loads(next(Path(out).glob("serve-*.json")).read_text())
            s = run["summary"]
            row["by_concurrency"][c] = {
                "output_tok_s": round(s["output_throughput"], 1),
                "tpot_p50_ms": round(s["tpot_ms"]["p50"], 1),
                "ttft_p50_ms": round(s["ttft_ms"]["p50"], 1), "errors": s["errors"]}
            if s["errors"]:  # what went wrong, so a failing peer is not a slow one
                row["by_concurrency"][c]["error_samples"] = s.get("error_samples")
            print(system, c, row["by_concurrency"][c], flush=True)
        row["peak_rss_mib"] = round(peak_rss_mib(proc.pid))
        print(json.dumps(row), flush=True)
        return row
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("log:", log.name)


def _vllm_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


def _kv_bytes_per_token(gguf: str) -> int:
    """Bytes per KV token of this GGUF's model (MLA: its latent) in the dtype
    ``--dtype auto`` picks."""
    import torch

    from deepserve.engine.setup import pick_dtype
    from deepserve.layers.kv_cache import bytes_per_token
    from deepserve.loader.gguf_loader import GGUFCheckpoint

    cfg = GGUFCheckpoint(Path(gguf)).model_config()
    return bytes_per_token(cfg, pick_dtype("auto", torch.device("cpu")), "auto")


if __name__ == "__main__":
    main()
