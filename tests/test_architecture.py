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
            "deepserve.gateway.hold, deepserve.protocol.models, deepserve.protocol.http; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_front_doors_never_touch_live_engine_objects():
    offenders = []
    for folder in ("server", "gateway", "deploy", "protocol"):
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


def _imports(path: Path) -> set[str]:
    """Every deepserve module a file imports, at any depth (lazy imports included)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("deepserve")}


def _module_graph() -> dict[str, set[str]]:
    import ast

    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(("deepserve", *path.relative_to(SRC).with_suffix("").parts))
        name = name.removesuffix(".__init__")
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level: what runs at import
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("deepserve."):
                deps.add(node.module)
        graph[name] = deps
    return graph


def test_imports_only_point_down():
    upper = ("deepserve.server", "deepserve.gateway", "deepserve.deploy", "deepserve.bench",
             "deepserve.protocol",
             "deepserve.billing", "deepserve.cli", "deepserve.flags", "deepserve.entrypoints")
    for folder in ("engine", "models", "layers", "loader"):
        for path in (SRC / folder).glob("*.py"):
            bad = [m for m in _imports(path) if m.startswith(upper)]
            assert not bad, f"{folder}/{path.name} imports {bad}"
    for path in [SRC / "kernels.py", SRC / "config.py", SRC / "errors.py"]:
        bad = [m for m in _imports(path) if m.startswith((*upper, "deepserve.engine"))]
        assert not bad, f"{path.name} imports {bad}"


def test_no_import_cycles():
    graph = _module_graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(
                    [*trail[trail.index(dep):], dep]))
            if dep in graph and not state.get(dep):
                visit(dep, [*trail, dep])
        state[node] = 2

    for name in graph:
        if not state.get(name):
            visit(name, [name])


def test_no_module_over_400_lines():
    sizes = {p.relative_to(SRC).as_posix(): len(p.read_text().splitlines())
             for p in SRC.rglob("*.py")}
    assert max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
