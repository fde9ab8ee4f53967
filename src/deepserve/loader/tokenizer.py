"""Tokenizer and chat template, taken from the checkpoint itself."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from deepserve.errors import DeepserveError, ModelLoadError

logger = logging.getLogger(__name__)


def load_tokenizer(path: Path, kind: str) -> Any:
    """transformers' fast tokenizer; for GGUF it is rebuilt from the file's metadata."""
    import transformers

    transformers.logging.set_verbosity_error()
    from transformers import AutoTokenizer

    try:
        if kind == "gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: cannot build a tokenizer from it ({exc}); a HF folder "
                             "needs tokenizer.json or tokenizer.model with its config") from exc


def eos_token_ids(tokenizer: Any, path: Path, kind: str) -> set[int]:
    """Every token id that ends a generation: the tokenizer's EOS and generation_config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if kind == "hf":
        gen = path / "generation_config.json"
        if gen.is_file():
            value = json.loads(gen.read_text()).get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value)
    return ids


def apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]],
                        tools: list[dict[str, Any]] | None = None,
                        add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """Render a conversation with the checkpoint's template, ready for the reply.
    ``tools`` (OpenAI tool objects) go to templates that render them; ``kwargs`` are
    the template's own variables (e.g. ``enable_thinking``)."""
    if not isinstance(messages, list) or not messages:
        raise DeepserveError("messages must be a non-empty list of {role, content} objects",
                             param="messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DeepserveError("this model has no chat template; use completions (a plain "
                             "prompt) instead of chat", param="messages")
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    except Exception as exc:  # jinja2 raises many types for malformed conversations
        raise DeepserveError(f"the chat template rejected these messages: {exc}",
                             param="messages") from exc
