"""Ray Serve: one deployment per tier wrapping the engine, autoscaling on ongoing
requests, and an ingress deployment with the OpenAI routes in front.

    # ray.toml
    [ray]
    host = "127.0.0.1"
    port = 8000
    default_tier = "lite"
    ledger = "postgresql://deepserve@db:5432/ledger"  # optional: bill every replica here
    redis = "redis://127.0.0.1:6379/0"  # optional: budgets and quotas shared by replicas
    api_keys = "keys.toml"          # optional: keys, budgets, quotas (as for serve)
    pricing = "pricing.toml"        # optional: prices per model name

    [tiers.lite]
    models = ["lite"]               # public model names routed to this tier
    min_replicas = 1
    max_replicas = 4
    target_ongoing_requests = 8     # autoscaling target per replica
    num_cpus = 1                    # Ray CPUs reserved per replica
    placement_strategy = "PACK"     # a split model's ranks: PACK, SPREAD, STRICT_SPREAD
    [tiers.lite.engine]             # EngineConfig fields
    kv_cache_memory = "512MiB"
    num_threads = 1
    # pipeline_parallel_size = 2    # one replica across ranks (tensor_/expert_ too);
    # distributed_executor_backend = "ray"   # its ranks as Ray actors, on any node

    deepserve ray-serve --config ray.toml

Each tier replica runs the same FastAPI app as ``deepserve serve`` in-process and
streams its ASGI response back through a Ray Serve streaming handle, so the protocol,
errors and SSE are identical; responses carry ``x-deepserve-replica``.

With ``ledger`` (and ``api_keys``, ``pricing``, ``redis``) each replica meters like
``deepserve serve``: it writes a usage row per request and its uptime into the same
ledger, tagged with its tier, and with ``redis`` every replica draws on the same key
budgets and quotas.

A tier whose engine splits the model (a ``*_parallel_size`` above 1) with
``distributed_executor_backend = "ray"`` is deployed with one placement-group bundle
per rank (``num_cpus`` each): the replica is rank 0 in bundle 0 and starts its other
ranks as Ray actors in the others, so with ``placement_strategy = "SPREAD"`` (or
``"STRICT_SPREAD"``) one replica spans nodes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepserve.errors import DeepserveError

logger = logging.getLogger(__name__)


PLACEMENT = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
BILLING_FIELDS = ("ledger", "redis", "api_keys", "pricing", "pricing_clock",
                  "hourly_cost", "hardware")


@dataclass(frozen=True)
class RayTier:
    name: str
    models: tuple[str, ...]
    engine: dict[str, Any] = field(default_factory=dict)
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    placement_strategy: str = "PACK"  # where a split model's ranks go (Ray's strategies)

    @property
    def ranks(self) -> int:
        """Processes one replica spans (1 unless the engine splits the model; tensor x
        pipeline when both are given; expert parallelism with tensor parallelism uses
        the tensor ranks themselves)."""
        sizes = {k: int(self.engine.get(f"{k}_parallel_size", 1))
                 for k in ("tensor", "pipeline", "expert")}
        if sizes["tensor"] > 1:
            sizes["expert"] = 1
        return math.prod(sizes.values())

    def deployment_options(self) -> dict[str, Any]:
        """Ray Serve options: a split model on Ray actors gets one bundle per rank."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}
        if self.ranks > 1 and self.engine.get("distributed_executor_backend") == "ray":
            options["placement_group_bundles"] = [{"CPU": self.num_cpus}] * self.ranks
            options["placement_group_strategy"] = self.placement_strategy
        return options


