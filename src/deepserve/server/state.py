"""What the server's routes share: its state (engine, metrics, meter, admission,
preparation thread, chat template facts) and settings (``ServerConfig``, in
server/config.py)."""

from __future__ import annotations

import time
from typing import Any

from fastapi.responses import JSONResponse
from prometheus_client import Gauge

from deepserve.billing.meter import BillingError, Meter, build_meter
from deepserve.billing.ratelimit import make_limiter
from deepserve.engine.async_engine import AsyncEngine
from deepserve.errors import DeepserveError
from deepserve.protocol.http import error_body, same_key
from deepserve.protocol.models import ChatCompletionRequest, CompletionRequest
from deepserve.server.config import (  # noqa: F401  (the names cli.py and tests use)
    PREFIX_CACHE_SCOPES,
    SERVER_HELP,
    TASKS,
    ServerConfig,
)
from deepserve.server.metrics import ServerMetrics
from deepserve.server.pipeline import Admission, Preparer
from deepserve.server.reasoning import REASONING_PARSERS, template_thinks  # noqa: F401
from deepserve.server.serving import OpenAIServing


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers=headers)


class ServerState:
    """What the routes share: engine, metrics, meter, admission, draining flag."""

    def __init__(self, engine: AsyncEngine, cfg: ServerConfig) -> None:
        self.engine = engine
        self.cfg = cfg
        self.model_name = engine.model_name
        self.metrics = ServerMetrics(engine, self.model_name)
        self.meter = _build_meter(engine, cfg, self.metrics)
        # with keys, a limiter is kept for their own RPM/TPM even when the server has none
        self.limiter = make_limiter(cfg.rate_limit_rpm, cfg.rate_limit_tpm, cfg.redis) \
            if cfg.rate_limit_rpm or cfg.rate_limit_tpm or self.meter.keys is not None \
            else None
        self.meter.limiter = self.limiter
        cost = Gauge("deepserve_replica_cost_per_hour", "What this replica costs per hour "
                     "(--hourly-cost), in the pricing currency", ["model", "hardware"],
                     registry=self.metrics.registry)
        cost.labels(self.model_name, cfg.hardware or _hardware(engine.engine)).set(
            cfg.hourly_cost)
        self.serving = OpenAIServing(engine, self.metrics, self.model_name, self.meter)
        self.admission = Admission(engine.engine.config.max_num_seqs + cfg.max_queue)
        self.preparer = Preparer()
        self.chat_template = getattr(engine.tokenizer, "chat_template", None)
        if not isinstance(self.chat_template, str):
            self.chat_template = None
        self.reasoning = cfg.reasoning_parser is not None or template_thinks(
            self.chat_template)
        self.draining = False
        self.started = time.time()
        from deepserve.server.response_store import ResponseStore

        self.responses = ResponseStore(cfg.ledger)

    def live_stats(self) -> dict[str, Any]:
        """The console's live view: load, queue, KV cache and output tokens per second
        (over the time since the previous call)."""
        st = self.engine.stats
        now, total = time.monotonic(), self.metrics.generation_tokens._value.get()
        last_t, last_n = getattr(self, "_last_rate", (now, total))
        self._last_rate = (now, total)
        rate = (total - last_n) / (now - last_t) if now > last_t else 0.0
        return {"front": "server", "model": self.model_name, "running": st.num_running,
                "waiting": st.num_waiting, "in_flight": self.admission.in_flight,
                "max_num_seqs": st.max_num_seqs, "kv_cache_usage": st.kv_cache_usage,
                "prefix_cache_hit_rate": st.prefix_cache_hit_rate,
                "utilization": st.utilization, "output_tokens_per_s": round(rate, 2),
                "generated_tokens": int(total), "uptime_s": round(time.time() - self.started)}

    def share(self, bill: Any, key_id: str | None, user: str | None) -> None:
        """Whose share of the batch a request runs in: its API key (with the key's
        weight), else its ``user``, else everyone's."""
        bill.tenant = f"key:{key_id}" if key_id else (f"user:{user}" if user else "")
        key = self.meter.keys.get(key_id) if key_id and self.meter.keys is not None else None
        bill.weight = key.weight if key is not None else 1.0

    def check_task(self, kind: str, path: str) -> None:
        """400 for an endpoint of a kind (generate, embed) this server was not started
        for (``--task``)."""
        if self.cfg.task not in ("all", kind):
            raise DeepserveError(f"this server was started with --task {self.cfg.task}: it "
                                 f"does not answer {path}; start one with --task all or "
                                 f"--task {kind} for it", param="model",
                                 code="unsupported_task")

    def check_key(self, key: str | None) -> str | tuple[int, str, str] | None:
        """Bearer key -> key id (None without a key file), or (status, message, code)."""
        if self.meter.keys is None and self.meter.is_admin(key):
            return "admin"
        if self.cfg.api_key and same_key(key, self.cfg.api_key):
            return None  # the one --api-key, beside a key table
        if self.meter.keys is not None:
            try:
                return self.meter.authorize(key)
            except BillingError as exc:
                return exc.status, exc.message, exc.code
        if self.cfg.api_key and not same_key(key, self.cfg.api_key):
            why = "missing" if key is None else "wrong"
            return (401, f"API key {why}: send 'Authorization: Bearer <key>' with the key "
                    "the server was started with", "invalid_api_key")
        return None

    def cache_salt(self, req: ChatCompletionRequest | CompletionRequest,
                   key_id: str | None) -> str | None:
        """Which requests may share prefix-cache blocks: same ``cache_salt`` and
        ``prompt_cache_key``, and with ``--prefix-cache-scope key`` the same API key too."""
        salt = req.cache_salt or ""
        if req.prompt_cache_key:
            salt = f"{salt}\0pck:{req.prompt_cache_key}"
        if self.cfg.prefix_cache_scope == "key":
            return f"key:{key_id or ''}\0{salt}"
        return salt or None


def _build_meter(engine: AsyncEngine, cfg: ServerConfig, metrics: ServerMetrics) -> Meter:
    from deepserve.billing.ledger import Ledger

    ledger = None
    if cfg.ledger:
        ledger = Ledger(cfg.ledger, engine.model_name, cfg.hardware or _hardware(engine.engine),
                        hourly_cost=cfg.hourly_cost, usage=cfg.ledger_usage)
    return build_meter(metrics.registry, lambda: engine.stats.utilization,
                       pricing=cfg.pricing, api_keys=cfg.api_keys, ledger=ledger,
                       tier=cfg.tier, pricing_clock=cfg.pricing_clock, redis=cfg.redis,
                       admin_key=cfg.admin_key)


def _hardware(engine: Any) -> str:
    import platform

    import torch

    if engine.device.type == "cuda":
        return torch.cuda.get_device_name(engine.device)
    return f"cpu:{platform.machine()}"
