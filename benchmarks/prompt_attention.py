"""Attention of a prefill step's prompt rows, read from the paged KV cache: whole prompts
(16 x 128, 4 x 512, 1 x 2048 tokens) and a 2048-token chunk after 2048 cached tokens, on
AMX tiles (``kernels.paged_decode_attention``'s tile path) and without them (a whole
prompt: one causal SDPA call; a chunk past a cached prefix: the row-by-row kernel).
Milliseconds a call for one layer of the default model's shape (9 query heads, 3 KV
heads, head size 64), and TF/s counting the causal half of the scores.

    .venv/bin/python benchmarks/prompt_attention.py [--heads 9 --kv-heads 3 --head-dim 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from deepserve import kernels


def timed(f, budget: float = 1.0) -> float:
    f()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        f()
        n += 1
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit(f"no CPU kernels here: {kernels.unavailable_reason()}")
    torch.manual_seed(0)
    bs, d, h, kvh = 16, args.head_dim, args.heads, args.kv_heads
    print(f"{torch.get_num_threads()} threads, {h} query / {kvh} KV heads of {d}; "
          f"AMX tiles here: {kernels.amx()}")
    for label, prompts, tokens, cached in (("16 prompts x 128", 16, 128, 0),
                                           ("4 prompts x 512", 4, 512, 0),
                                           ("1 prompt x 2048", 1, 2048, 0),
                                           ("2048 after 2048 cached", 1, 2048, 2048)):
        per = (cached + tokens + bs - 1) // bs
        k_cache = torch.randn(kvh, prompts * per * bs, d).to(torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        table = torch.cat([torch.arange(p * per, (p + 1) * per).repeat(tokens, 1)
                           for p in range(prompts)])
        ctx = torch.arange(cached + 1, cached + tokens + 1).repeat(prompts)
        q = torch.randn(prompts * tokens, h, d).to(torch.bfloat16)
        flops = 4 * prompts * h * d * tokens * (cached + tokens / 2)

        def call(q=q, k_cache=k_cache, v_cache=v_cache, table=table, ctx=ctx):
            return kernels.paged_decode_attention(q, k_cache, v_cache, None, None, table, ctx,
                                                  bs, d ** -0.5)

        line = f"{label:24s}"
        for tiles in (True, False):
            if tiles and not kernels.amx():
                continue
            before = kernels.amx()
            kernels.set_amx(tiles)
            try:
                ms = timed(call)
            finally:
                kernels.set_amx(before)
            line += (f"  {'tiles' if tiles else 'no tiles'} {ms:8.2f} ms "
                     f"{flops / ms / 1e9:5.2f} TF/s")
        print(line)


if __name__ == "__main__":
    main()
