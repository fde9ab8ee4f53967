"""Incremental detokenization with stop strings, never emitting half a character."""

from __future__ import annotations

from typing import Any

# Prompt tokens decoded with the output so that tokenizers that drop a leading space
# at the start of a string (SentencePiece) still produce the right first word.
_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    """Text of one sequence's output, grown a token at a time.

    Decodes a short window of tokens and keeps only the new suffix, so each step
    costs O(window), and holds back text while the window ends in an incomplete
    UTF-8 sequence (shown by the tokenizer as U+FFFD).
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool,
                 stop: list[str], include_stop: bool) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = stop
        self.include_stop = include_stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.stopped_on: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> None:
        """Append a token; afterwards ``stopped_on`` is set if a stop string appeared."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            old_len = len(self.text)
            self.text += delta
            if self.stop:
                self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> None:
        # Only the new text, plus enough of the old to catch a stop string split across.
        start = max(0, old_len - self.hold)
        best: tuple[int, str] | None = None
        for s in self.stop:
            pos = self.text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is not None:
            pos, s = best
            self.text = self.text[:pos + len(s)] if self.include_stop else self.text[:pos]
            self.stopped_on = s

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: while running, hold back what may begin a stop string."""
        if finished or not self.stop or self.hold == 0:
            return self.text
        return self.text[:max(0, len(self.text) - self.hold)]
