"""The offline API: ``LLM(...).generate(prompts, params)`` and ``.chat(conversations)``."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from deepserve.config import EngineConfig
from deepserve.engine.llm_engine import LLMEngine
from deepserve.engine.sequence import RequestOutput
from deepserve.errors import DeepserveError
from deepserve.sampling_params import SamplingParams


class LLM:
    """Batch generation in-process. ``model=None`` loads the packaged default model.

    Engine arguments are the fields of :class:`deepserve.config.EngineConfig`
    (``max_num_seqs``, ``dtype``, ``kv_cache_memory``, ...).
    """

    def __init__(self, model: str | None = None, show_progress: bool = True,
                 config: EngineConfig | None = None, **engine_args: Any) -> None:
        if config is None:
            config = EngineConfig.from_kwargs(model=model, **engine_args)
        self.engine = LLMEngine(config, show_progress=show_progress)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        items = [(p, None) for p in prompts]
        return self._run(items, params, use_tqdm)

    def chat(self, conversations: list[dict[str, Any]] | list[list[dict[str, Any]]],
             params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate replies to conversations (lists of {role, content} messages)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        items = [(None, conv) for conv in conversations]
        return self._run(items, params, use_tqdm)

    def _run(self, items: list[tuple[Any, Any]], params: Any,
             use_tqdm: bool) -> list[RequestOutput]:
        if not items:
            raise DeepserveError("no prompts given", param="prompts")
        if params is None:
            params = SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(items)
        if len(plist) != len(items):
            raise DeepserveError(f"{len(plist)} SamplingParams for {len(items)} prompts; give "
                                 "one, or one per prompt", param="params")
        engine = self.engine
        # Validate everything before queueing anything: one bad prompt fails the call cleanly.
        prepared = []
        for (prompt, messages), p in zip(items, plist, strict=True):
            text, ids = engine.tokenize_prompt(prompt, messages)
            engine.check_request(ids, p)
            prepared.append((text, ids, p))
        order = []
        for text, ids, p in prepared:
            order.append(engine.add_request(None, text, p, prompt_ids=ids, validated=True))
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(order), desc="generating", disable=not use_tqdm)
        try:
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
                failed = engine.pop_failures()
                if failed:
                    rid, exc = next(iter(failed.items()))
                    raise DeepserveError(f"request {rid} failed inside the engine: {exc}",
                                         status=500, code="internal_error") from exc
        finally:
            bar.close()
            for rid in order:
                if rid not in done:
                    engine.abort(rid)
        return [done[rid] for rid in order]
