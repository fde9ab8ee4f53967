"""Time of a prefill step: ``--prompts`` random prompts of ``--tokens`` tokens each (16 x
128 = one 2048-token step at the default budget) given at once, ``--runs`` times after
two warm waves; prints the fastest and the median step and the page faults the process
took per wave. ``--glibc-defaults`` leaves glibc's heap settings alone
(``engine/malloc.py`` otherwise keeps freed activations in the heap).

    DEEPSERVE_DENSE_COPY=0 .venv/bin/python benchmarks/prefill_step.py
    DEEPSERVE_DENSE_COPY=0 .venv/bin/python benchmarks/prefill_step.py --glibc-defaults
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import time

from deepserve.config import EngineConfig
from deepserve.engine import malloc
from deepserve.engine.llm_engine import LLMEngine
from deepserve.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--model", default=None)
    ap.add_argument("--glibc-defaults", action="store_true")
    ap.add_argument("--kv-cache-dtype", default="auto")
    args = ap.parse_args()
    if args.glibc_defaults:
        malloc._done.append(False)  # as if already decided: no mallopt
    extra = {"model": args.model} if args.model else {}
    extra["kv_cache_dtype"] = args.kv_cache_dtype
    eng = LLMEngine(EngineConfig(enable_prefix_caching=False, **extra), show_progress=False)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0)

    def wave() -> float:
        for _ in range(args.prompts):
            ids = [rng.randrange(100, 49000) for _ in range(args.tokens)]
            eng.add_request(None, None, params, prompt_ids=ids)
        start = time.perf_counter()
        while eng.has_unfinished():
            eng.step()
        return time.perf_counter() - start

    wave(), wave()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = [wave() for _ in range(args.runs)]
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.runs
    print(f"{args.prompts} x {args.tokens} prompt tokens: fastest {min(times) * 1e3:.0f} ms, "
          f"median {statistics.median(times) * 1e3:.0f} ms, {faults:.0f} page faults a wave "
          f"(heap kept: {malloc._done[0]})")


if __name__ == "__main__":
    main()
