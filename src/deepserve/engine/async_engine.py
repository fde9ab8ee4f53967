"""asyncio front of the engine: the engine loop runs off the event loop's thread.

The event loop never waits on a forward pass. The loop either runs in a thread of its
own (``start()``), or in the process's main thread (``run_forever()``) while the event
loop runs in another: on this CPU torch's OpenMP kernels ran 25-50% slower when called
from a secondary thread, so the server puts the engine in the main thread.

Requests and aborts cross into the engine thread through a thread-safe queue drained
at each step boundary; a step's outputs cross back together, with one
``loop.call_soon_threadsafe`` that puts each on its request's asyncio queue (one call
per output cost the engine thread 9 us each, 0.6 ms of a 64-row step, and woke the
event loop 64 times).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from deepserve.config import EngineConfig
from deepserve.engine.llm_engine import LLMEngine
from deepserve.engine.sequence import RequestOutput
from deepserve.engine.stats import EngineStats
from deepserve.errors import DeepserveError
from deepserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; requests in flight get this error."""


class RequestFailedError(DeepserveError):
    """One request hit an internal error; the engine and other requests go on (500)."""

    def __init__(self, request_id: str, exc: BaseException) -> None:
        super().__init__(f"request {request_id} failed inside the engine "
                         f"({type(exc).__name__}: {exc}); other requests are unaffected, "
                         "retry, and report it if it repeats", status=500,
                         code="internal_error")


def _as_request_error(request_id: str, exc: BaseException) -> BaseException:
    return exc if isinstance(exc, DeepserveError) else RequestFailedError(request_id, exc)


