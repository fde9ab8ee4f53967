"""Results on disk: one JSON per run, a markdown table, and PNG plots (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_LATENCY = {"type": "object", "required": ["mean", "p50", "p90", "p95", "p99"],
            "properties": {k: {"type": "number"} for k in ["mean", "p50", "p90", "p95", "p99"]}}

# The shape of one run's JSON file, for tools that read results.
RUN_SCHEMA = {
    "type": "object", "required": ["meta", "summary", "requests"],
    "properties": {
        "meta": {"type": "object", "required": ["label", "concurrency", "request_rate"]},
        "summary": {"type": "object", "required": [
            "requests", "completed", "errors", "duration_s", "request_throughput",
            "output_throughput", "total_token_throughput", "ttft_ms", "tpot_ms", "itl_ms",
            "e2e_ms", "goodput_requests_per_s"],
            "properties": {"requests": {"type": "integer", "minimum": 0},
                           "errors": {"type": "integer", "minimum": 0},
                           "output_throughput": {"type": "number", "minimum": 0},
                           "ttft_ms": _LATENCY, "tpot_ms": _LATENCY, "itl_ms": _LATENCY,
                           "e2e_ms": _LATENCY}},
        "requests": {"type": "array", "items": {
            "type": "object", "required": ["ok", "e2e_s", "ttft_s", "prompt_tokens",
                                           "completion_tokens"]}},
    },
}

_COLUMNS = [
    ("system", lambda r: r["meta"].get("label", "")),
    ("load", lambda r: _load(r["meta"])),
    ("req/s", lambda r: f"{r['summary']['request_throughput']:.2f}"),
    ("out tok/s", lambda r: f"{r['summary']['output_throughput']:.1f}"),
    ("TTFT p50 ms", lambda r: _f(r["summary"]["ttft_ms"]["p50"])),
    ("TTFT p99 ms", lambda r: _f(r["summary"]["ttft_ms"]["p99"])),
    ("TPOT p50 ms", lambda r: _f(r["summary"]["tpot_ms"]["p50"])),
    ("TPOT p99 ms", lambda r: _f(r["summary"]["tpot_ms"]["p99"])),
    ("ITL p50 ms", lambda r: _f(r["summary"]["itl_ms"]["p50"])),
    ("E2E p50 ms", lambda r: _f(r["summary"]["e2e_ms"]["p50"])),
    ("E2E p99 ms", lambda r: _f(r["summary"]["e2e_ms"]["p99"])),
    ("errors", lambda r: str(r["summary"]["errors"])),
    ("goodput req/s", lambda r: _f(r["summary"]["goodput_requests_per_s"], 2)),
]


def _f(x: float, digits: int = 0) -> str:
    return "-" if x != x else f"{x:.{digits}f}"  # NaN -> "-"


def _load(meta: dict[str, Any]) -> str:
    if meta.get("request_rate"):
        return f"rate {meta['request_rate']}/s"
    return f"conc {meta.get('concurrency')}"


def markdown_table(runs: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(c for c, _ in _COLUMNS) + " |"
    sep = "|" + "|".join("---" if i < 2 else "---:" for i in range(len(_COLUMNS))) + "|"
    rows = ["| " + " | ".join(fn(r) for _, fn in _COLUMNS) + " |" for r in runs]
    return "\n".join([head, sep, *rows])


def write_run(run: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    """Write ``name``.json, ``name``.md and ``name``_latency.png; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md",
             "png": out_dir / f"{name}_latency.png"}
    paths["json"].write_text(json.dumps(run, indent=2))
    paths["md"].write_text(markdown_table([run]) + "\n")
    plot_latency(run, paths["png"])
    return paths


def plot_latency(run: dict[str, Any], path: Path) -> None:
    """Cumulative distributions of TTFT, TPOT and end-to-end latency for one run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reqs = [r for r in run["requests"] if r["ok"]]
    series = {"TTFT": [r["ttft_s"] for r in reqs if r["ttft_s"] is not None],
              "TPOT": [r["tpot_s"] for r in reqs if r["tpot_s"] is not None],
              "E2E": [r["e2e_s"] for r in reqs]}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (name, values) in zip(axes, series.items(), strict=True):
        values = sorted(v * 1000 for v in values)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.set_title(f"{name} (ms)")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run['meta'].get('label', '')} {_load(run['meta'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(runs: list[dict[str, Any]], path: Path) -> None:
    """Throughput vs latency curves across request rates (one line per system)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_label.setdefault(r["meta"].get("label", ""), []).append(r)
    for label, group in by_label.items():
        group.sort(key=lambda r: r["summary"]["output_throughput"])
        x = [r["summary"]["output_throughput"] for r in group]
        for ax, key, title in zip(axes, ["ttft_ms", "tpot_ms", "e2e_ms"],
                                  ["TTFT p50", "TPOT p50", "E2E p99"], strict=True):
            pct = "p99" if key == "e2e_ms" else "p50"
            ax.plot(x, [r["summary"][key][pct] for r in group], marker="o", label=label)
            ax.set_title(f"{title} (ms)")
            ax.set_xlabel("output tokens/s")
            ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(paths: list[str]) -> str:
    """Side-by-side markdown table of saved runs (each file one run or a list of runs)."""
    runs: list[dict[str, Any]] = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        runs.extend(data if isinstance(data, list) else [data])
    return markdown_table(runs)
