"""SLO-aware adaptive batching (``--slo-ttft-ms``, ``--slo-tpot-ms``).

Instead of a fixed token budget and batch cap, each step's are chosen from targets, the
queue, and measured step times:

- A step-time model ``t = a + b x tokens`` is fitted online (least squares with
  forgetting) from every step's measured duration, engine overhead included.
- While sequences decode, a step must not take longer than the TPOT target (every
  decode waits one step per token). The token budget is what fits:
  ``(tpot - a) / b``, at least the decodes plus a minimum prefill chunk. Prefill
  chunks shrink when decodes would miss their target.
- The batch cap is how many decodes fit in that time, and it is corrected by what the
  steps really take: a decode step over the TPOT target shrinks the cap by a tenth, one
  well under it (80%) lets it grow by one. A short queue runs small batches (fast
  steps); a long one fills up to what the TPOT target allows, and no further: past
  that, more requests in the batch would make every one of them miss.
- When the oldest waiting request has used half of its TTFT target and the decodes
  have slack (recent steps under the TPOT target), the step's budget grows to take its
  whole prompt: one longer step costs the running decodes little of their mean TPOT,
  while a missed TTFT loses the request. Without slack it waits: under overload,
  serving some requests within both targets beats serving all of them late.
- With nothing decoding, prefill runs at the full budget.

The chosen budget and cap are published on ``/metrics``
(``deepserve_scheduler_token_budget``, ``deepserve_scheduler_batch_limit``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

MIN_CHUNK = 16  # prefill tokens a step always has room for


class StepModel:
    """``seconds = a + b x tokens``, fitted by least squares with forgetting."""

    def __init__(self, forget: float = 0.97) -> None:
        self.forget = forget
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        f = self.forget
        self.n = self.n * f + 1
        self.sx = self.sx * f + tokens
        self.sy = self.sy * f + seconds
        self.sxx = self.sxx * f + tokens * tokens
        self.sxy = self.sxy * f + tokens * seconds

    def coefficients(self) -> tuple[float, float] | None:
        """(a, b) once enough varied steps were seen, else None."""
        if self.n < 3:
            return None
        mx, my = self.sx / self.n, self.sy / self.n
        var = self.sxx / self.n - mx * mx
        if var < 1.0:  # every step the same size: no slope yet
            return None
        b = max(1e-7, (self.sxy / self.n - mx * my) / var)
        return max(0.0, my - b * mx), b


class SLOController:
    """Picks each step's token budget and batch cap (``Scheduler`` asks every step)."""

    def __init__(self, ttft_ms: float | None, tpot_ms: float | None, max_tokens: int,
                 max_seqs: int) -> None:
        self.ttft_s = ttft_ms / 1000 if ttft_ms else None
        self.tpot_s = tpot_ms / 1000 if tpot_ms else None
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.model = StepModel()
        self.budget, self.batch_limit = max_tokens, max_seqs
        self.feedback_cap = max_seqs  # corrected by measured decode steps
        self.decode_step_s: float | None = None  # recent decode-step time (EMA)
        self._last_end: float | None = None
        self._pending: tuple[int, float, bool] | None = None

    def plan(self, running: list[Any], waiting: Any) -> tuple[int, int]:
        """(token budget, batch cap) for the next step."""
        decodes = sum(1 for s in running if s.num_computed >= s.prompt_len)
        budget, cap = self.max_tokens, self.max_seqs
        fit = self.model.coefficients()
        if self.tpot_s is not None:
            cap = self.feedback_cap
            if fit is not None:
                a, b = fit
                fits = int((self.tpot_s - a) / b + 1e-6) if self.tpot_s > a else 0
                cap = max(1, min(cap, fits))
                if decodes:
                    budget = max(decodes + MIN_CHUNK, min(self.max_tokens, fits))
        if self.ttft_s is not None and waiting:
            oldest = min(waiting, key=lambda s: s.arrival)
            slack = self.tpot_s is None or self.decode_step_s is None or \
                self.decode_step_s < self.tpot_s
            if slack and time.time() - oldest.arrival > self.ttft_s / 2:
                # Start it now: its TTFT is at risk and the decodes can afford one step.
                budget = min(self.max_tokens, max(budget, decodes + oldest.prompt_len -
                                                  oldest.num_computed))
                cap = max(cap, min(self.max_seqs, len(running) + 1))
        if (budget, cap) != (self.budget, self.batch_limit):
            logger.debug("slo: %d decoding, %d waiting, fit %s, decode step %s -> budget "
                         "%d, cap %d", decodes, len(waiting), fit, self.decode_step_s,
                         budget, cap)
        self.budget, self.batch_limit = budget, cap
        return budget, cap

    def observe(self, items: list[tuple[Any, int]], started: float, ended: float) -> None:
        """A step ran ``items`` from ``started`` to ``ended`` (perf_counter seconds). The
        time outside the model run (scheduling, detokenizing) is charged to the step
        before, measured as the gap to the next step while the engine is busy."""
        tokens = sum(n for _, n in items)
        if self._pending is not None and self._last_end is not None:
            gap = started - self._last_end
            prev_tokens, prev_s, prev_decoding = self._pending
            took = prev_s + (gap if gap < 0.05 else 0.0)
            self.model.add(prev_tokens, took)
            if prev_decoding and self.tpot_s is not None:
                self._feedback(took)
        decoding = any(n == 1 and seq.num_computed >= seq.prompt_len for seq, n in items)
        self._pending = (tokens, ended - started, decoding)
        self._last_end = ended

    def _feedback(self, took: float) -> None:
        """Correct the batch cap by a decode step's real duration."""
        assert self.tpot_s is not None
        ema = self.decode_step_s
        self.decode_step_s = took if ema is None else 0.8 * ema + 0.2 * took
        if took > self.tpot_s:
            self.feedback_cap = max(1, min(self.feedback_cap, self.batch_limit) * 9 // 10)
        elif took < 0.8 * self.tpot_s and self.feedback_cap < self.max_seqs:
            self.feedback_cap += 1
