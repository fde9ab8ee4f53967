"""The engine keeps freed activations in glibc's heap (engine/malloc.py): large tensors
allocated again after they were freed fault (almost) no pages in, where glibc's defaults
fault many of them in again. Run in fresh processes, whose heap settings are their own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys, torch
from deepserve.engine import malloc
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(20):  # 12 MiB activations, allocated, written and freed (a step's)
        x = torch.ones(3 << 20)
        y = torch.ones((3 << 20) + 4096 * (i % 3))
        del x, y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = faults()
kept = malloc.tune_process(None)
print(json.dumps({"default": default, "kept": kept, "after": faults()}))
"""


def probe(env: dict[str, str] | None = None) -> dict:
    import os

    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=120, env={**os.environ, **(env or {})}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activations_stay_in_the_heap_unless_the_user_chose_otherwise():
    r = probe()
    assert r["kept"] is True
    pages = 20 * 2 * (12 << 20) // 4096  # what faulting every page in again costs
    assert r["after"] < pages // 20, r  # kept: the heap's pages are reused
    assert r["default"] > 4 * (r["after"] + 1000), r  # glibc's defaults: fresh pages
    # a user's own setting (or allocator) is left alone
    assert probe({"MALLOC_TRIM_THRESHOLD_": "131072"})["kept"] is False
