"""Continuous batching: which sequences run this step, and how many tokens each.

Every step has a token budget (``max_num_batched_tokens``) and a sequence cap
(``max_num_seqs``). Running sequences go first (one token each when decoding, the
next chunk when their prompt is being prefilled in chunks); waiting ones are
admitted while blocks and budget last. When the pool runs dry the newest running
sequence is preempted: its blocks are freed and it is recomputed later, with its
output so far kept.

Fair sharing between tenants (API keys, or ``user`` on a server without keys): when
sequences of more than one tenant are running or waiting, each tenant's share of the
sequence cap and of every step's token budget is its weight over the active tenants'
total weight (the key file's ``weight``, default 1). Waiting sequences are admitted
from the tenant furthest below its share (priority, then arrival, within a tenant); a
prefill chunk never takes more than its tenant's share of the step's tokens; and when
the batch is full while a tenant below its share waits, the newest sequence of the
tenant most over its share is preempted (recomputed later) to make room. One tenant
alone uses everything.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
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

    def _shares(self, max_seqs: int, budget: int) -> dict[str, tuple[float, int]] | None:
        """tenant -> (its share of the sequences, of this step's tokens) when more than
        one tenant has work; None when one (or none) has."""
        weights: dict[str, float] = {}
        for seq in self.running:
            weights[seq.tenant] = seq.weight
        for seq in self.waiting:
            weights[seq.tenant] = seq.weight
        if len(weights) < 2:
            return None
        total = sum(weights.values())
        return {t: (max_seqs * w / total, max(1, int(budget * w / total)))
                for t, w in weights.items()}

    def _make_room(self, shares: dict[str, tuple[float, int]], max_seqs: int) -> None:
        """With the batch full, preempt the newest sequence of the tenant most over its
        share for each waiting tenant that is below its own (it then starts first)."""
        running = Counter(s.tenant for s in self.running)
        starving = [t for t in dict.fromkeys(s.tenant for s in self.waiting)
                    if running[t] + 1 <= max(1.0, shares[t][0])]
        free = max_seqs - len(self.running)
        for _ in starving:
            if free > 0:
                free -= 1
                continue
            over = max(running, key=lambda t: running[t] - shares[t][0])
            if running[over] <= shares[over][0]:
                return
            victim = next(s for s in reversed(self.running) if s.tenant == over)
            self.running.remove(victim)
            self._preempt(victim)
            running[over] -= 1

    def _next_waiting(self, shares: dict[str, tuple[float, int]] | None,
                      running: Counter[str], spent: Counter[str]) -> Sequence | None:
        """The waiting sequence to admit next: the first one, or with several tenants
        the first of the tenant furthest below its share with tokens left this step."""
        if shares is None:
            return self.waiting[0]
        best, best_load = None, 0.0
        seen: set[str] = set()
        for seq in self.waiting:
            t = seq.tenant
            if t in seen:
                continue
            seen.add(t)
            if spent[t] >= shares[t][1]:
                continue
            load = running[t] / seq.weight
            if best is None or load < best_load:
                best, best_load = seq, load
        return best

    def schedule(self) -> ScheduledBatch:
        budget, max_seqs = self.max_num_batched_tokens, self.max_num_seqs
        if self.slo is not None:
            budget, max_seqs = self.slo.plan(self.running, self.waiting)
        shares = self._shares(max_seqs, budget)
        if shares is not None and self.waiting and len(self.running) >= max_seqs:
            self._make_room(shares, max_seqs)
        spent: Counter[str] = Counter()  # tokens scheduled per tenant this step
        items: list[tuple[Sequence, int]] = []
        preempted = 0
        stuck: list[Sequence] = []
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            if shares is not None and num_new > 1:  # a prefill chunk: within its share
                num_new = min(num_new, shares[seq.tenant][1] - spent[seq.tenant])
                if num_new <= 0:
                    index += 1
                    continue
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
            spent[seq.tenant] += num_new
            index += 1

        running = Counter(s.tenant for s in self.running)
        while (not preempted and not stuck and self.waiting and budget > 0
               and len(self.running) < max_seqs):
            seq = self._next_waiting(shares, running, spent)
            if seq is None:
                break
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
            if shares is not None and self.chunked:
                num_new = min(num_new, shares[seq.tenant][1] - spent[seq.tenant])
            if not self.bm.ensure(seq, seq.num_computed + num_new):
                self._release_waiting(seq)
                if not self.running and not items:
                    self.waiting.remove(seq)
                    stuck.append(seq)
                break
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            items.append((seq, num_new))
            budget -= num_new
            spent[seq.tenant] += num_new
            running[seq.tenant] += 1
        return ScheduledBatch(items, preempted, stuck or None)

    def _release_waiting(self, seq: Sequence) -> None:
        # Give back prefix-cache hits taken for a sequence that cannot start yet.
        self.bm.free(seq)
        seq.num_computed = 0
