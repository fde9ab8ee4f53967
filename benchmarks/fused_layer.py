"""One decoder layer per C++ call against the same kernels called one by one: generation
time per token in one process, alternating the two (``llama.FUSED_DECODE``), so the VM's
drift hits both alike.

    .venv/bin/python benchmarks/fused_layer.py --streams 1 8

Prints, per number of streams, the best of ``--reps`` runs of 64 tokens each (the
prefill's share included, the same for both).
"""

from __future__ import annotations

import argparse
import time

from deepserve import LLM, SamplingParams
from deepserve.models import llama


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    llm = LLM(model=args.model, show_progress=False, kv_cache_memory="256MiB",
              enable_prefix_caching=False)
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    for n in args.streams:
        prompts = [f"Tell me a story about dragon number {i}." for i in range(n)]
        best = {True: float("inf"), False: float("inf")}
        for _ in range(args.reps):
            for fused in (True, False):
                llama.FUSED_DECODE = fused
                t0 = time.perf_counter()
                llm.generate(prompts, params)
                best[fused] = min(best[fused], (time.perf_counter() - t0) / args.tokens)
        print(f"{n} streams: one call per layer {best[True] * 1e3:.2f} ms per token, "
              f"kernels one by one {best[False] * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
