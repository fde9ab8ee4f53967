"""Continuous batching: which sequences run this step, and how many tokens each.

Every step has a token budget (``max_num_batched_tokens``) and a sequence cap
(``max_num_seqs``). Running sequences go first (one token each when decoding, the
next chunk when their prompt is being prefilled in chunks); waiting ones are
admitted while blocks and budget last. When the pool runs dry the newest running
sequence is preempted: its blocks are freed and it is recomputed later, with its
output so far kept.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from deepserve.engine.block_manager import BlockManager
from deepserve.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    """One step's work: (sequence, number of new tokens to compute) pairs."""

    items: list[tuple[Sequence, int]]
    num_preempted: int = 0
    out_of_memory: list[Sequence] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    """Owns the waiting and running queues; FCFS, then by ``priority`` (lower first)."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_chunked_prefill: bool) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.slo: Any = None  # an SLOController (engine/slo.py) picks budget and cap

    def limits(self) -> dict[str, int]:
        """The last step's token budget and batch cap (the SLO controller's choice)."""
        if self.slo is not None:
            return {"token_budget": self.slo.budget, "batch_limit": self.slo.batch_limit}
        return {"token_budget": self.max_num_batched_tokens,
                "batch_limit": self.max_num_seqs}

    def add(self, seq: Sequence) -> None:
        # Lower priority values go first (0 before 5), FCFS among equals.
        if self.waiting and self.waiting[-1].priority > seq.priority:
            index = next(i for i, s in enumerate(self.waiting) if s.priority > seq.priority)
            self.waiting.insert(index, seq)
        else:
            self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        budget, max_seqs = self.max_num_batched_tokens, self.max_num_seqs
        if self.slo is not None:
            budget, max_seqs = self.slo.plan(self.running, self.waiting)
        items: list[tuple[Sequence, int]] = []
        preempted = 0
        stuck: list[Sequence] = []
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            while not self.bm.ensure(seq, seq.num_computed + num_new):
                victim = self.running.pop()
                if victim is seq:
                    if not items and not self.running:
                        # Alone and still does not fit: the pool is too small for it.
                        stuck.append(seq)
                    else:
                        self._preempt(seq)
                        preempted += 1
                    seq = None
                    break
                self._preempt(victim)
                preempted += 1
            if seq is None:
                break
            items.append((seq, num_new))
            budget -= num_new
            index += 1

        while (not preempted and not stuck and self.waiting and budget > 0
               and len(self.running) < max_seqs):
            seq = self.waiting[0]
            if not seq.block_table:
                hit = 0 if seq.params.prompt_logprobs is not None or seq.params.embed else \
                    self.bm.match_prefix(seq, count=seq.num_cached_tokens is None)
                seq.num_computed = hit
                if seq.num_cached_tokens is None:
                    seq.num_cached_tokens = hit
            remaining = seq.num_tokens - seq.num_computed
            if not self.chunked and remaining > budget:
                self._release_waiting(seq)
                break
            num_new = min(remaining, budget)
            if not self.bm.ensure(seq, seq.num_computed + num_new):
                self._release_waiting(seq)
                if not self.running and not items:
                    stuck.append(self.waiting.popleft())
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            items.append((seq, num_new))
            budget -= num_new
        return ScheduledBatch(items, preempted, stuck or None)

    def _release_waiting(self, seq: Sequence) -> None:
        # Give back prefix-cache hits taken for a sequence that cannot start yet.
        self.bm.free(seq)
        seq.num_computed = 0
