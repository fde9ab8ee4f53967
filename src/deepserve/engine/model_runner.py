"""Runs one scheduled batch through the model: flat tensors in, sampled tokens out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from deepserve import kernels
from deepserve.engine.layout import BackgroundLayout
from deepserve.engine.sampler import Sampler
from deepserve.engine.sequence import Logprob, Sequence
from deepserve.engine.utilization import Utilization
from deepserve.layers.attention import (
    PAGED_PREFILL,
    PAGED_PREFILL_TILES,
    AttentionMetadata,
    PrefillChunk,
)
from deepserve.layers.kv_cache import cache_for
from deepserve.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


# Caches whose short prompts run on the paged kernel (``paged_prefill``): bf16, and the
# 8-bit ones, whose prompts then attend to their own K/V as stored, as their decodes do
# (16 x 128 prompt tokens over int8: 0.96-1.00 s against 1.26-1.34 s on SDPA, Zen 4).
PAGED_KINDS = ("auto", "int8", "fp8")


class ModelRunner:
    """Owns the model and the paged KV cache tensors of every layer."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype, device: torch.device, sampler: Sampler,
                 kv_kind: str = "auto", use_kernels: bool = False) -> None:
        cfg = model.config
        self.model = model
        self.device = device
        self.block_size = block_size
        self.sampler = sampler
        slots = num_blocks * block_size
        self.kv_caches = [cache_for(cfg, slots, kv_dtype, kv_kind, device)
                          for _ in range(cfg.num_layers)]
        self._offsets = torch.arange(block_size, device=device)
        self.use_kernels = use_kernels
        # short prompts' attention on the paged kernel, in one call with the decodes: on
        # its AVX-512 bf16 path (2x SDPA there; float32, fp16 and AVX2 paths: 1.5-3x slower)
        self.paged_prefill = (use_kernels and kv_kind in PAGED_KINDS
                              and kv_dtype == torch.bfloat16 and not cfg.is_mla
                              and cfg.head_dim in (64, 128) and kernels.isa() == "avx512")
        per_token = sum(t.element_size() * t.shape[0] * t.shape[2] for kv in self.kv_caches
                        for t in {id(t): t for t in (kv.k, kv.v, getattr(kv, "k_scale", None),
                                                     getattr(kv, "v_scale", None))
                                  if t is not None}.values())
        self.utilization = Utilization(model, per_token)
        self.layout = BackgroundLayout.of(model)  # experts laid out beside the first steps
        self.step_observers: list[Callable[..., None]] = []  # (items, started, ended)
        # Seconds spent per phase since start; the benchmark reports the shares.
        self.timings = {"schedule": 0.0, "prepare": 0.0, "forward": 0.0, "sample": 0.0,
                        "postprocess": 0.0}

    def _slots(self, block_table: list[int], upto: int) -> torch.Tensor:
        blocks = torch.tensor(block_table, dtype=torch.long, device=self.device)
        return (blocks.unsqueeze(1) * self.block_size + self._offsets).flatten()[:upto]

    def prepare(self, items: list[tuple[Sequence, int]]
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[int]]:
        """Flatten a batch: decodes (one token with context) first, then prefill chunks.

        Returns input ids, positions, attention metadata, the flat rows whose logits
        are sampled, and for each of those rows the index into ``items``.
        """
        decodes = [i for i, (s, n) in enumerate(items) if n == 1 and s.num_computed > 0]
        prefills = [i for i, (s, n) in enumerate(items) if not (n == 1 and s.num_computed > 0)]
        ids: list[int] = []
        pos: list[int] = []
        sample_rows: list[int] = []
        sample_items: list[int] = []
        slot_parts: list[torch.Tensor] = []
        meta = AttentionMetadata(slot_mapping=torch.empty(0), num_decode=len(decodes),
                                 use_kernel=self.use_kernels, block_size=self.block_size)

        if decodes:
            ctx_lens = []
            tables = []
            for row, i in enumerate(decodes):
                seq, _ = items[i]
                ids.append(seq.tokens[seq.num_computed])
                pos.append(seq.num_computed)
                ctx_lens.append(seq.num_computed + 1)
                tables.append(seq.block_table)
                if seq.num_computed + 1 == seq.num_tokens:
                    sample_rows.append(row)
                    sample_items.append(i)
            bs = self.block_size
            width = -(-max(ctx_lens) // bs)
            table = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables],
                                 dtype=torch.long, device=self.device)
            ctx = torch.tensor(ctx_lens, dtype=torch.long, device=self.device)
            last = ctx - 1
            slot_parts.append(table.gather(1, (last // bs).unsqueeze(1)).squeeze(1) * bs
                              + last % bs)
            if self.use_kernels:
                meta.decode_table, meta.decode_ctx = table, ctx
            else:
                meta.decode_blocks = table.flatten()
                valid = torch.arange(width * bs, device=self.device).unsqueeze(0) \
                    < ctx.unsqueeze(1)
                bias = torch.zeros(valid.shape, dtype=torch.float32, device=self.device)
                meta.decode_bias = bias.masked_fill_(~valid, float("-inf")).unsqueeze(0) \
                    .unsqueeze(2)

        for i in prefills:
            seq, n = items[i]
            start = len(ids)
            begin, end = seq.num_computed, seq.num_computed + n
            ids.extend(seq.tokens[begin:end])
            pos.extend(range(begin, end))
            all_slots = self._slots(seq.block_table, end)
            slot_parts.append(all_slots[begin:])
            chunk = PrefillChunk(start=start, num_tokens=n, context_len=end, slots=None,
                                 mask=None)
            if begin > 0:
                chunk.slots = all_slots
                q_pos = torch.arange(begin, end, device=self.device).unsqueeze(1)
                chunk.mask = torch.arange(end, device=self.device).unsqueeze(0) <= q_pos
            meta.prefills.append(chunk)
            if end == seq.num_tokens:
                sample_rows.append(start + n - 1)
                sample_items.append(i)

        limit = PAGED_PREFILL_TILES if kernels.amx() else PAGED_PREFILL
        if self.paged_prefill and meta.prefills and \
                all(c.context_len <= limit for c in meta.prefills):
            self._row_tables(items, decodes, prefills, meta)
        meta.slot_mapping = torch.cat(slot_parts) if len(slot_parts) > 1 else slot_parts[0]
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)
        return input_ids, positions, meta, sample_rows, sample_items

    def _row_tables(self, items: list[tuple[Sequence, int]], decodes: list[int],
                    prefills: list[int], meta: AttentionMetadata) -> None:
        """Every row's block table and context length (``AttentionMetadata.row_table``):
        a decode row's context is its sequence's, a prompt token's its position + 1."""
        bs = self.block_size
        order = decodes + prefills
        counts = [1] * len(decodes) + [c.num_tokens for c in meta.prefills]
        ends = [items[i][0].num_computed + 1 for i in decodes] + \
            [c.context_len for c in meta.prefills]
        width = -(-max(ends) // bs)
        tables = [items[i][0].block_table[:width] for i in order]
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long,
                             device=self.device)
        meta.row_table = table.repeat_interleave(
            torch.tensor(counts, device=self.device), dim=0)
        meta.row_ctx = torch.cat(
            [torch.tensor(ends[:len(decodes)], dtype=torch.long, device=self.device)]
            + [torch.arange(c.context_len - c.num_tokens + 1, c.context_len + 1,
                            device=self.device) for c in meta.prefills])

    @torch.inference_mode()
    def execute(self, items: list[tuple[Sequence, int]]) -> dict[int, int]:
        """Run the batch; return {index into items: sampled token} for sequences that
        reached the end of their known tokens this step."""
        t0 = time.perf_counter()
        if self.layout is not None and self.layout.poll():
            self.layout = None
        input_ids, positions, meta, rows, which = self.prepare(items)
        t1 = time.perf_counter()
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        self._prompt_logprobs(items, meta, hidden)
        if any(s.params.embed for s, _ in items):
            self._pool(items, meta, hidden)
            kept = [(r, w) for r, w in zip(rows, which, strict=True)
                    if not items[w][0].params.embed]
            rows, which = [r for r, _ in kept], [w for _, w in kept]
        tokens: list[int] = []
        picked, seqs = None, [items[i][0] for i in which]
        if rows:
            if len(rows) < hidden.shape[0] or rows != list(range(len(rows))):
                hidden = hidden[torch.tensor(rows, device=self.device)]  # (decode: all rows)
            if self.sampler.plain_greedy(seqs) and hasattr(self.model, "greedy_tokens"):
                picked = self.model.greedy_tokens(hidden)
            if picked is None:
                logits = self.model.logits(hidden).cpu()
        t2 = time.perf_counter()
        if rows:
            tokens = picked.tolist() if picked is not None else self.sampler(logits, seqs)
        t3 = time.perf_counter()
        self.timings["prepare"] += t1 - t0
        self.timings["forward"] += t2 - t1
        self.timings["sample"] += t3 - t2
        self.utilization.record(items, len(rows))
        for observe in self.step_observers:
            observe(items, t0, t3)
        return dict(zip(which, tokens, strict=True))

    def _prompt_logprobs(self, items: list[tuple[Sequence, int]], meta: AttentionMetadata,
                         hidden: torch.Tensor) -> None:
        """For prefill chunks of requests that asked for prompt logprobs: the logprob of
        each next prompt token (and the top alternatives), stored by position."""
        prefills = [i for i, (s, n) in enumerate(items) if not (n == 1 and s.num_computed > 0)]
        for i, chunk in zip(prefills, meta.prefills, strict=True):
            seq, n = items[i]
            k = seq.params.prompt_logprobs
            if k is None:
                continue
            begin = seq.num_computed
            last = min(begin + n, seq.prompt_len - 1)  # positions that predict a prompt token
            if last <= begin:
                continue
            rows = hidden[chunk.start:chunk.start + (last - begin)]
            logprobs = torch.log_softmax(self.model.logits(rows).float().cpu(), dim=-1)
            targets = torch.tensor(seq.tokens[begin + 1:last + 1])
            chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
            top_v, top_i = (logprobs.topk(k) if k else (None, None))
            for r in range(last - begin):
                top = [] if not k else list(zip(top_i[r].tolist(), top_v[r].tolist(),
                                                strict=True))
                seq.prompt_logprobs[begin + 1 + r] = Logprob(int(targets[r]), chosen[r], top)

    def _pool(self, items: list[tuple[Sequence, int]], meta: AttentionMetadata,
              hidden: torch.Tensor) -> None:
        """Embedding requests: add this chunk's final hidden states (after the model's
        last norm) to the sequence's pool; at the prompt's end, the pooled vector."""
        prefills = [i for i, (s, n) in enumerate(items) if not (n == 1 and s.num_computed > 0)]
        for i, chunk in zip(prefills, meta.prefills, strict=True):
            seq, n = items[i]
            how = seq.params.embed
            if not how:
                continue
            if seq.num_computed == 0:
                seq.pool_sum = None  # a fresh start (also after a preemption)
            rows = self.model.norm(hidden[chunk.start:chunk.start + n]).float()
            part = rows[-1] if how == "last" else rows.sum(0)
            seq.pool_sum = part if how == "last" or seq.pool_sum is None \
                else seq.pool_sum + part
            if seq.num_computed + n == seq.num_tokens:
                vec = seq.pool_sum / (seq.num_tokens if how == "mean" else 1)
                seq.embedding = torch.nn.functional.normalize(vec, dim=0).cpu().tolist()
                seq.pool_sum = None

    @torch.inference_mode()
    def logits_for(self, items: list[tuple[Sequence, int]], last_n: int = 1) -> torch.Tensor:
        """Logits of the last ``last_n`` positions of each item (one item when > 1),
        without sampling (used by correctness and quality checks)."""
        input_ids, positions, meta, rows, _ = self.prepare(items)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if last_n > 1:
            return self.model.logits(hidden[-last_n:]).cpu()
        if not rows:
            return torch.empty(0)
        return self.model.logits(hidden[torch.tensor(rows, device=self.device)]).cpu()
