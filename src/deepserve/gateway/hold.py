"""The gateway's budget holds: a request's largest possible cost is held against its key
before it is forwarded, and released once its bill is written."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from deepserve.billing.meter import BillingContext, BillingError, Meter


class BudgetHold:
    """A request's budget hold at the gateway: its largest possible cost on each tier it
    may be billed on (both, for a cascade), held until its bill is written."""

    def __init__(self, meter: Meter | None,
                 utilization: Callable[[str], float] = lambda tier: 0.5) -> None:
        self.meter = meter
        self.utilization = utilization  # the tier's, as its replicas report it
        self.contexts: list[BillingContext] = []
        self.streaming = False

    def reserve(self, key_id: str | None, tiers: list[str], body: dict[str, Any],
                kind: str) -> None:
        """``kind``: chat, completions, responses or embeddings."""
        if self.meter is None or self.meter.keys is None or key_id is None:
            return
        chat = kind in ("chat", "responses")
        prompt = {"chat": body.get("messages"), "completions": body.get("prompt"),
                  "responses": [body.get("instructions"), body.get("input")],
                  "embeddings": body.get("input")}.get(kind)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt_bound = len(prompt)
        else:  # no token is shorter than one byte of UTF-8
            prompt_bound = len(json.dumps(prompt, ensure_ascii=False).encode("utf-8",
                                                                              "replace"))
        out = body.get("max_completion_tokens") or body.get("max_tokens") or \
            body.get("max_output_tokens")
        out = out if isinstance(out, int) and out > 0 else (4096 if chat else 16)
        if kind == "embeddings":
            out = 0
        n = body.get("n") if isinstance(body.get("n"), int) and body["n"] > 0 else 1
        try:
            for tier in dict.fromkeys(tiers):
                ctx = BillingContext(key_id, self.meter.policy.quote(
                    tier, self.meter.clock(), self.utilization(tier)), time.time())
                self.meter.reserve(ctx, prompt_bound, out * n)
                self.contexts.append(ctx)
        except BillingError:
            self.release()
            raise

    def release(self) -> None:
        if self.meter is not None:
            for ctx in self.contexts:
                self.meter.release(ctx)
        self.contexts = []