class _Sink:
    """Where one request's outputs go: its asyncio queue on its event loop. Called with
    one item, it hands that over at once; ``deliver`` hands over many together."""

    __slots__ = ("loop", "outputs")

    def __init__(self, loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue) -> None:
        self.loop = loop
        self.outputs = outputs

    def __call__(self, item: RequestOutput | BaseException) -> None:
        """Hand over one item (a request's last); nothing where its loop has closed."""
        _Sink.deliver([("", self, item)])

    @staticmethod
    def deliver(items: list[tuple[str, _Sink, RequestOutput | BaseException]]) -> list[str]:
        """Each (request id, sink, item) onto its queue, in order, with one wake-up per
        event loop. Returns the requests whose event loop has closed: nothing can read
        their outputs any more."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, sink, item in items:
            by_loop.setdefault(sink.loop, []).append((rid, sink.outputs, item))
        gone = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop is closed
                gone += [rid for rid, _, _ in batch]
        return gone


def _put_all(batch: list[tuple[str, asyncio.Queue, Any]]) -> None:
    for _, q, item in batch:
        q.put_nowait(item)


@dataclass
class _Add:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    sink: _Sink
    priority: int = 0
    cache_salt: str | None = None
    validated: bool = False
    tenant: str = ""
    weight: float = 1.0


@dataclass
class _Abort:
    request_id: str


@dataclass
class _StopChoice:
    request_id: str
    index: int
    reason: str


class AsyncEngine:
    """``async for out in engine.generate(...)``: one RequestOutput per engine step.

    Outputs are cumulative (text and token ids so far); the last has ``finished``.
    Leaving the ``async for`` early (client gone) aborts the request at the next step.
    """

    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None,
                 show_progress: bool = True) -> None:
        self.engine = engine or LLMEngine(config or EngineConfig(), show_progress=show_progress)
        self._inbox: queue.SimpleQueue[_Add | _Abort | _StopChoice | None] = queue.SimpleQueue()
        self._sinks: dict[str, Any] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._external = False
        self.dead: BaseException | None = None

    @property
    def stats(self) -> EngineStats:
        """The engine's latest published snapshot: safe to read from any thread."""
        return self.engine.latest_stats

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def start(self) -> None:
        """Run the engine loop in a background thread (unless ``run_forever`` runs it)."""
        if self._thread is None and not self._external:
            self._thread = threading.Thread(target=self._loop, name="deepserve-engine",
                                            daemon=True)
            self._thread.start()

    def run_forever(self) -> None:
        """Run the engine loop in the calling thread until ``shutdown()``."""
        self._external = True
        self._loop()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._inbox.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _die(self, exc: BaseException) -> None:
        """The engine cannot go on: fail every request in flight; the loop ends."""
        self.dead = exc
        err = EngineDeadError(f"engine step failed: {exc}")
        for rid, sink in list(self._sinks.items()):
            sink(err)
            self.engine.abort(rid)
        self._sinks.clear()

    @property
    def num_unfinished(self) -> int:
        return len(self._sinks)

    def prepare(self, prompt: str | list[int] | None = None,
                messages: list[dict[str, Any]] | None = None,
                params: SamplingParams | None = None,
                default_max_tokens: int | None = None,
                chat_options: dict[str, Any] | None = None,
                literal_content: bool = True) -> tuple[str | None, list[int]]:
        """Tokenize and validate on the caller's side; raises DeepserveError.

        Thread-safe (it reads only the tokenizer and fixed settings), so the server runs
        it in a worker thread, off the event loop. A request without ``max_tokens`` gets
        ``default_max_tokens``, never more than the context has left."""
        params = params or SamplingParams()
        text, ids = self.engine.tokenize_prompt(prompt, messages, chat_options,
                                                literal_content)
        if params.max_tokens is None and len(ids) < self.engine.max_model_len:
            room = self.engine.max_model_len - len(ids)
            params.max_tokens = min(default_max_tokens or room, room)
        self.engine.check_request(ids, params, "messages" if messages is not None
                                  else "prompt")
        return text, ids

    async def generate(self, prompt: str | list[int] | None = None,
                       params: SamplingParams | None = None, request_id: str | None = None,
                       messages: list[dict[str, Any]] | None = None,
                       prompt_ids: list[int] | None = None,
                       priority: int = 0,
                       cache_salt: str | None = None,
                       validated: bool = False, tenant: str = "",
                       weight: float = 1.0) -> AsyncIterator[RequestOutput]:
        """``validated``: ``prompt_ids`` and ``params`` came from ``prepare`` and are not
        checked again (a request is validated once, off the event loop)."""
        if self.dead is not None:
            raise EngineDeadError(f"engine loop failed: {self.dead}")
        params = params or SamplingParams()
        if prompt_ids is None:
            prompt, prompt_ids = self.prepare(prompt, messages, params)
            validated = True
        elif not validated:
            self.engine.check_request(prompt_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._sinks:
            raise DeepserveError(f"request id {request_id!r} is already in flight",
                                 param="request_id")
        self.start()
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        sink = _Sink(asyncio.get_running_loop(), outputs)
        self._sinks[request_id] = sink
        self._inbox.put(_Add(request_id, prompt, prompt_ids, params, sink, priority,
                             cache_salt, validated, tenant, weight))
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step boundary and free its KV blocks."""
        if self._sinks.pop(request_id, None) is not None:
            self._inbox.put(_Abort(request_id))

    def stop_choice(self, request_id: str, index: int, reason: str) -> None:
        """Finish one continuation (choice ``index``) of a request at the next step
        boundary; the others go on."""
        if request_id in self._sinks:
            self._inbox.put(_StopChoice(request_id, index, reason))

    # -- the engine thread ------------------------------------------------------------------
    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, _Add):
                if item.request_id in self._sinks:
                    try:
                        self.engine.add_request(item.request_id, item.prompt, item.params,
                                                prompt_ids=item.prompt_ids,
                                                priority=item.priority,
                                                cache_salt=item.cache_salt,
                                                validated=item.validated,
                                                tenant=item.tenant, weight=item.weight)
                    except Exception as exc:  # fails this request only
                        if not isinstance(exc, DeepserveError):
                            logger.exception("could not add request %s", item.request_id)
                        self.engine.abort(item.request_id)
                        self._sinks.pop(item.request_id, None)
                        item.sink(_as_request_error(item.request_id, exc))
            elif isinstance(item, _Abort):
                self.engine.abort(item.request_id)
            elif isinstance(item, _StopChoice):
                out = self.engine.stop_choice(item.request_id, item.index, item.reason)
                sink = self._sinks.pop(item.request_id, None) if out is not None else None
                if sink is not None:
                    sink(out)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _loop(self) -> None:
        engine = self.engine
        parallel = getattr(engine, "parallel", None)
        if parallel is not None:  # a rank that dies wakes this loop, idle or not
            parallel.on_fail = lambda: self._inbox.put(None)
        while not self._stopped.is_set():
            self._drain(block=not engine.has_unfinished())
            if parallel is not None and parallel.failed:
                from deepserve.engine.parallel import RankFailed

                return self._die(RankFailed(parallel.failed))
            if not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # a bug in a step must not hang every client
                logger.exception("engine step failed; failing requests in flight")
                return self._die(exc)
            handed: list[tuple[str, _Sink, RequestOutput | BaseException]] = []
            for rid, exc in engine.pop_failures().items():
                sink = self._sinks.pop(rid, None)
                if sink is not None:
                    handed.append((rid, sink, _as_request_error(rid, exc)))
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is None:
                    continue
                if out.finished:
                    self._sinks.pop(out.request_id, None)
                handed.append((out.request_id, sink, out))
            for rid in _Sink.deliver(handed):  # its caller's event loop closed mid-request
                logger.warning("request %s: its event loop has closed; aborting it", rid)
                self._sinks.pop(rid, None)
                engine.abort(rid)
