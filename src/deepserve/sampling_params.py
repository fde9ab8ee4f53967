"""Per-request sampling settings, validated once when the request arrives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deepserve.errors import DeepserveError


@dataclass
class SamplingParams:
    """How to pick the next tokens of one request.

    Defaults follow the OpenAI API (temperature 1, top_p 1) except ``max_tokens``,
    which is 16 as in vLLM's offline API; ``temperature=0`` means greedy.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: chosen token plus k alternatives
    # None: off; k >= 0: each prompt token's logprob plus k alternatives (echo + logprobs).
    # Such requests skip the prefix cache: every prompt position must be computed.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Constrain the output to JSON matching this schema ({"type": "object"}: any object).
    json_schema: dict | str | None = None
    # Or to another grammar: ("regex", pattern), ("choice", [strings]), ("grammar", lark)
    # or ("json", schema). ``param`` names the request field in errors.
    guided: tuple[str, Any] | None = None
    guided_param: str = "response_format"
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    # An embedding request: no token is generated; the prompt's final hidden states
    # (after the last norm) are pooled, "mean" or "last", and L2-normalised. Such
    # requests skip the prefix cache: every position must be computed.
    embed: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def constraint(self) -> tuple[str, Any] | None:
        """The output grammar as (kind, spec), or None."""
        if self.guided is not None:
            return self.guided
        if self.json_schema is not None:
            return ("json", self.json_schema)
        return None

    @property
    def greedy(self) -> bool:
        # A top_p this small keeps only the most likely token (and would underflow the
        # cumulative sum): the same as greedy.
        return self.temperature < 1e-5 or self.top_p < 1e-6

    def validate(self) -> None:
        def bad(param: str, value: object, fix: str) -> DeepserveError:
            return DeepserveError(f"{param}={value!r} is invalid: {fix}", param=param)

        if self.embed not in (None, "mean", "last"):
            raise bad("embed", self.embed, "pooling is mean or last")
        if not isinstance(self.n, int) or self.n < 1 or self.n > 128:
            raise bad("n", self.n, "n must be an integer from 1 to 128")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int)
                                            or self.max_tokens <= 0):
            raise bad("max_tokens", self.max_tokens, "max_tokens must be a positive integer")
        if self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "min_tokens must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, "min_tokens must not exceed max_tokens")
        if self.temperature < 0 or self.temperature != self.temperature:
            raise bad("temperature", self.temperature, "temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "top_p must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "top_k must be a positive integer, or 0/-1 for off")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty,
                      "repetition_penalty must be > 0 (1 is off)")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", self.presence_penalty,
                      "presence_penalty must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", self.frequency_penalty,
                      "frequency_penalty must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad("logprobs", self.logprobs, "logprobs (top alternatives) must be in [0, 20]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise bad("prompt_logprobs", self.prompt_logprobs, "must be in [0, 20]")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids,
                      "stop_token_ids must be non-negative integers")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(
                self.seed, int) or not -2**63 <= self.seed < 2**64):
            raise bad("seed", self.seed, "seed must be an integer that fits in 64 bits "
                      f"(from {-2**63} to {2**64 - 1})")
        if self.guided is not None and self.json_schema is not None:
            raise bad(self.guided_param, self.guided[0], "give one output constraint, not "
                      "both response_format and a guided/structured_outputs field")
        if self.guided is not None and self.guided[0] not in ("json", "regex", "choice",
                                                              "grammar"):
            raise bad(self.guided_param, self.guided[0],
                      "the kind must be json, regex, choice or grammar")
        if self.logit_bias is not None:
            for token, value in self.logit_bias.items():
                if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                    raise bad("logit_bias", token, "keys must be token ids (integers >= 0, "
                              "sent as strings in JSON)")
                if not isinstance(value, int | float) or not -100 <= value <= 100:
                    raise bad("logit_bias", value, "each bias must be from -100 to 100")
        if len(self.stop) > 16:
            raise bad("stop", self.stop, "at most 16 stop strings")
