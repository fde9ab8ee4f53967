"""Launch to ready: start ``deepserve serve`` as ``make serve`` does (any extra server
arguments after ``--``), time it from launch to ``/health`` answering 200, stop it, and
repeat. Prints each start with the engine's own load time and resident memory (from its
start-up log line). Kernels and the tokenizer cache should exist already (one start
makes both); nothing else should run.

    .venv/bin/python benchmarks/startup.py --runs 5
    DEEPSERVE_TOKENIZER=transformers .venv/bin/python benchmarks/startup.py --runs 3
    .venv/bin/python benchmarks/startup.py --runs 3 -- --model build/smollm2-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def one_start(port: int, extra: list[str]) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "deepserve.cli", "serve", "--port", str(port), *extra]
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    sys.exit(f"server exited with {proc.returncode}:\n{log.read()[-2000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health",
                                                timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                time.sleep(0.02)
            ready = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait()
        log.seek(0)
        text = log.read()
    loaded = re.search(r"loaded .*? in ([\d.]+s)", text)
    rss = re.search(r"resident memory (\d+ MiB)", text)
    return ready, (f"engine {loaded.group(1) if loaded else '?'}, "
                   f"resident {rss.group(1) if rss else '?'} after load")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--port", type=int, default=8977)
    ap.add_argument("extra", nargs="*", help="server arguments (after --)")
    args = ap.parse_args()
    times = []
    for i in range(args.runs):
        ready, detail = one_start(args.port, args.extra)
        times.append(ready)
        print(f"start {i + 1}: ready in {ready:.2f} s ({detail})", flush=True)
    print(f"launch to ready: median {statistics.median(times):.2f} s, "
          f"min {min(times):.2f}, max {max(times):.2f} over {len(times)} starts")


if __name__ == "__main__":
    main()
