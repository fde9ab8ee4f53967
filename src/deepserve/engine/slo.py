"""SLO-aware adaptive batching (``--slo-ttft-ms``, ``--slo-tpot-ms``).

Instead of a fixed token budget and batch cap, each step's are chosen from targets, the
queue, and measured step times:

- A step-time model ``t = a + b x tokens`` is fitted online (least squares with
  forgetting) from every step's measured duration, engine overhead included.
- While sequences decode, a step must not take longer than the TPOT target (every
  decode waits one step per token). The token budget is what fits:
  ``(tpot - a) / b``, at least the decodes plus a minimum prefill chunk. Prefill
  chunks shrink when decodes would miss their target.
- The batch cap is how many decodes fit in that time, so a short queue runs small
  batches (fast steps) and a long one fills up to what the TPOT target allows.
- When the oldest waiting request has used half of its TTFT target, the step takes
  the whole ``max_num_batched_tokens`` budget to start it: one longer step costs the
  running decodes little of their mean TPOT, while a missed TTFT loses the request.
- With nothing decoding, prefill runs at the full budget.

The chosen budget and cap are published on ``/metrics``
(``deepserve_scheduler_token_budget``, ``deepserve_scheduler_batch_limit``).
"""

from __future__ import annotations

import time
from typing import Any

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
        self._last_end: float | None = None
        self._pending: tuple[int, float] | None = None

    def plan(self, running: list[Any], waiting: Any) -> tuple[int, int]:
        """(token budget, batch cap) for the next step."""
        decodes = sum(1 for s in running if s.num_computed >= s.prompt_len)
        budget, cap = self.max_tokens, self.max_seqs
        fit = self.model.coefficients()
        if self.tpot_s is not None and fit is not None:
            a, b = fit
            fits = int((self.tpot_s - a) / b + 1e-6) if self.tpot_s > a else 0
            cap = max(1, min(self.max_seqs, fits))
            if decodes:
                budget = max(decodes + MIN_CHUNK, min(self.max_tokens, fits))
        if self.ttft_s is not None and waiting:
            oldest = min(s.arrival for s in waiting)
            if time.time() - oldest > self.ttft_s / 2:
                budget = self.max_tokens  # start it now: its TTFT is at risk
                cap = max(cap, min(self.max_seqs, len(running) + 1))
        self.budget, self.batch_limit = budget, cap
        return budget, cap

    def observe(self, items: list[tuple[Any, int]], started: float, ended: float) -> None:
        """A step ran ``items`` from ``started`` to ``ended`` (perf_counter seconds). The
        time outside the model run (scheduling, detokenizing) is charged to the step
        before, measured as the gap to the next step while the engine is busy."""
        tokens = sum(n for _, n in items)
        if self._pending is not None and self._last_end is not None:
            gap = started - self._last_end
            prev_tokens, prev_s = self._pending
            self.model.add(prev_tokens, prev_s + (gap if gap < 0.05 else 0.0))
        self._pending = (tokens, ended - started)
        self._last_end = ended
