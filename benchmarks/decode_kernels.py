"""Time two kernels of a decode step on their own: paged decode attention over a bf16,
int8 or fp8 cache (``--cache``; scattered 16-token blocks, as the engine's pool) and
sampling one token per row.

Best of 7 rounds of 100 calls; attention is quoted per layer and for a whole step of
``--layers`` layers. Each call reads the next of ``--layers`` caches, as a step reads one
per layer, so the keys come from memory as in the engine (``--pools 1`` rereads one
cache, whose keys then stay in the L3). Each sequence's blocks follow one another, as a
fresh engine hands them out; ``--scatter`` puts them anywhere in the pool, as a long-run
pool may. ``--q-scale`` multiplies the queries: 64 makes every softmax peaked,
most numerators far below the largest (denormal once times an int8 value scale).

    .venv/bin/python benchmarks/decode_kernels.py                      # the default model
    .venv/bin/python benchmarks/decode_kernels.py --cache int8 --q-scale 64
    .venv/bin/python benchmarks/decode_kernels.py --heads 32 --kv-heads 4 --layers 22 \\
        --batch 32                                                     # TinyLlama's shape
"""

from __future__ import annotations

import argparse
import time

import torch

from deepserve import kernels


def best_of(fn, calls: int = 100, rounds: int = 7) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, nargs="+", default=[140, 256])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--slots", type=int, default=16384)
    ap.add_argument("--cache", choices=["bf16", "int8", "fp8"], default="bf16")
    ap.add_argument("--q-scale", type=float, default=1.0)
    ap.add_argument("--scatter", action="store_true", help="blocks anywhere in the pool")
    ap.add_argument("--pools", type=int, default=None,
                    help="distinct caches the calls cycle through (default: --layers)")
    args = ap.parse_args()
    if not kernels.load(kernels.isa()):
        raise SystemExit(f"CPU kernels unavailable: {kernels.unavailable_reason()}")
    torch.manual_seed(0)
    b, bs, d = args.batch, 16, args.head_dim
    shape, value_bytes = (args.kv_heads, args.slots, d), 1 if args.cache != "bf16" else 2

    def pool() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if args.cache == "int8":  # codes and one bf16 scale per (head, slot), as the engine's
            return (torch.randint(-127, 128, shape, dtype=torch.int8),
                    torch.randint(-127, 128, shape, dtype=torch.int8),
                    (torch.rand(*shape[:2], 1) / 64).bfloat16())
        if args.cache == "fp8":  # e4m3 bytes
            k, v = (torch.randn(shape).to(torch.float8_e4m3fn).view(torch.uint8) for _ in "kv")
            return k, v, None
        return torch.randn(shape).bfloat16(), torch.randn(shape).bfloat16(), None

    pools = [pool() for _ in range(args.pools or args.layers)]
    turn = iter(range(1 << 62))
    q = (torch.randn(b, args.heads, d) * args.q_scale).bfloat16()
    print(f"{kernels.isa()} kernels, {torch.get_num_threads()} threads, {args.cache} cache")
    for ctx in args.context:
        blocks = -(-ctx // bs)
        order = torch.randperm(args.slots // bs) if args.scatter else \
            torch.arange(args.slots // bs)
        table = order[:b * blocks].view(b, blocks)
        lens = torch.full((b,), ctx, dtype=torch.int64)

        def call() -> None:
            k, v, scales = pools[next(turn) % len(pools)]
            kernels.paged_decode_attention(q, k, v, scales, scales, table, lens,  # noqa: B023
                                           bs, d ** -0.5)

        t = best_of(call)
        moved = b * ctx * args.kv_heads * d * value_bytes * 2
        print(f"attention, {b} rows x {ctx} tokens, {args.heads}/{args.kv_heads} heads: "
              f"{t * 1e6:.0f} us a layer, {t * args.layers * 1e3:.2f} ms for {args.layers} "
              f"layers ({moved / t / 1e9:.1f} GB/s of K and V)")
    logits, u = torch.randn(b, args.vocab) * 3, torch.rand(b)
    t = best_of(lambda: kernels.sample_rows(logits, u), calls=50)
    print(f"sampling, {b} rows x {args.vocab}: {t * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
