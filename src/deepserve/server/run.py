"""``deepserve serve``: load the model, serve HTTP, drain on SIGTERM."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from deepserve.config import EngineConfig
from deepserve.server.config import ServerConfig

if TYPE_CHECKING:
    from deepserve.server.state import ServerState

logger = logging.getLogger(__name__)


def run_server(engine_cfg: EngineConfig, cfg: ServerConfig) -> int:
    """Load the model, serve until SIGTERM/SIGINT, drain, exit 0.

    The engine loop runs in the main thread (torch's CPU kernels are fastest there) and
    uvicorn's event loop in a second thread; signals arrive in the main thread and are
    passed on: the first SIGTERM/SIGINT drains, a second stops at once.
    """
    import signal
    import threading

    import uvicorn

    from deepserve.engine.async_engine import AsyncEngine

    engine = AsyncEngine(engine_cfg)

    from deepserve.server.app import create_app

    app = create_app(engine, cfg)
    state: ServerState = app.state.deepserve
    from deepserve.protocol.transport import http_protocol

    server = _DrainingServer(uvicorn.Config(app, host=cfg.host, port=cfg.port,
                                            log_level="warning", access_log=False,
                                            timeout_graceful_shutdown=5,
                                            http=http_protocol(cfg.header_timeout),
                                            limit_concurrency=cfg.max_connections or None),
                             state)

    if cfg.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(cfg.metrics_port, addr=cfg.host, registry=state.metrics.registry)
        logger.info("metrics on http://%s:%d/metrics (no key needed there)", cfg.host,
                    cfg.metrics_port)

    def serve() -> None:
        try:
            server.run()
        finally:
            engine.shutdown()
            state.preparer.shutdown()
            if state.meter.ledger is not None:
                state.meter.ledger.close()

    def on_signal(sig: int, frame: Any) -> None:
        server.handle_exit(sig, frame)

    from deepserve.engine.malloc import freeze_heap
    from deepserve.engine.warmup import measure, warm_up

    measure(engine.engine)  # the machine's peak, for utilization (cached per machine)
    if cfg.warmup:
        warm_up(engine.engine)  # before HTTP starts: /health answers only once warm
    freeze_heap()  # the app and the warm-up's leftovers too
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    http = threading.Thread(target=serve, name="deepserve-http", daemon=True)
    http.start()
    logger.info("serving %s on http://%s:%d/v1", state.model_name, cfg.host, cfg.port)
    engine.run_forever()
    server.should_exit = True  # the engine stopped (drained, or failed): stop HTTP too
    http.join(30)
    if not server.started:
        logger.error("could not serve on %s:%d (is the port in use?)", cfg.host, cfg.port)
        return 1
    if engine.dead is not None:
        logger.error("engine failed: %s", engine.dead)
        return 1
    logger.info("stopped")
    return 0


class _DrainingServer:
    """uvicorn server whose first SIGTERM drains: new requests get 503, running ones finish
    (up to the grace period), then it exits. A second signal exits at once."""

    def __new__(cls, config: Any, state: ServerState) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            _drain_deadline = 0.0

            def handle_exit(self, sig: int, frame: Any) -> None:
                if state.draining:
                    self.should_exit = True
                    self.force_exit = True
                    return
                logger.info("signal %d: draining %d request(s), grace %.0fs", sig,
                            state.admission.in_flight, state.cfg.shutdown_grace)
                self._drain_deadline = time.monotonic() + state.cfg.shutdown_grace
                state.draining = True

            async def on_tick(self, counter: int) -> bool:
                if state.draining and (state.admission.in_flight == 0 or
                                       time.monotonic() > self._drain_deadline):
                    return True
                return await super().on_tick(counter)

        return Server(config)
