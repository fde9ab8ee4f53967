"""The engine's published state: one immutable snapshot, replaced after every step.

Everything outside the engine thread (the HTTP server's metrics, pricing by
utilization, health) reads this snapshot and never the scheduler or block manager,
which the engine thread mutates. Replacing one reference is atomic, so readers need
no lock and always see one consistent step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineStats:
    """The engine as of the end of its last step."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    max_num_seqs: int = 1
    # Actual against theoretical throughput over the last seconds (engine/utilization).
    mfu: float = 0.0
    bandwidth_utilization: float = 0.0
    flops_total: float = 0.0
    bytes_total: float = 0.0
    peak_flops: float = 0.0
    peak_bytes_per_s: float = 0.0
    token_budget: int = 0  # the scheduler's last step budget and batch cap
    batch_limit: int = 0
    time: float = field(default_factory=time.time)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / q if q else 0.0

    @property
    def utilization(self) -> float:
        """What pricing rules read: the busiest of KV-cache use, batch occupancy, model
        FLOPs utilization and memory-bandwidth utilization."""
        return max(self.kv_cache_usage, self.num_running / self.max_num_seqs, self.mfu,
                   self.bandwidth_utilization)
