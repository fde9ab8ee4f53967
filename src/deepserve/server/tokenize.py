"""``POST /tokenize`` and ``POST /detokenize``, in vLLM's shapes."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from deepserve.errors import DeepserveError
from deepserve.protocol.models import (
    ChatCompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    bad_text_path,
)
from deepserve.server.chat_setup import chat_setup


def add_tokenize_routes(app: FastAPI, state: Any, responses: dict[int | str, Any]) -> None:
    """Routes that count and convert tokens with the served model's tokenizer (and chat
    template), in the worker thread that prepares requests."""
    engine = state.engine

    def check(model: str | None, body: Any) -> None:
        where = bad_text_path(body.model_dump(exclude_none=True))
        if where is not None:
            raise DeepserveError(f"{where} is not valid Unicode text (a lone UTF-16 "
                                 "surrogate); send text that encodes as UTF-8", param=where)
        if model not in (None, "", state.model_name):
            raise DeepserveError(f"model {model!r} does not exist; this server serves "
                                 f"{state.model_name!r}", param="model", status=404,
                                 code="model_not_found")

    @app.post("/tokenize", responses=responses)
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        check(req.model, req)
        if (req.prompt is None) == (req.messages is None):
            raise DeepserveError("give either prompt or messages", param="prompt")
        tok = engine.tokenizer

        def run() -> dict[str, Any]:
            if req.messages is not None:
                if not req.messages:
                    raise DeepserveError("messages is empty; give at least one message",
                                         param="messages")
                chat = ChatCompletionRequest(
                    messages=req.messages, tools=req.tools, tool_choice=req.tool_choice,
                    parallel_tool_calls=req.parallel_tool_calls,
                    chat_template_kwargs=req.chat_template_kwargs,
                    reasoning_effort=req.reasoning_effort,
                    add_generation_prompt=req.add_generation_prompt)
                setup = chat_setup(chat, state.chat_template)
                literal = not state.cfg.allow_special_tokens_in_content
                _, ids = engine.engine.tokenize_prompt(messages=setup.messages,
                                                       chat_options=setup.options,
                                                       literal_content=literal)
            else:
                if req.tools is not None or req.tool_choice is not None:
                    raise DeepserveError("tools and tool_choice go with messages (a chat "
                                         "prompt), not with prompt", param="tools")
                if not req.prompt:
                    raise DeepserveError("prompt is empty", param="prompt")
                engine.engine.check_chars(len(req.prompt), "prompt")
                ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
            out: dict[str, Any] = {"count": len(ids), "max_model_len":
                                   engine.engine.max_model_len, "tokens": ids}
            if req.return_token_strs:
                out["token_strs"] = tok.convert_ids_to_tokens(ids)
            return out

        return await state.preparer.run(run)

    @app.post("/detokenize", responses=responses)
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        check(req.model, req)
        vocab = engine.engine.model_config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise DeepserveError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                                 param="tokens")
        return {"prompt": await state.preparer.run(engine.tokenizer.decode, req.tokens)}
