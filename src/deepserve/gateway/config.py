"""Gateway configuration, from TOML (``deepserve gateway --config gateway.toml``).

    [gateway]
    host = "127.0.0.1"
    port = 9000
    policy = "model"          # default: model | auto | slo | cascade | ab
    balancing = "cache_aware" # within a tier: cache_aware | round_robin | least_loaded
    api_keys = "keys.toml"    # optional: keys, budgets, quotas (billing/keys.py format);
                              # with a ledger it seeds the ledger's key table
    admin_key = "..."         # optional: the admin API's key (/admin, the console's
                              # admin pages); default $DEEPSERVE_ADMIN_KEY
    ledger = "gateway.db"     # optional: usage ledger of everything routed (a SQLite
                              # path or a postgresql:// URL shared by every gateway)
    redis = "redis://127.0.0.1:6379/0"  # optional: limits, quotas, budgets shared by
                              # every replica using this Redis (default: per process)
    pricing = "pricing.toml"  # optional: prices per model name (tier name)
    rate_limit_rpm = 600      # per key, requests per minute (0: off)
    rate_limit_tpm = 0        # per key, tokens per minute (0: off)
    plugins = ["deepserve.compliance:ComplianceFilter"]  # optional (see deepserve.plugins)
    plugin_config = "plugins.toml"  # optional: [NAME] settings per plugin
    discovery = "dns"         # a backend named by a DNS name is every address it
                              # resolves to ("off": use the URL as given)
    resolve_interval_s = 10   # how often such names are resolved again

    [tiers.lite]              # tiers in order of strength: first is the lightest
    models = ["lite", "fast"] # public model names (aliases) that select this tier
    backends = ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]

    [tiers.pro]
    models = ["pro"]
    backends = ["http://127.0.0.1:8003"]

    [routing]
    default_tier = "lite"
    auto_prompt_chars = 2000  # auto: longer prompts go to the strongest tier
    auto_max_tokens = 512     # auto: bigger max_tokens goes to the strongest tier
    task_tiers = { analysis = "pro", chat = "lite" }  # auto: x-deepserve-task header
    cascade_min_logprob = -1.0  # cascade: escalate when mean token logprob is lower
    ab_weights = { lite = 0.5, pro = 0.5 }
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepserve.config import read_toml
from deepserve.errors import DeepserveError

POLICIES = ("model", "auto", "slo", "cascade", "ab")
DISCOVERY = ("dns", "off")
BALANCING = ("cache_aware", "round_robin", "least_loaded")


@dataclass(frozen=True)
class TierConfig:
    """A group of interchangeable backends serving the same model."""

    name: str
    models: tuple[str, ...]
    backends: tuple[str, ...]


@dataclass(frozen=True)
class GatewayConfig:
    """Everything ``deepserve gateway`` needs; tiers are ordered light to strong."""

    tiers: tuple[TierConfig, ...]
    host: str = "127.0.0.1"
    port: int = 9000
    policy: str = "model"
    balancing: str = "cache_aware"
    api_keys: str | None = None
    admin_key: str | None = None
    ledger: str | None = None
    redis: str | None = None
    pricing: str | None = None
    rate_limit_rpm: int = 0
    rate_limit_tpm: int = 0
    default_tier: str | None = None
    auto_prompt_chars: int = 2000
    auto_max_tokens: int = 512
    task_tiers: dict[str, str] = field(default_factory=dict)
    cascade_min_logprob: float = -1.0
    ab_weights: dict[str, float] = field(default_factory=dict)
    health_interval_s: float = 2.0
    max_attempts: int = 3
    affinity_slack: int = 4  # cache_aware: tolerated extra load on the affine replica
    discovery: str = "dns"
    resolve_interval_s: float = 10.0
    plugins: tuple[str, ...] = ()
    plugin_config: str | None = None
    header_timeout: float = 10.0  # seconds to send a request's head (0: no limit)
    max_connections: int = 1024  # open connections past which requests get 503

    def tier(self, name: str) -> TierConfig:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    @classmethod
    def load(cls, path: str | Path) -> GatewayConfig:
        return cls.from_dict(read_toml(path, "gateway config", "config"), str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "gateway config") -> GatewayConfig:
        def bad(msg: str) -> DeepserveError:
            return DeepserveError(f"{source}: {msg}", param="config")

        tiers = []
        for name, spec in (data.get("tiers") or {}).items():
            backends = tuple(str(b).rstrip("/") for b in spec.get("backends", []))
            if not backends:
                raise bad(f"tiers.{name} has no backends (list their base URLs)")
            tiers.append(TierConfig(name, tuple(spec.get("models", [name])) or (name,),
                                    backends))
        if not tiers:
            raise bad("no [tiers.NAME] sections; define at least one tier with backends")
        gw = data.get("gateway", {})
        routing = data.get("routing", {})
        cfg = cls(tiers=tuple(tiers), host=gw.get("host", "127.0.0.1"),
                  port=int(gw.get("port", 9000)), policy=gw.get("policy", "model"),
                  balancing=gw.get("balancing", "cache_aware"), api_keys=gw.get("api_keys"),
                  admin_key=gw.get("admin_key") or os.environ.get("DEEPSERVE_ADMIN_KEY"),
                  ledger=gw.get("ledger"), redis=gw.get("redis"), pricing=gw.get("pricing"),
                  rate_limit_rpm=int(gw.get("rate_limit_rpm", 0)),
                  rate_limit_tpm=int(gw.get("rate_limit_tpm", 0)),
                  default_tier=routing.get("default_tier", tiers[0].name),
                  auto_prompt_chars=int(routing.get("auto_prompt_chars", 2000)),
                  auto_max_tokens=int(routing.get("auto_max_tokens", 512)),
                  task_tiers=dict(routing.get("task_tiers", {})),
                  cascade_min_logprob=float(routing.get("cascade_min_logprob", -1.0)),
                  ab_weights={k: float(v) for k, v in routing.get("ab_weights", {}).items()},
                  health_interval_s=float(gw.get("health_interval_s", 2.0)),
                  max_attempts=int(gw.get("max_attempts", 3)),
                  affinity_slack=int(gw.get("affinity_slack", 4)),
                  discovery=gw.get("discovery", "dns"),
                  resolve_interval_s=float(gw.get("resolve_interval_s", 10.0)),
                  plugins=tuple(gw.get("plugins", ())),
                  plugin_config=gw.get("plugin_config"),
                  header_timeout=float(gw.get("header_timeout", 10.0)),
                  max_connections=int(gw.get("max_connections", 1024)))
        if cfg.admin_key is not None and len(str(cfg.admin_key)) < 16:
            raise bad("admin_key must be at least 16 characters (e.g. the output of "
                      "`openssl rand -hex 24`)")
        if cfg.policy not in POLICIES:
            raise bad(f"policy {cfg.policy!r} is not one of {', '.join(POLICIES)}")
        if cfg.discovery not in DISCOVERY:
            raise bad(f"discovery {cfg.discovery!r} is not one of {', '.join(DISCOVERY)}")
        if cfg.resolve_interval_s <= 0:
            raise bad("resolve_interval_s must be > 0 seconds")
        if cfg.redis and not (cfg.api_keys or cfg.rate_limit_rpm or cfg.rate_limit_tpm):
            raise bad("redis shares key budgets, quotas and rate limits, and none is set: "
                      "add api_keys or rate_limit_rpm/tpm, or drop redis")
        if cfg.redis is not None and not str(cfg.redis).startswith(("redis://", "rediss://",
                                                                      "unix://")):
            raise bad(f"redis {cfg.redis!r} is not a redis:// URL (e.g. "
                      "redis://127.0.0.1:6379/0)")
        if cfg.balancing not in BALANCING:
            raise bad(f"balancing {cfg.balancing!r} is not one of {', '.join(BALANCING)}")
        names = {t.name for t in tiers}
        for label, tier in [("default_tier", cfg.default_tier),
                            *((f"task_tiers.{k}", v) for k, v in cfg.task_tiers.items()),
                            *((f"ab_weights.{k}", k) for k in cfg.ab_weights)]:
            if tier not in names:
                raise bad(f"{label} names tier {tier!r}, but the tiers are {sorted(names)}")
        return cfg
