"""Structured output: JSON constrained by a grammar library (llguidance), not by hand.

Each constrained sequence owns a matcher; before sampling, the matcher's token mask
sets every token that would break the grammar to -inf, and after sampling the token
is fed back. The tokenizer wrapper is built once per engine, on first use.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from deepserve.errors import DeepserveError

logger = logging.getLogger(__name__)


class GrammarCompiler:
    """Validates JSON schemas and creates per-sequence matchers for one tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos = sorted(eos_token_ids)
        self._info: Any = None
        self._cache: dict[str, str] = {}

    def _tokenizer_info(self) -> Any:
        if self._info is None:
            import llguidance.hf

            self._info = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                      eos_token=self.eos[0] if self.eos
                                                      else None)
        return self._info

    def grammar(self, schema: dict[str, Any] | str) -> str:
        """Compile-check a JSON schema; raises DeepserveError naming what is wrong."""
        import llguidance

        try:
            text = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)
            json.loads(text)
        except (TypeError, ValueError) as exc:
            raise DeepserveError(f"json_schema is not valid JSON: {exc}",
                                 param="response_format") from None
        if text in self._cache:
            return self._cache[text]
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text)
        problem = llguidance.LLMatcher.validate_grammar(grammar)
        if problem:
            raise DeepserveError(f"json_schema cannot be used to constrain output: {problem}",
                                 param="response_format")
        self._cache[text] = grammar
        return grammar

    def matcher(self, grammar: str) -> Any:
        import llguidance

        m = llguidance.LLMatcher(self._tokenizer_info(), grammar)
        if m.is_error():
            raise DeepserveError(f"json_schema rejected: {m.get_error()}",
                                 param="response_format")
        return m


def apply_grammar_masks(logits: torch.Tensor, matchers: list[tuple[int, Any]]) -> None:
    """Set logits of grammar-forbidden tokens to -inf, in place, for the given rows."""
    import llguidance.torch as lt

    mask = lt.allocate_token_bitmask(len(matchers), logits.shape[1])
    for k, (_, m) in enumerate(matchers):
        lt.fill_next_token_bitmask(m, mask, k)
    rows = torch.tensor([row for row, _ in matchers])
    sub = logits[rows]
    lt.apply_token_bitmask_inplace(sub, mask)
    logits[rows] = sub
