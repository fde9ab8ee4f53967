"""Which tier answers a request: by model name, by request features (auto), by latency
SLO, by weighted A/B split (sticky per key), or by cascade (decided after lite answers)."""

from __future__ import annotations

import hashlib
from typing import Any

from deepserve.errors import DeepserveError
from deepserve.gateway.config import POLICIES, GatewayConfig
from deepserve.gateway.pool import TierPool


class Router:
    """Picks a tier name for a request body and its headers."""

    def __init__(self, cfg: GatewayConfig, pools: dict[str, TierPool]) -> None:
        self.cfg = cfg
        self.pools = pools
        self.order = [t.name for t in cfg.tiers]  # light to strong
        self.aliases = {m: t.name for t in cfg.tiers for m in t.models}

    def policy(self, headers: dict[str, str]) -> str:
        policy = headers.get("x-deepserve-route") or self.cfg.policy
        if policy not in POLICIES:
            raise DeepserveError(f"x-deepserve-route {policy!r} is not one of "
                                 f"{', '.join(POLICIES)}", param="x-deepserve-route")
        return policy

    def by_model(self, model: str | None) -> str:
        if not model or model in ("auto", "default"):
            return self.cfg.default_tier or self.order[0]
        if model in self.aliases:
            return self.aliases[model]
        raise DeepserveError(f"model {model!r} does not exist here; available: "
                             f"{sorted(self.aliases)}", param="model", status=404,
                             code="model_not_found")

    def choose(self, policy: str, body: dict[str, Any], headers: dict[str, str],
               sticky_id: str) -> str:
        """Tier for every policy except cascade (which starts at the lightest tier)."""
        model = body.get("model")
        if policy == "model":
            return self.by_model(model)
        if model and model not in ("auto", "default") and model in self.aliases and \
                policy != "slo" and policy != "ab" and policy != "auto":
            return self.aliases[model]
        if policy == "cascade":
            return self.order[0]
        if policy == "auto":
            return self._auto(body, headers)
        if policy == "slo":
            return self._slo(headers)
        return self._ab(sticky_id)

    def _auto(self, body: dict[str, Any], headers: dict[str, str]) -> str:
        task = headers.get("x-deepserve-task")
        if task:
            if task not in self.cfg.task_tiers:
                raise DeepserveError(f"x-deepserve-task {task!r} is not configured; known "
                                     f"tasks: {sorted(self.cfg.task_tiers)}",
                                     param="x-deepserve-task")
            return self.cfg.task_tiers[task]
        if "messages" in body:
            chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", [])
                        if isinstance(m, dict))
        else:
            chars = len(str(body.get("prompt", "")))
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 0
        if chars > self.cfg.auto_prompt_chars or max_tokens > self.cfg.auto_max_tokens:
            return self.order[-1]
        return self.cfg.default_tier or self.order[0]

    def _slo(self, headers: dict[str, str]) -> str:
        raw = headers.get("x-deepserve-slo-ms")
        try:
            slo_ms = float(raw) if raw is not None else None
        except ValueError:
            slo_ms = None
        if slo_ms is None or slo_ms <= 0:
            raise DeepserveError("the slo policy needs a positive x-deepserve-slo-ms header "
                                 "(target time to first token, ms)", param="x-deepserve-slo-ms")
        # The strongest tier whose recent TTFT meets the target; unknown latency counts
        # as meeting it only for the lightest tier.
        for name in reversed(self.order):
            ttft, _ = self.pools[name].latency()
            if ttft is not None and ttft * 1000 <= slo_ms:
                return name
        return self.order[0]

    def _ab(self, sticky_id: str) -> str:
        weights = self.cfg.ab_weights or {n: 1.0 for n in self.order}
        total = sum(weights.values())
        h = hashlib.sha256(sticky_id.encode()).digest()
        point = int.from_bytes(h[:8], "big") / 2**64 * total
        acc = 0.0
        for name, w in weights.items():
            acc += w
            if point < acc:
                return name
        return next(iter(weights))
