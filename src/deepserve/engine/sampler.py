"""Batched sampling: every sequence's parameters applied to the whole batch at once."""

from __future__ import annotations

import torch

from deepserve import kernels
from deepserve.engine.sequence import Logprob, Sequence
from deepserve.engine.structured import apply_grammar_masks


class Sampler:
    """Turns last-position logits into next tokens (and logprobs) for a batch."""

    def __init__(self, vocab_size: int, eos_token_ids: set[int],
                 use_kernel: bool = False) -> None:
        self.use_kernel = use_kernel  # kernels.sample_rows for plain temperature sampling
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits: [N, V] float32, one row per sequence. Appends Logprobs where asked."""
        n = logits.shape[0]
        params = [s.params for s in seqs]
        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        constrained = [(i, s.matcher) for i, s in enumerate(seqs) if s.matcher is not None]
        if constrained:
            logits = logits.clone()
            apply_grammar_masks(logits, constrained)
        biased = [(i, s.params.logit_bias) for i, s in enumerate(seqs) if s.params.logit_bias]
        if biased:
            logits = logits.clone() if not constrained else logits
            for i, bias in biased:
                ids = torch.tensor(list(bias.keys()))
                logits[i, ids] += torch.tensor(list(bias.values()), dtype=logits.dtype)
        logits = self._apply_penalties(logits, seqs)
        logits = self._apply_min_tokens(logits, seqs)

        flags = [p.greedy for p in params]
        if all(flags):  # no row copy of [N, V] when every row is greedy, or none
            tokens = self._argmax(logits)
        elif not any(flags):
            tokens = self._sample(logits, seqs)
        else:
            greedy = torch.tensor(flags)
            tokens = torch.empty(n, dtype=torch.long)
            tokens[greedy] = self._argmax(logits[greedy])
            rows = (~greedy).nonzero().flatten()
            tokens[rows] = self._sample(logits[rows], [seqs[i] for i in rows.tolist()])
        result = tokens.tolist()
        if raw_logprobs is not None:
            for i, seq in enumerate(seqs):
                if want_logprobs[i]:
                    seq.logprobs.append(self._logprob(raw_logprobs[i], result[i],
                                                      seq.params.logprobs or 0))
        return result

    def plain_greedy(self, seqs: list[Sequence]) -> bool:
        """Whether every row's token is its logits' argmax and nothing else reads them
        (no logprobs, grammar, bias, penalties or min_tokens ban): the model may then
        pick the tokens without the logits (``greedy_tokens``)."""
        for s in seqs:
            p = s.params
            if not p.greedy or p.logprobs is not None or s.matcher is not None or \
                    p.logit_bias or p.repetition_penalty != 1.0 or p.presence_penalty or \
                    p.frequency_penalty or s.num_output < p.min_tokens:
                return False
        return True

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and logits.dtype == torch.float32:
            return kernels.argmax_rows(logits)
        return logits.argmax(dim=-1)

    @staticmethod
    def _logprob(row: torch.Tensor, token: int, k: int) -> Logprob:
        top: list[tuple[int, float]] = []
        if k:
            values, ids = row.topk(k)
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        return Logprob(token, float(row[token]), top)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        if all(p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
               and p.frequency_penalty == 0.0 for p in params):
            return logits
        logits = logits.clone()
        n, vocab = logits.shape
        counts = self._counts([s.output_ids for s in seqs], n, vocab)
        freq = torch.tensor([p.frequency_penalty for p in params]).unsqueeze(1)
        pres = torch.tensor([p.presence_penalty for p in params]).unsqueeze(1)
        logits -= freq * counts + pres * (counts > 0).float()
        rep = torch.tensor([p.repetition_penalty for p in params]).unsqueeze(1)
        if (rep != 1.0).any():
            # As in vLLM/HF: tokens seen in the prompt or output are penalized.
            seen = (self._counts([s.tokens for s in seqs], n, vocab) > 0)
            penalized = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalized, logits)
        return logits

    @staticmethod
    def _counts(token_lists: list[list[int]], n: int, vocab: int) -> torch.Tensor:
        width = max((len(t) for t in token_lists), default=0)
        counts = torch.zeros(n, vocab + 1)
        if width:
            padded = torch.full((n, width), vocab, dtype=torch.long)
            for i, t in enumerate(token_lists):
                if t:
                    padded[i, :len(t)] = torch.tensor(t)
            counts.scatter_add_(1, padded, torch.ones(n, width))
        return counts[:, :vocab]

    def _apply_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.num_output < s.params.min_tokens]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            p = seqs[i].params
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
            if banned:
                logits[i, banned] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        if any(p.temperature != 1.0 for p in params):
            logits = logits / torch.tensor([p.temperature for p in params]).unsqueeze(1)
        top_k = torch.tensor([p.top_k or self.vocab_size for p in params])
        top_p = torch.tensor([p.top_p for p in params])
        min_p = torch.tensor([p.min_p for p in params])
        if (top_k < logits.shape[1]).any() or (top_p < 1.0).any():
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            ranks = torch.arange(logits.shape[1]).unsqueeze(0)
            drop = ranks >= top_k.unsqueeze(1)
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            # Keep the smallest set whose mass reaches top_p (the first token always stays).
            drop |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        seeded = [i for i, s in enumerate(seqs) if s.generator is not None]
        u = torch.empty(logits.shape[0], 1)
        if len(seeded) < len(seqs):
            u.uniform_()
        for i in seeded:
            u[i].uniform_(generator=seqs[i].generator)
        if self.use_kernel and not (min_p > 0).any():
            # Same inverse-CDF draw, without the [N, V] softmax and cumsum tensors.
            return kernels.sample_rows(logits.float(), u.squeeze(1))
        probs = logits.softmax(dim=-1)
        if (min_p > 0).any():
            floor = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
        # Inverse-CDF draw: one uniform number per row against the row's cumulative
        # probabilities. (The exponential race, argmax(p / E) with E ~ Exp(1), needs a
        # random number per vocabulary entry: 22 ms per step at 32 rows x 49k here,
        # against about 1 ms for the cumsum.) right=True: the first index whose
        # cumulative mass exceeds u, which skips zero-probability entries.
        cdf = probs.cumsum(dim=-1)
        picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
        return picked.clamp_(max=probs.shape[1] - 1)
