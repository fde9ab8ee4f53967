"""Where a serving run's engine time goes: ``deepserve serve`` with every engine step's
size and duration recorded, for a load generator to drive.

Run the server through this script (every argument after ``serve`` is ``deepserve
serve``'s), drive it (e.g. ``deepserve bench serve``), stop it; each step's (tokens,
sequences, start, seconds in ``ModelRunner.execute``) goes to ``--steps-out`` as it
runs. ``--summary FILE`` then splits the steps into decode-only steps (one token a
sequence) by batch size and steps that carry prompt tokens, and gives the time between
steps (scheduling, detokenizing and handing outputs over, outside ``execute``).

    .venv/bin/python benchmarks/served_steps.py --steps-out /tmp/steps.json serve \\
        --max-num-seqs 64 --kv-cache-memory 377487360 &
    .venv/bin/deepserve bench serve --base-url http://127.0.0.1:8000 --workload random \\
        --input-len 128 --output-len 128 --ignore-eos --concurrency 64 --num-requests 192
    kill %1; .venv/bin/python benchmarks/served_steps.py --summary /tmp/steps.json
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from collections import defaultdict


def record(path: str) -> None:
    """Time every ModelRunner.execute of this process, the steps written to ``path``
    every 100 steps and at exit."""
    import atexit

    from deepserve.engine import model_runner

    steps: list[tuple[int, int, float, float]] = []
    execute = model_runner.ModelRunner.execute

    def dump() -> None:
        with open(path, "w") as f:
            json.dump(steps, f)

    def timed(self, items):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = execute(self, items)
        steps.append((sum(n for _, n in items), len(items), t0, time.perf_counter() - t0))
        if len(steps) % 100 == 0:
            dump()
        return out

    model_runner.ModelRunner.execute = timed
    atexit.register(dump)


def summary(path: str, skip: int = 30) -> None:
    with open(path) as f:
        steps = json.load(f)[skip:]  # the warm-up request's steps and the ramp first
    if len(steps) < 2:
        raise SystemExit(f"{path}: too few steps recorded")
    decode = [s for s in steps if s[0] == s[1]]
    mixed = [s for s in steps if s[0] != s[1]]
    by_batch: dict[int, list[float]] = defaultdict(list)
    for tokens, _, _, secs in decode:
        by_batch[tokens].append(secs)
    span = steps[-1][2] + steps[-1][3] - steps[0][2]
    print(f"{len(steps)} steps over {span:.2f} s: decode-only "
          f"{sum(s[3] for s in decode):.2f} s, with prompt tokens "
          f"{sum(s[3] for s in mixed):.2f} s, between steps "
          f"{span - sum(s[3] for s in steps):.2f} s")
    for batch in sorted(by_batch, reverse=True)[:4]:
        times = by_batch[batch]
        print(f"  decode-only, {batch} rows: {len(times)} steps, median "
              f"{1e3 * statistics.median(times):.1f} ms")
    if mixed:
        print(f"  with prompt tokens: {len(mixed)} steps, median "
              f"{statistics.median(s[0] for s in mixed):.0f} tokens, "
              f"{1e3 * statistics.median(s[3] for s in mixed):.0f} ms")
    gaps = [b[2] - a[2] - a[3] for a, b in itertools.pairwise(steps)]
    print(f"  between steps: median {1e3 * statistics.median(gaps):.2f} ms")


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--summary"] and len(args) == 2:
        return summary(args[1])
    if len(args) < 3 or args[0] != "--steps-out" or args[2] != "serve":
        raise SystemExit("usage: served_steps.py --steps-out FILE serve [deepserve serve "
                         "arguments] | served_steps.py --summary FILE")
    record(args[1])
    from deepserve.cli import main as deepserve_main

    sys.argv = ["deepserve", *args[2:]]
    deepserve_main()


if __name__ == "__main__":
    main()
