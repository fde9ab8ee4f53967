"""Transport limits for the server and the gateway: a header-read timeout and a cap on
open connections.

uvicorn closes an idle keep-alive connection after a response, but a connection that
never sends a byte, or sends its request head a byte at a time, stays open for ever:
enough of them exhaust the process's file descriptors and every request fails.
``http_protocol`` gives uvicorn its own HTTP protocol class (httptools when installed,
else h11) with one more timer: a connection must finish sending a request's head within
``header_timeout`` seconds of opening, or of its previous response; else it is closed.
The connection cap is uvicorn's ``limit_concurrency``: past it, new requests get 503.
"""

from __future__ import annotations

import asyncio
from typing import Any


def http_protocol(header_timeout: float) -> type:
    """uvicorn's HTTP protocol class with a header-read timeout."""
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class HeaderTimeout(Base):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None

        def _waiting_for_head(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is None or cycle.response_complete

        def _arm(self) -> None:
            if self._head_timer is None and header_timeout > 0:
                self._head_timer = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            if self._waiting_for_head() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._waiting_for_head():
                self._arm()  # a head still coming in (or the next request's)
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # idle now: uvicorn's keep-alive timeout takes over
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeout
