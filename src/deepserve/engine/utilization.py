"""Actual against theoretical throughput: model FLOPs utilization (MFU) and memory-
bandwidth utilization, per step and over a recent window of wall time.

Per step, from the batch's shape:

- FLOPs = 2 x (linear-layer parameters) x tokens + 2 x (output head) x sampled rows
  + attention: 4 x layers x heads x head_dim x (new tokens x their mean context).
- Bytes = every weight once (the step reads all of them) + the KV cache read by
  attention (each sequence's context) and written (its new tokens).

The peak is measured on this machine, once, and cached per CPU, threads, dtype and
torch (``~/.cache/deepserve/peak``): a GEMM in the compute dtype for FLOP/s, a large
read for bytes/s. Utilization = the window's FLOPs (bytes) per second of wall time
over that peak, so an idle replica reads 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

WINDOW_S = 10.0


def _cache_file(dtype: torch.dtype) -> Path:
    from deepserve.kernels import cpu_flags

    model = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    key = f"{model}|{sorted(cpu_flags())}|{torch.get_num_threads()}|{dtype}|{torch.__version__}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "deepserve" / "peak" / f"{digest}.json"


def measure_peak(dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(FLOP/s, bytes/s) this machine reaches: cached after the first measurement."""
    path = _cache_file(dtype) if device.type == "cpu" else None
    if path is not None and path.is_file():
        try:
            data = json.loads(path.read_text())
            return float(data["flops"]), float(data["bytes"])
        except (ValueError, KeyError):
            pass
    start = time.perf_counter()
    n = 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best_f = 0.0
    for _ in range(4):
        t = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best_f = max(best_f, 4 * 2 * n**3 / (time.perf_counter() - t))
    big = torch.ones(64 * 2**20, device=device)  # 256 MiB of float32
    best_b = 0.0
    for _ in range(4):
        t = time.perf_counter()
        big.sum()
        best_b = max(best_b, big.numel() * 4 / (time.perf_counter() - t))
    del big
    logger.info("peak on this machine: %.1f GFLOP/s (%s GEMM), %.1f GB/s (read); measured "
                "in %.1f s", best_f / 1e9, str(dtype).removeprefix("torch."), best_b / 1e9,
                time.perf_counter() - start)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"flops": best_f, "bytes": best_b}))
    return best_f, best_b


class Utilization:
    """FLOPs and bytes per step, and their rate over the last ``WINDOW_S`` seconds."""

    def __init__(self, model: Any, kv_bytes_per_token: int) -> None:
        cfg = model.config
        self.layers, self.heads, self.head_dim = cfg.num_layers, cfg.num_heads, cfg.head_dim
        self.kv_bytes_per_token = kv_bytes_per_token
        embed = cfg.vocab_size * cfg.hidden_size
        params = sum(p.numel() for p in model.parameters())
        blocks = sum(b.numel() for name, b in model.named_buffers() if "blocks" in name)
        # GGUF blocks hold ~1.1 bytes per weight (Q8_0) or ~0.6 (Q4): count weights, not
        # bytes, from their shapes where the layers say so.
        weights = sum(int(getattr(m, "in_features", 0)) * int(getattr(m, "out_features", 0))
                      for m in model.modules() if hasattr(m, "blocks"))
        self.linear_params = max(0, params + weights - embed)
        self.head_params = embed
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + \
            blocks
        self.peak_flops = 0.0
        self.peak_bytes = 0.0
        self.flops_total = 0.0
        self.bytes_total = 0.0
        self._window: deque[tuple[float, float, float]] = deque()

    def set_peak(self, flops: float, bytes_per_s: float) -> None:
        self.peak_flops, self.peak_bytes = flops, bytes_per_s

    def record(self, items: list[tuple[Any, int]], rows: int) -> None:
        """Account one step: (sequence, new tokens) pairs, and the rows sampled."""
        tokens = 0
        attn = 0.0
        kv_read = 0
        for seq, n in items:
            tokens += n
            ctx = seq.num_computed + n
            attn += n * (seq.num_computed + (n + 1) / 2)
            kv_read += ctx
        flops = (2.0 * self.linear_params * tokens + 2.0 * self.head_params * rows +
                 4.0 * self.layers * self.heads * self.head_dim * attn)
        moved = float(self.weight_bytes + (kv_read + tokens) * self.kv_bytes_per_token)
        self.flops_total += flops
        self.bytes_total += moved
        now = time.monotonic()
        self._window.append((now, flops, moved))
        while self._window and self._window[0][0] < now - WINDOW_S:
            self._window.popleft()

    def snapshot(self) -> dict[str, float]:
        """What ``EngineStats`` publishes."""
        now = time.monotonic()
        while self._window and self._window[0][0] < now - WINDOW_S:
            self._window.popleft()
        flops = sum(f for _, f, _ in self._window) / WINDOW_S
        moved = sum(b for _, _, b in self._window) / WINDOW_S
        return {"mfu": min(1.0, flops / self.peak_flops) if self.peak_flops else 0.0,
                "bandwidth_utilization": min(1.0, moved / self.peak_bytes)
                if self.peak_bytes else 0.0,
                "flops_total": self.flops_total, "bytes_total": self.bytes_total,
                "peak_flops": self.peak_flops, "peak_bytes_per_s": self.peak_bytes}
