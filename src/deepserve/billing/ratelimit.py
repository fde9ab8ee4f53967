"""Per-key request and token rate limits over a sliding 60-second window, in the
process (``RateLimiter``) or shared by every replica through Redis
(``billing/shared.SharedRateLimiter``, same interface); ``make_limiter`` picks."""

from __future__ import annotations

import time
from collections import deque
from typing import Any


class RateLimiter:
    """Requests per minute and tokens per minute per key; 0 turns a limit off."""

    WINDOW = 60.0

    def __init__(self, rpm: int, tpm: int) -> None:
        self.rpm, self.tpm = rpm, tpm
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}

    def _trim(self, key: str, now: float) -> None:
        reqs = self._requests.setdefault(key, deque())
        while reqs and reqs[0] <= now - self.WINDOW:
            reqs.popleft()
        toks = self._tokens.setdefault(key, deque())
        while toks and toks[0][0] <= now - self.WINDOW:
            toks.popleft()

    def check(self, key: str, now: float | None = None, rpm: int | None = None,
              tpm: int | None = None) -> tuple[str, float] | None:
        """None if allowed (and counted); else (which limit, seconds to wait). ``rpm``
        and ``tpm`` replace the limiter's own for this key (a key's own limits)."""
        now = time.monotonic() if now is None else now
        rpm = self.rpm if rpm is None else rpm
        tpm = self.tpm if tpm is None else tpm
        self._trim(key, now)
        reqs = self._requests[key]
        if rpm and len(reqs) >= rpm:
            return "requests", reqs[0] + self.WINDOW - now
        toks = self._tokens[key]
        if tpm and sum(n for _, n in toks) >= tpm:
            return "tokens", toks[0][0] + self.WINDOW - now
        reqs.append(now)
        return None

    def add_tokens(self, key: str, n: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._tokens.setdefault(key, deque()).append((now, n))


def make_limiter(rpm: int, tpm: int, redis: str | None = None) -> Any:
    """The limiter for these settings: shared through ``redis`` when given. It counts
    tokens even with both limits 0: a key's own TPM may need them."""
    if redis:
        from deepserve.billing.shared import SharedRateLimiter

        return SharedRateLimiter(rpm, tpm, redis)
    return RateLimiter(rpm, tpm)


def retry_after(wait: float) -> str:
    """A Retry-After header value (whole seconds, at least 1)."""
    return str(max(1, int(wait + 0.999)))
