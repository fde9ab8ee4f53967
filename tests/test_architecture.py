"""The seams between the engine and its front doors: the published stats snapshot, a
torch-free gateway, and the scheduler's priority order."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deepserve import SamplingParams
from deepserve.engine.block_manager import BlockManager
from deepserve.engine.scheduler import Scheduler
from deepserve.engine.sequence import Sequence

SRC = Path(__file__).resolve().parent.parent / "src" / "deepserve"


def test_gateway_imports_without_torch():
    code = ("import sys, deepserve.gateway.app, deepserve.billing.meter, "
            "deepserve.gateway.hold; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_front_doors_never_touch_live_engine_objects():
    offenders = []
    for folder in ("server", "gateway", "deploy"):
        for path in (SRC / folder).glob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\.(scheduler|block_manager)\b", line):
                    offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_stats_snapshot_is_immutable_and_replaced_each_step(tiny_llm):
    from deepserve.engine.async_engine import AsyncEngine

    eng = tiny_llm.engine
    before = eng.latest_stats
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.num_running = 5  # type: ignore[misc]
    eng.add_request("snap", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0))
    eng.step()
    during = eng.latest_stats
    assert during is not before and during.num_running == 1
    assert during.kv_blocks_used > 0 and during.num_steps == before.num_steps + 1
    while eng.has_unfinished():
        eng.step()
    after = AsyncEngine(engine=eng).stats
    assert after.num_running == 0 and after.kv_blocks_used == 0
    assert 0 <= after.utilization <= 1


def _seq(i: int, priority: int) -> Sequence:
    return Sequence(i, f"r{i}", 0, [1, 2], SamplingParams(), 0.0, priority)


def test_lower_priority_value_goes_first_and_fcfs_among_equals():
    s = Scheduler(BlockManager(16, 4, False), 4, 64, True)
    for i, p in enumerate([5, 5, 0, 3, 0, 5]):
        s.add(_seq(i, p))
    assert [(q.seq_id, q.priority) for q in s.waiting] == [
        (2, 0), (4, 0), (3, 3), (0, 5), (1, 5), (5, 5)]
