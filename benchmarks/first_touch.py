"""What the first write to a page of the KV pool costs, by the kind of memory map that
holds it: Python's default (shared, backed by shmem) against a private anonymous map,
as ``layers/kv_cache.py`` makes it. Each page of a fresh map is written once (its first
128 bytes, one cache row of the default model); best of ``--rounds`` alternating rounds.

    .venv/bin/python benchmarks/first_touch.py
"""

from __future__ import annotations

import argparse
import mmap
import time

import torch

KINDS = {"shared": mmap.MAP_SHARED | mmap.MAP_ANONYMOUS,
         "private": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS}


def first_writes(flags: int, nbytes: int) -> float:
    """Seconds per page to write every page of a fresh map once."""
    pages = mmap.mmap(-1, nbytes, flags=flags)
    try:
        rows = torch.frombuffer(pages, dtype=torch.uint8).view(-1, mmap.PAGESIZE)
        t0 = time.perf_counter()
        rows[:, :128] = 1
        elapsed = time.perf_counter() - t0
        count = rows.shape[0]
        del rows
    finally:
        pages.close()
    return elapsed / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="size of each map")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    best = {kind: float("inf") for kind in KINDS}
    for _ in range(args.rounds):
        for kind, flags in KINDS.items():
            best[kind] = min(best[kind], first_writes(flags, args.mib << 20))
    for kind, t in best.items():
        print(f"{kind}: {t * 1e6:.2f} us per page first written ({args.mib} MiB)")


if __name__ == "__main__":
    main()
