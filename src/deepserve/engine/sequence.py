"""A sequence's state as it moves through the engine, and the outputs users see."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from deepserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    """One token's log-probability, with the top alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Sequence:
    """One generated continuation. A request with n > 1 owns n sequences.

    ``num_computed`` counts tokens whose K/V are in the cache; each step computes
    ``tokens[num_computed:num_computed + k]``. After preemption it drops to zero
    and the whole token list (prompt + output so far) is recomputed.
    """

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_ids: list[int],
                 params: SamplingParams, arrival: float, priority: int = 0) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.prompt_len = len(prompt_ids)
        self.tokens: list[int] = list(prompt_ids)
        self.params = params
        self.arrival = arrival
        self.priority = priority
        self.status = SequenceStatus.WAITING
        self.num_computed = 0
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.block_hashes: list[bytes] = []
        self.block_cids: list[int] = []  # content ids of the hashed blocks (0: not shared)
        self.cache_salt: str | None = None  # only sequences with the same salt share blocks
        self.tenant = ""  # whose request (API key or user): the scheduler shares by it
        self.weight = 1.0  # the tenant's share against others'
        self.num_cached_tokens: int | None = None  # prompt tokens served from prefix cache
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[Logprob] = []
        self.prompt_logprobs: dict[int, Logprob] = {}  # position -> logprob of that token
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        self.generator = None  # torch.Generator when the request has a seed
        self.matcher = None  # grammar matcher when the output is constrained
        self.pool_sum: torch.Tensor | None = None  # embedding requests: pooled so far
        self.embedding: list[float] | None = None  # set once the prompt is pooled

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED


@dataclass
class CompletionOutput:
    """One of the n continuations of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[Logprob] | None = None


@dataclass
class RequestOutput:
    """What the engine returns for a request after a step: cumulative (all the text and
    token ids so far), the last one with ``finished`` set.

    ``text``, ``token_ids`` and ``finish_reason`` are those of the first continuation;
    ``num_cached_tokens`` is the number of prompt tokens served from the prefix cache
    (what billing prices as cache hits).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    arrival_time: float = field(default_factory=time.time)
    first_token_time: float | None = None
    finished_time: float | None = None
    # With SamplingParams.prompt_logprobs: one per prompt token (None for the first).
    prompt_logprobs: list[Logprob | None] | None = None
    embedding: list[float] | None = None  # embedding requests: the pooled vector

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
