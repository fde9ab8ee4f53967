"""The Responses API's routes: ``POST /v1/responses`` (plain and streamed), ``GET`` and
``DELETE /v1/responses/{id}`` (see ``responses`` for the translation)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deepserve.billing.meter import BillingContext, request_tags
from deepserve.errors import DeepserveError
from deepserve.server.chat_output import ChatContext, ChoiceStream
from deepserve.server.chat_setup import chat_setup
from deepserve.server.pipeline import (
    APIError,
    ClientGone,
    check_text,
    guarded_stream,
    until_done,
)
from deepserve.server.reasoning import prompt_opens_thinking
from deepserve.server.response_store import OWNER_HEADER, not_found
from deepserve.server.responses import (
    ResponsesRequest,
    chat_logprobs_to_output,
    conversation,
    envelope,
    finish,
    output_items,
    to_chat,
)
from deepserve.server.responses_stream import EventStream

# chat's field names in errors -> the Responses API's
RESPONSES_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input",
                    "response_format": "text.format", "reasoning_effort": "reasoning.effort",
                    "verbosity": "text.verbosity"}


def add_responses_routes(app: FastAPI, state: Any, admit: Callable[..., Any],
                         limit: Callable[..., Any], responses: dict[int | str, Any],
                         price_headers: Callable[[BillingContext], dict[str, str]]) -> None:
    engine = state.engine
    cfg = state.cfg
    store = state.responses

    def owner(request: Request) -> str | None:
        """Whose stored responses a request may read: its API key's; on a server without
        keys (a backend behind a gateway) the key the gateway names."""
        key_id = getattr(request.state, "key_id", None)
        if key_id is None and state.meter.keys is None and not cfg.api_key:
            return request.headers.get(OWNER_HEADER) or None
        return key_id

    @app.post("/v1/responses", responses=responses)
    async def create(req: ResponsesRequest, request: Request) -> Response:
        check_text(req)
        state.check_task("generate", "/v1/responses")
        key_id = getattr(request.state, "key_id", None)
        who = limit(request, key_id)
        release = admit(req.model, 1)
        handed_off = False
        bill: BillingContext | None = None
        try:
            history: list[dict[str, Any]] = []
            if req.previous_response_id:
                record = await state.preparer.run(store.get, owner(request),
                                                  req.previous_response_id)
                if record is None:
                    raise not_found(req.previous_response_id)
                history = record["messages"]
            chat_req = to_chat(req, history)
            try:
                setup = chat_setup(chat_req, state.chat_template)
                text, ids = await state.preparer.run(
                    engine.prepare, messages=setup.messages, params=setup.params,
                    default_max_tokens=cfg.max_tokens_default, chat_options=setup.options,
                    literal_content=not cfg.allow_special_tokens_in_content)
            except DeepserveError as exc:  # named as this API names the field
                exc.param = RESPONSES_PARAMS.get(exc.param or "", exc.param)
                raise
            ctx = ChatContext(setup.plan, state.reasoning,
                              state.reasoning and prompt_opens_thinking(text or ""))
            salt = state.cache_salt(chat_req, key_id)
            bill = state.meter.start(key_id, state.model_name)
            bill.who = who
            state.share(bill, key_id, req.user)
            bill.tags = request_tags("responses", req.model_dump(exclude_none=True))
            params = setup.params
            state.meter.reserve(bill, len(ids), (params.max_tokens or 0) * params.n)
            rid = f"resp_{uuid.uuid4().hex}"
            body = envelope(req, rid, state.model_name, time.time())

            async def keep(final: dict[str, Any]) -> None:
                if req.store:
                    await state.preparer.run(store.put, owner(request), final,
                                             conversation(history, req, final["output"]))

            if req.stream:
                events = _stream(state, chat_req, params, ids, bill, salt, ctx, req, body,
                                 keep)

                def end(b: BillingContext = bill) -> None:
                    state.meter.release(b)
                    release()

                handed_off = True
                return StreamingResponse(guarded_stream(events, cfg.request_timeout, end),
                                         media_type="text/event-stream",
                                         headers=price_headers(bill))
            work = state.serving.chat(chat_req, params, ids, bill, salt, ctx, rid=rid)
            try:
                answer = await until_done(request, work, cfg.request_timeout)
            except ClientGone:
                return Response(status_code=499)
            choice = answer["choices"][0]
            output = output_items(choice["message"], req.max_tool_calls,
                                  chat_logprobs_to_output(choice.get("logprobs")))
            final = finish(body, output, choice["finish_reason"], answer["usage"])
            await keep(final)
            return JSONResponse(final, headers=price_headers(bill))
        finally:
            if not handed_off:
                if bill is not None:
                    state.meter.release(bill)
                release()

    @app.get("/v1/responses/{response_id}", responses=responses)
    async def retrieve(response_id: str, request: Request) -> Response:
        record = await state.preparer.run(store.get, owner(request), response_id)
        if record is None:
            exc = not_found(response_id)
            raise APIError(404, exc.message, "response_id", exc.code)
        return JSONResponse(record["response"])

    @app.delete("/v1/responses/{response_id}", responses=responses)
    async def delete(response_id: str, request: Request) -> Response:
        gone = await state.preparer.run(store.delete, owner(request), response_id)
        if not gone:
            exc = not_found(response_id)
            raise APIError(404, exc.message, "response_id", exc.code)
        return JSONResponse({"id": response_id, "object": "response.deleted",
                             "deleted": True})


async def _stream(state: Any, chat_req: Any, params: Any, ids: list[int],
                  bill: BillingContext, salt: str | None, ctx: ChatContext,
                  req: ResponsesRequest, body: dict[str, Any],
                  keep: Callable[[dict[str, Any]], Any]) -> AsyncIterator[str]:
    events = EventStream(body, req.max_tool_calls)
    for e in events.start():
        yield e
    streams: list[ChoiceStream] = []
    chunks = state.serving.chat_chunks(chat_req, params, ids, bill, salt, ctx,
                                       rid=body["id"], streams_out=streams)
    reason = None
    usage: dict[str, Any] = {}
    try:
        async for chunk in chunks:
            if not chunk["choices"]:
                usage = chunk["usage"]
                continue
            for c in chunk["choices"]:
                reason = c.get("finish_reason") or reason
            for e in events.feed(chunk):
                yield e
    finally:
        await chunks.aclose()
    calls = streams[0].result().tool_calls
    if req.max_tool_calls is not None:
        calls = calls[:req.max_tool_calls]
    out, final = events.end(calls, reason, usage)
    await keep(final)
    for e in out:
        yield e
