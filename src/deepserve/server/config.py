"""``deepserve serve``'s HTTP-side settings (``ServerConfig``) and their help: light
enough to import before torch and FastAPI, so the command line is parsed and the
HTTP side imported while the weights load."""

from __future__ import annotations

from dataclasses import dataclass

from deepserve.errors import DeepserveError
from deepserve.server.reasoning import REASONING_PARSERS

POOLINGS = ("auto", "mean", "last")
PREFIX_CACHE_SCOPES = ("global", "key")
TASKS = ("all", "generate", "embed")
SERVER_HELP = {
    "host": "address to listen on", "port": "port to listen on",
    "api_key": "require this bearer key on every path but /health",
    "max_queue": "waiting requests beyond max_num_seqs at which new ones get 429",
    "shutdown_grace": "seconds SIGTERM waits for running requests",
    "ledger": "usage ledger to append to: a SQLite file path, or a postgresql:// URL "
              "shared by a fleet",
    "ledger_usage": "write a row per request (--no-ledger-usage: only this replica's "
                    "uptime, for backends behind a gateway that bills)",
    "redis": "redis:// URL: key budgets, token quotas and rate limits shared with every "
             "other replica using it (default: per process)",
    "rate_limit_rpm": "requests per minute per API key (or client address without keys); "
                      "over it: 429 with Retry-After (0: off)",
    "rate_limit_tpm": "prompt + completion tokens per minute per API key (0: off)",
    "plugin_config": "TOML with one [NAME] table of settings per plugin (--plugin)",
    "warmup": "run representative batch shapes before reporting ready, so the first "
              "request is as fast as the rest (--no-warmup: ready sooner)",
    "pricing": "pricing policy TOML (default: DeepSeek-R1 list prices)",
    "api_keys": "TOML key file with per-key budgets and token quotas (with --ledger: "
                "seeds the ledger's key table, which the admin API manages)",
    "admin_key": "bearer key of the admin API (/admin/...) and the console's admin pages; "
                 "with --ledger, API keys live in the ledger's database (default: "
                 "$DEEPSERVE_ADMIN_KEY)",
    "pricing_clock": "price every request as if at this ISO time (simulations)",
    "tier": "tier name recorded in the ledger",
    "hardware": "hardware name recorded with replica uptime",
    "hourly_cost": "this replica's cost per hour, exported for margin dashboards",
    "max_request_bytes": "larger request bodies get 413 (e.g. 8MiB, 2000000)",
    "request_timeout": "seconds a request may take before it is cancelled with a 408 "
                       "(0: no limit)",
    "max_tokens_default": "max_tokens for chat requests that give none",
    "metrics_port": "also serve /metrics on this port, without a key (with --api-key(s), "
                    "/metrics on the main port needs one)",
    "prefix_cache_scope": "key: requests share cached prompt blocks only within one API "
                          "key (and cache_salt)",
    "header_timeout": "seconds a connection may take to send a request's head, from "
                      "opening or from its previous response; then it is closed "
                      "(0: no limit)",
    "max_connections": "open connections past which new requests get 503 (0: no cap)",
    "allow_special_tokens_in_content": "read control-token spellings in messages (e.g. "
                                       "<|im_end|>) as control tokens, for trusted "
                                       "clients (default: they are text)",
    "task": "what this server answers: all (default), generate (chat, completions, "
            "responses) or embed (/v1/embeddings only)",
    "embedding_pooling": "how /v1/embeddings pools the final hidden states: mean, last "
                         "(last token), or auto (last when the model's name contains "
                         "'embed', else mean)",
    "reasoning_parser": "split <think>...</think> into reasoning_content (on by default "
                        "when the chat template uses <think>)",
}


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-side settings of ``deepserve serve``."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 256
    shutdown_grace: float = 30.0
    ledger: str | None = None  # SQLite path or postgresql:// URL; None: no ledger
    ledger_usage: bool = True  # False: record uptime only (a gateway in front bills)
    redis: str | None = None  # redis:// URL for budgets and quotas shared across replicas
    rate_limit_rpm: int = 0  # requests per minute per key (0: off)
    rate_limit_tpm: int = 0  # tokens per minute per key (0: off)
    warmup: bool = True  # run representative shapes before /health reports ready
    plugins: tuple[str, ...] = ()  # --plugin module:attr (entry points load too)
    plugin_config: str | None = None  # TOML: [NAME] settings per plugin
    pricing: str | None = None  # pricing policy TOML; None: DeepSeek-R1 list prices
    api_keys: str | None = None  # key file with budgets and quotas
    admin_key: str | None = None  # the admin API's bearer key (None: admin API off)
    pricing_clock: str | None = None  # fixed ISO time for pricing (tests, simulations)
    tier: str | None = None  # tier name recorded in the ledger
    hardware: str | None = None  # recorded with replica uptime (default: detected)
    hourly_cost: float = 0.0  # this replica's cost per hour, exported for margin dashboards
    max_request_bytes: int = 8 * 2**20  # larger bodies get 413 before they are read whole
    request_timeout: float | None = 600.0  # seconds; past it 408 (or an SSE error event)
    max_tokens_default: int = 4096  # chat requests that give no max_tokens
    metrics_port: int | None = None  # serve /metrics here too, without a key
    prefix_cache_scope: str = "global"  # "key": tenants never share cached KV blocks
    # "deepseek_r1": <think> text -> reasoning_content; None: on if the template thinks
    reasoning_parser: str | None = None
    task: str = "all"  # all | generate | embed: which endpoints this server answers
    header_timeout: float = 10.0  # seconds to send a request's head (0: no limit)
    max_connections: int = 1024  # open connections past which requests get 503 (0: off)
    # True: control-token spellings in messages become control tokens (trusted clients)
    allow_special_tokens_in_content: bool = False
    embedding_pooling: str = "auto"  # mean | last | auto (last for "*embed*" models)

    def __post_init__(self) -> None:
        if self.embedding_pooling not in POOLINGS:
            raise DeepserveError(f"embedding_pooling={self.embedding_pooling!r} is not one "
                                 f"of {', '.join(POOLINGS)}", param="embedding_pooling")
        if self.task not in TASKS:
            raise DeepserveError(f"task={self.task!r} is not one of {', '.join(TASKS)}",
                                 param="task")
        if self.prefix_cache_scope not in PREFIX_CACHE_SCOPES:
            raise DeepserveError(f"prefix_cache_scope={self.prefix_cache_scope!r} is not one "
                                 f"of {', '.join(PREFIX_CACHE_SCOPES)}",
                                 param="prefix_cache_scope")
        if self.max_request_bytes < 1024:
            raise DeepserveError(f"max_request_bytes={self.max_request_bytes} is too small; "
                                 "give at least 1024", param="max_request_bytes")
        if self.request_timeout == 0:
            object.__setattr__(self, "request_timeout", None)  # 0: no limit
        if self.request_timeout is not None and self.request_timeout < 0:
            raise DeepserveError("request_timeout must be >= 0 seconds (0: no limit)",
                                 param="request_timeout")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise DeepserveError(f"reasoning_parser={self.reasoning_parser!r} is not one of "
                                 f"{', '.join(REASONING_PARSERS)}", param="reasoning_parser")
        object.__setattr__(self, "plugins", tuple(self.plugins or ()))
        if self.admin_key is None:
            import os

            object.__setattr__(self, "admin_key", os.environ.get("DEEPSERVE_ADMIN_KEY") or None)
        if self.admin_key is not None and len(self.admin_key) < 16:
            raise DeepserveError("admin_key must be at least 16 characters (e.g. the output "
                                 "of `openssl rand -hex 24`)", param="admin_key")
        if self.redis is not None and not self.redis.startswith(("redis://", "rediss://",
                                                                  "unix://")):
            raise DeepserveError(f"redis={self.redis!r} is not a redis:// URL (e.g. "
                                 "redis://127.0.0.1:6379/0)", param="redis")
        if not self.ledger_usage and not self.ledger:
            raise DeepserveError("--no-ledger-usage records this replica's uptime in a "
                                 "ledger: give --ledger too", param="ledger_usage")
        if self.redis and not (self.api_keys or self.rate_limit_rpm or self.rate_limit_tpm):
            raise DeepserveError("--redis shares key budgets, quotas and rate limits, and "
                                 "none is set: add --api-keys or --rate-limit-rpm/tpm, or "
                                 "drop --redis", param="redis")
        if self.rate_limit_rpm < 0 or self.rate_limit_tpm < 0:
            raise DeepserveError("rate limits must be >= 0 (0: off)", param="rate_limit_rpm")
        if self.header_timeout < 0 or self.max_connections < 0:
            raise DeepserveError("header_timeout and max_connections must be >= 0 (0: off)",
                                 param="header_timeout")
        if self.max_tokens_default < 1:
            raise DeepserveError("max_tokens_default must be >= 1", param="max_tokens_default")
