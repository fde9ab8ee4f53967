"""One row against GGUF blocks that are not in any cache: the read rate (GB/s of weight
bytes) of ``linear_gguf`` at one input row, as a one-stream decode step reads its
weights, in each kernel layout, on 1 and 2 threads, beside a plain read
(``torch.sum`` over 256 MiB) as the memory's own rate.

``--layers`` distinct copies of one ``--shape`` (default a 1.1B model's gate/up
projection, 2048 x 5632; 40 copies of 6.5 MB: far past any L3) run back to back; the
best of five passes is kept. Nothing else should run.

    .venv/bin/python benchmarks/gemv_memory.py
    .venv/bin/python benchmarks/gemv_memory.py --types Q4_0x8 --threads 2
"""

from __future__ import annotations

import argparse
import time

import gguf
import numpy as np
import torch

from deepserve import kernels
from deepserve.layers import kquants
from deepserve.layers.gguf_linear import Q4_0, Q4_1, X8, interleave
from deepserve.layers.gguf_linear import quantize as quantize_blocks

TYPES = {"Q4_0x8": (Q4_0, True), "Q4_1x8": (Q4_1, True), "Q4_Kx8": (kquants.Q4_K, True),
         "Q6_K": (kquants.Q6_K, False)}


def blocks_of(name: str, n: int, k: int) -> tuple[torch.Tensor, int]:
    """Random weights in the kernel layout of ``name``, and its kernel type code."""
    qtype, x8 = TYPES[name]
    if qtype in kquants.REWRITTEN:  # random codes and sane scales, as the file would hold
        size, per = kquants.FILE_BYTES[qtype], kquants.FILE_BLOCK[qtype]
        raw = torch.randint(0, 256, (n, k // per, size), dtype=torch.uint8)
        raw[..., 0:4] = (torch.rand(n, k // per, 2) * 0.01 + 1e-4).half().view(torch.uint8)
        blocks = kquants.keep(raw.reshape(n, -1), qtype, k)
    elif qtype == Q4_0:
        w = (np.random.default_rng(0).standard_normal((n, k)) * 0.05).astype(np.float32)
        blocks = torch.from_numpy(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0))
        blocks = blocks.reshape(n, -1)
    else:
        blocks = quantize_blocks(torch.randn(n, k) * 0.05, qtype)
    if x8:
        return interleave(blocks, qtype, k), qtype + X8
    return blocks, qtype


def best_of(fn, passes: int = 5) -> float:
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES))
    ap.add_argument("--shape", default="2048x5632", help="IN x OUT of each layer")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--isa", default=None, help="kernel build (default: this CPU's best)")
    args = ap.parse_args()
    k, n = (int(v) for v in args.shape.split("x"))
    isa = args.isa or kernels.isa()
    kernels.load(isa)
    op = kernels.ops(isa).linear_gguf
    big = torch.ones(256 * 2**20 // 4)
    x = torch.randn(1, k)
    print(f"kernels: {isa}; {args.layers} layers of {k} x {n}, one row")
    print("| type | threads | GB/s | ms a layer | torch.sum GB/s |")
    print("|---|---:|---:|---:|---:|")
    for name in args.types:
        first, code = blocks_of(name, n, k)
        layers = [first] + [first.clone() for _ in range(args.layers - 1)]
        nbytes = sum(b.numel() for b in layers)
        for t in args.threads:
            torch.set_num_threads(t)
            for b in layers[:2]:
                op(x, b, code, None)  # warm
            secs = best_of(lambda layers=layers, code=code: [op(x, b, code, None) for b in layers])
            plain = best_of(big.sum)
            print(f"| {name} | {t} | {nbytes / secs / 1e9:.1f} | "
                  f"{secs / len(layers) * 1e3:.3f} | {big.numel() * 4 / plain / 1e9:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
