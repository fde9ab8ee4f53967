"""The life of one request between the route and the engine: admission, preparation off
the event loop, the request timeout, and noticing a client that has gone.

- ``Admission`` counts requests from the moment they are admitted (before tokenizing)
  until their response is finished, so the limit holds however many arrive at once.
- ``Preparer`` tokenizes, renders chat templates and compiles grammars in one worker
  thread: the event loop keeps answering ``/health`` while a long prompt is prepared.
- ``until_done`` runs a non-streaming request and cancels it (freeing its KV blocks,
  billing what was produced) when the client disconnects or the timeout passes.
- ``guarded_stream`` does the same for a streaming response and ends the stream with an
  error event on timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.requests import Request

from deepserve.errors import DeepserveError
from deepserve.protocol.http import SSE_DONE, sse_error

logger = logging.getLogger(__name__)
T = TypeVar("T")


class APIError(Exception):
    """An error answered with the OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def check_text(req: Any) -> None:
    """400 for a request body holding text that cannot be UTF-8 (a lone surrogate)."""
    from deepserve.protocol.models import bad_text_path

    where = bad_text_path(req.model_dump(exclude_none=True))
    if where is not None:
        raise APIError(400, f"{where} is not valid Unicode text (it holds a lone UTF-16 "
                       "surrogate such as \\ud800); send text that encodes as UTF-8",
                       param=where)


class ClientGone(Exception):
    """The client closed the connection before its response was ready."""


class Admission:
    """Requests in flight, counted from admission to the end of their response.

    ``enter`` checks and counts in one synchronous call (no ``await`` between), so on one
    event loop no two requests can both pass the last free place."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def enter(self, weight: int = 1) -> Callable[[], None]:
        if self.in_flight + weight > self.limit:
            raise APIError(429, f"server is at capacity ({self.in_flight} requests in flight,"
                           f" limit {self.limit}: max_num_seqs + max_queue); retry after a "
                           "moment", code="queue_full", headers={"Retry-After": "1"})
        self.in_flight += weight
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= weight

        return release


class Preparer:
    """One worker thread for tokenizing and validating requests, off the event loop.
    One thread, because a tokenizer's settings are not safe to change from two at once."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepserve-prepare")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def timeout_error(timeout: float) -> APIError:
    return APIError(408, f"request timed out after {timeout:g} s (the server's "
                    "--request-timeout); ask for fewer tokens (max_tokens) or retry when the "
                    "server is less busy", code="request_timeout")


async def until_done(request: Request, work: Awaitable[T], timeout: float | None) -> T:
    """Await ``work``; cancel it if the client disconnects (ClientGone) or ``timeout``
    seconds pass (APIError 408). Cancelling aborts the engine request."""
    task = asyncio.ensure_future(work)
    deadline = None if not timeout else time.monotonic() + timeout
    try:
        while True:
            wait = 0.25 if deadline is None else max(0.0, min(0.25,
                                                              deadline - time.monotonic()))
            done, _ = await asyncio.wait({task}, timeout=wait)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone
            if deadline is not None and time.monotonic() >= deadline:
                raise timeout_error(timeout)  # type: ignore[arg-type]
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def guarded_stream(chunks: AsyncIterator[str], timeout: float | None,
                         on_end: Callable[[], None]) -> AsyncIterator[str]:
    """Pass SSE chunks through; past ``timeout`` end with an error event and [DONE].
    ``on_end`` runs however the stream ends (finished, timed out, client gone)."""
    deadline = None if not timeout else time.monotonic() + timeout
    try:
        while True:
            try:
                if deadline is None:
                    chunk = await anext(chunks)
                else:
                    chunk = await asyncio.wait_for(anext(chunks),
                                                   max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                return
            except TimeoutError:
                err = timeout_error(timeout)  # type: ignore[arg-type]
                yield sse_error(err.status, err.message, err.code)
                yield SSE_DONE
                return
            except DeepserveError as exc:  # the request failed (a constraint, say)
                yield sse_error(exc.status, exc.message, exc.code)
                yield SSE_DONE
                return
            yield chunk
    finally:
        with contextlib.suppress(Exception):
            await chunks.aclose()  # type: ignore[attr-defined]
        on_end()
