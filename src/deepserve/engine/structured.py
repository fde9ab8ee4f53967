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
            eos = self.eos[0] if self.eos else None
            if hasattr(type(self.tokenizer), "tokenizer_json"):  # FastTokenizer: no transformers
                import llguidance

                self._info = llguidance.LLTokenizer(self.tokenizer.tokenizer_json(),
                                                    n_vocab=self.vocab_size, eos_token=eos)
            else:
                import llguidance.hf

                self._info = llguidance.hf.from_tokenizer(self.tokenizer,
                                                          n_vocab=self.vocab_size, eos_token=eos)
        return self._info

    def grammar(self, schema: dict[str, Any] | str, param: str = "response_format") -> str:
        """Compile-check a JSON schema; raises DeepserveError naming what is wrong."""
        return self.compile("json", schema, param)

    def compile(self, kind: str, spec: Any, param: str = "response_format") -> str:
        """A llguidance grammar for a JSON schema, a regex, a list of choices or a Lark
        grammar, checked once and cached; DeepserveError (naming ``param``) if unusable."""
        import llguidance

        # Keys keep the schema's order: llguidance emits properties in that order, so the
        # output's keys come in the order the schema lists them.
        key = f"{kind}\0{spec if isinstance(spec, str) else json.dumps(spec)}"
        if key in self._cache:
            return self._cache[key]
        if kind == "json":
            try:
                text = spec if isinstance(spec, str) else json.dumps(spec)
                json.loads(text)
            except (TypeError, ValueError) as exc:
                raise DeepserveError(f"the JSON schema is not valid JSON: {exc}",
                                     param=param) from None
            # compact JSON: with flexible whitespace a small model sampled at temperature
            # 0.9 could spend its max_tokens on spaces and newlines (4 of 15 seeds cut
            # short); a schema's own "x-guidance" still overrides this default
            if len(text) > MAX_SCHEMA_BYTES:
                raise DeepserveError(f"the JSON schema is {len(text)} bytes; at most "
                                     f"{MAX_SCHEMA_BYTES} are allowed: shorten it",
                                     param=param)
            depth = json_depth(spec if not isinstance(spec, str) else json.loads(text))
            if depth > MAX_SCHEMA_DEPTH:
                raise DeepserveError(f"the JSON schema is nested {depth} levels deep; at most "
                                     f"{MAX_SCHEMA_DEPTH} are allowed: flatten it",
                                     param=param)
            try:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    text, defaults={"whitespace_flexible": False})
            except (ValueError, RuntimeError) as exc:
                raise DeepserveError(f"the JSON schema cannot be used: {exc}",
                                     param=param) from None
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(str(spec))
        elif kind == "choice":
            if not isinstance(spec, list) or not spec or not all(isinstance(c, str) and c
                                                                 for c in spec):
                raise DeepserveError("the choice list must hold at least one non-empty "
                                     "string", param=param)
            grammar = llguidance.LLMatcher.grammar_from_regex(
                "|".join(_regex_escape(c) for c in spec))
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(str(spec))
        problem = llguidance.LLMatcher.validate_grammar(grammar)
        if problem:
            raise DeepserveError(f"the {kind} constraint cannot be used: {problem.strip()}",
                                 param=param)
        self._cache[key] = grammar
        return grammar

    def matcher(self, grammar: str, param: str = "response_format") -> Any:
        import llguidance

        m = llguidance.LLMatcher(self._tokenizer_info(), grammar)
        if m.is_error():
            raise DeepserveError(f"output constraint rejected: {m.get_error()}", param=param)
        return m


MAX_SCHEMA_DEPTH = 64  # nesting of a JSON schema (objects and arrays) taken as a grammar
MAX_SCHEMA_BYTES = 256 * 1024  # a JSON schema's size, as JSON text


def json_depth(value: Any) -> int:
    """How deeply a JSON value nests (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d + 1)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _regex_escape(text: str) -> str:
    """Escape for llguidance's regex syntax (Rust regex): every non-alphanumeric char."""
    return "".join(c if c.isalnum() or c in " _" else
                   (f"\\x{{{ord(c):x}}}" if ord(c) > 127 else "\\" + c) for c in text)


_BITS = torch.arange(32, dtype=torch.int32)


def apply_grammar_masks(logits: torch.Tensor, matchers: list[tuple[int, Any]]) -> None:
    """Set logits of grammar-forbidden tokens to -inf, in place, for the given rows.

    llguidance fills one bit per token; the bits are unpacked here with plain torch ops.
    (``llguidance.torch.apply_token_bitmask_inplace`` runs a ``torch.compile`` kernel,
    which on torch 2.13's CPU build corrupted the heap and, with ATen held to AVX2,
    masked the wrong tokens.)"""
    import llguidance.torch as lt

    n, vocab = len(matchers), logits.shape[1]
    mask = lt.allocate_token_bitmask(n, vocab)
    for k, (_, m) in enumerate(matchers):
        lt.fill_next_token_bitmask(m, mask, k)
    allowed = ((mask.unsqueeze(-1) >> _BITS) & 1).view(n, -1)[:, :vocab].bool()
    rows = torch.tensor([row for row, _ in matchers])
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