@dataclass(frozen=True)
class RayServeConfig:
    tiers: tuple[RayTier, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    default_tier: str | None = None
    address: str | None = None  # an existing Ray cluster ("auto"), else a local one
    billing: dict[str, Any] = field(default_factory=dict)  # ServerConfig metering fields

    @classmethod
    def load(cls, path: str | Path) -> RayServeConfig:
        from deepserve.config import read_toml

        return cls.from_dict(read_toml(path, "ray config", "config"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RayServeConfig:
        from deepserve.config import EngineConfig

        tiers = []
        for name, t in (data.get("tiers") or {}).items():
            engine = dict(t.get("engine", {}))
            EngineConfig.from_kwargs(**engine)  # unknown names fail here, not in Ray
            tiers.append(RayTier(name, tuple(t.get("models", [name])), engine,
                                 int(t.get("min_replicas", 1)), int(t.get("max_replicas", 2)),
                                 float(t.get("target_ongoing_requests", 8)),
                                 float(t.get("num_cpus", 1)), float(t.get("num_gpus", 0)),
                                 str(t.get("placement_strategy", "PACK"))))
            if tiers[-1].placement_strategy not in PLACEMENT:
                raise DeepserveError(f"tiers.{name}.placement_strategy must be one of "
                                     f"{', '.join(PLACEMENT)}", param="config")
        if not tiers:
            raise DeepserveError("ray config defines no [tiers.NAME]", param="config")
        ray = data.get("ray", {})
        billing = {k: ray[k] for k in BILLING_FIELDS if ray.get(k) is not None}
        if billing:
            from deepserve.server.state import ServerConfig

            ServerConfig(**billing)  # bad values fail here, not inside a replica
        return cls(tuple(tiers), ray.get("host", "127.0.0.1"), int(ray.get("port", 8000)),
                   ray.get("default_tier", tiers[0].name), ray.get("address"), billing)


class TierReplica:
    """One engine replica of a tier (the body of the tier's Ray Serve deployment)."""

    def __init__(self, tier: str, served_name: str, engine_args: dict[str, Any],
                 billing: dict[str, Any] | None = None) -> None:
        from ray import serve

        from deepserve.config import EngineConfig
        from deepserve.engine.async_engine import AsyncEngine
        from deepserve.server.app import ServerConfig, create_app

        cfg = EngineConfig.from_kwargs(**{"served_model_name": served_name, **engine_args})
        self.engine = AsyncEngine(cfg, show_progress=False)
        self.engine.start()
        self.app = create_app(self.engine, ServerConfig(tier=tier, **(billing or {})))
        ctx = serve.get_replica_context()
        self.replica = str(getattr(ctx, "replica_tag", None) or ctx.replica_id)
        self.tier = tier

    async def handle_http(self, method: str, path: str, query: bytes,
                          headers: list[tuple[bytes, bytes]], body: bytes
                          ) -> AsyncIterator[dict[str, Any] | bytes]:
        """Run one HTTP request through the app; yield the response head, then body bytes."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": query, "root_path": "", "headers": headers,
                 "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
        from deepserve.protocol.http import body_once, disconnect_on

        # Nothing follows the body: the request waits until it ends or is cancelled.
        receive = body_once(body, disconnect_on(asyncio.Event()))

        out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        task = asyncio.create_task(self.app(scope, receive, out.put))
        try:
            start = await out.get()
            head = {k.decode(): v.decode() for k, v in start.get("headers", [])}
            head.pop("content-length", None)
            head["x-deepserve-replica"] = self.replica
            head["x-deepserve-tier"] = self.tier
            yield {"status": start["status"], "headers": head}
            while True:
                msg = await out.get()
                if msg["type"] == "http.response.body":
                    if msg.get("body"):
                        yield msg["body"]
                    if not msg.get("more_body"):
                        break
            await task
        finally:
            if not task.done():
                task.cancel()  # the client left: the app aborts the request


class OpenAIIngress:
    """The OpenAI routes in front: picks the tier by model name, streams its answer."""

    def __init__(self, handles: dict[str, Any], aliases: dict[str, str], default: str) -> None:
        self.handles = handles
        self.aliases = aliases
        self.default = default

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, StreamingResponse

        from deepserve.protocol.http import (
            error_body,
            model_not_found,
            model_object,
            models_list,
        )

        path = request.url.path
        served = [(m, {"tier": t}) for m, t in self.aliases.items()]
        if path in ("/health", "/"):
            return JSONResponse({"status": "ok", "tiers": sorted(self.handles)})
        if path == "/v1/models":
            return JSONResponse(models_list(served))
        if path.startswith("/v1/models/") and request.method == "GET":
            model_id = path.removeprefix("/v1/models/")
            found = model_object(served, model_id)
            return JSONResponse(found) if found is not None else JSONResponse(
                model_not_found(model_id, sorted(self.aliases)), status_code=404)
        body = await request.body()
        tier = self.default
        if body:
            try:
                model = json.loads(body).get("model")
            except (ValueError, AttributeError):
                model = None
            if model:
                tier = self.aliases.get(model, "")
                if not tier:
                    return JSONResponse(error_body(
                        404, f"model {model!r} does not exist; available: "
                        f"{sorted(self.aliases)}", "model", "model_not_found"),
                        status_code=404)
        handle = self.handles[tier].options(stream=True)
        gen = handle.handle_http.remote(request.method, path,
                                        request.url.query.encode(),
                                        [(k.lower(), v) for k, v in request.headers.raw
                                         if k.lower() != b"host"], body)
        head = await gen.__anext__()

        async def rest() -> AsyncIterator[bytes]:
            async for chunk in gen:
                yield chunk

        return StreamingResponse(rest(), status_code=head["status"], headers=head["headers"])


def build_app(cfg: RayServeConfig) -> Any:
    """The Ray Serve application: tier deployments bound into the ingress."""
    from ray import serve

    handles = {}
    aliases = {}
    for t in cfg.tiers:
        dep = serve.deployment(
            TierReplica, name=f"tier-{t.name}", **t.deployment_options(),
            autoscaling_config={"min_replicas": t.min_replicas,
                                "max_replicas": t.max_replicas,
                                "target_ongoing_requests": t.target_ongoing_requests},
            max_ongoing_requests=max(16, int(t.target_ongoing_requests * 4)))
        handles[t.name] = dep.bind(t.name, t.models[0], t.engine, cfg.billing)
        for m in t.models:
            aliases[m] = t.name
    ingress = serve.deployment(OpenAIIngress, name="openai-ingress",
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(handles, aliases, cfg.default_tier or cfg.tiers[0].name)


def run(cfg: RayServeConfig, blocking: bool = True) -> None:
    """Start (or join) a Ray cluster, start Serve's HTTP proxy and deploy the app."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name="deepserve", route_prefix="/", blocking=False)
    logger.info("Ray Serve: deepserve on http://%s:%d/v1 (tiers: %s)", cfg.host, cfg.port,
                ", ".join(f"{t.name} {t.min_replicas}-{t.max_replicas} replicas"
                          for t in cfg.tiers))
    if blocking:
        import time

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
