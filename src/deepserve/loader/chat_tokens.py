"""Chat prompts whose messages cannot forge control tokens.

A chat template renders messages into one string, and tokenizing that string turns
every control-token spelling in it (``<|im_end|>``, ``<|im_start|>system``) into the
control token itself: a user who writes them into a message could close their turn and
open a system one. OpenAI's API treats such text in a message as text.

``encode_chat`` does the same. When a message's text holds a special token's spelling,
the template is rendered with that text replaced by a placeholder; the template's own
parts are tokenized as usual (its control tokens stay control tokens) and the message's
text is tokenized with special tokens read as plain text. Prompts without such text are
tokenized exactly as before. ``--allow-special-tokens-in-content`` turns this off for
trusted clients.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable
from typing import Any

_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")
_plain_lock = threading.Lock()


def special_strings(tokenizer: Any) -> list[str]:
    """The spellings of the tokenizer's special (control) tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "get_added_tokens_decoder"):
        return [t.content for t in backend.get_added_tokens_decoder().values()
                if t.special and t.content]
    return [t for t in getattr(tokenizer, "all_special_tokens", []) if t]


def _plain_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Encode text with special-token spellings read as plain text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_special_tokens"):
        with _plain_lock:
            plain = getattr(tokenizer, "_deepserve_plain", None)
            if plain is None:
                from tokenizers import Tokenizer

                plain = Tokenizer.from_str(backend.to_str())
                plain.encode_special_tokens = True
                with contextlib.suppress(AttributeError):  # kept when the object allows it
                    tokenizer._deepserve_plain = plain
        return lambda text: plain.encode(text, add_special_tokens=False).ids
    return lambda text: tokenizer(text, add_special_tokens=False,
                                  split_special_tokens=True)["input_ids"]


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]],
                options: dict[str, Any] | None = None,
                literal: bool = True) -> tuple[str, list[int]]:
    """(rendered prompt, token ids) of a chat through the tokenizer's template;
    ``literal``: every message's text tokenized as text. Raises DeepserveError."""
    from deepserve.errors import DeepserveError
    from deepserve.loader.tokenizer import apply_chat_template

    def render(msgs: list[dict[str, Any]]) -> str:
        return apply_chat_template(tokenizer, msgs, **(options or {}))

    prompt = render(messages)
    specials = special_strings(tokenizer) if literal else []
    hits = [i for i, m in enumerate(messages) if isinstance(m.get("content"), str)
            and any(s in m["content"] for s in specials)]
    if not hits:
        return prompt, tokenizer.encode(prompt, add_special_tokens=False)
    marked = [dict(m, content=f"\ue000{i}\ue001") if i in hits else m
              for i, m in enumerate(messages)]
    parts = _PLACEHOLDER.split(render(marked))
    if len(parts) != 2 * len(hits) + 1:  # the template copied or dropped a message
        raise DeepserveError("a message holds a control token's spelling, which this chat "
                             "template cannot keep as text (it does not render each "
                             "message's text once): remove it", param="messages")
    plain = _plain_encoder(tokenizer)
    ids: list[int] = []
    for k, part in enumerate(parts):
        if k % 2:
            ids += plain(messages[int(part)]["content"])
        elif part:
            ids += tokenizer.encode(part, add_special_tokens=False)
    return prompt, ids
