"""What a model needs to run split across ranks (``engine/parallel.py`` starts them):
a tensor-parallel rank's shard of the configuration and weights and the all-reduce
after each row-parallel projection; a pipeline stage's range of layers and the
micro-batches a step is cut into so that stages overlap."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepserve.layers.attention import AttentionMetadata
from deepserve.models.config import ModelConfig


@dataclass(frozen=True)
class Shard:
    """This process's part of a model split ``size`` ways by heads and MLP rows; with
    ``experts``, an MoE model's routed experts spread whole over the same ranks (each
    holds 1/size of them; the sum after the MoE layer is the all-reduce after its MLP)."""

    rank: int
    size: int
    full: ModelConfig
    experts: bool = False

    @property
    def local(self) -> ModelConfig:
        f = self.full
        per = f.num_experts // self.size
        return dataclasses.replace(f, num_heads=f.num_heads // self.size,
                                   num_kv_heads=f.num_kv_heads // self.size,
                                   intermediate_size=f.intermediate_size // self.size,
                                   local_experts=(self.rank * per, (self.rank + 1) * per)
                                   if self.experts else None)

    first = 0  # every tensor-parallel rank holds a share of every layer

    def rows(self, t: torch.Tensor, local: int) -> torch.Tensor:
        """This rank's ``local`` rows of a column-parallel weight (or bias)."""
        return t[self.rank * local:(self.rank + 1) * local]

    def cols(self, t: torch.Tensor, local: int, per_col: int = 1) -> torch.Tensor:
        """This rank's ``local`` input columns of a row-parallel weight; ``per_col``
        bytes per column for GGUF blocks (``local`` a whole number of blocks)."""
        lo = self.rank * local * per_col
        return t[:, lo:lo + local * per_col].contiguous()


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: the layers ``first`` .. ``last - 1`` of the model, whole."""

    rank: int
    size: int
    full: ModelConfig

    @property
    def first(self) -> int:
        return self.full.num_layers * self.rank // self.size

    @property
    def last(self) -> int:
        return self.full.num_layers * (self.rank + 1) // self.size

    @property
    def local(self) -> ModelConfig:
        f = self.full
        return dataclasses.replace(f, num_layers=self.last - self.first, moe_layers=tuple(
            i - self.first for i in f.moe_layers if self.first <= i < self.last))


@dataclass(frozen=True)
class StageShard(Shard):
    """Tensor parallelism inside a pipeline stage: tensor rank ``rank`` of ``size`` in
    stage ``stage`` of ``stages``, holding its heads and MLP rows of that stage's layers."""

    stage: int = 0
    stages: int = 1

    @property
    def layers(self) -> Stage:
        """This rank's stage, as pipeline parallelism alone would cut it."""
        return Stage(self.stage, self.stages, self.full)

    @property
    def first(self) -> int:  # type: ignore[override]
        return self.layers.first

    @property
    def last(self) -> int:
        return self.layers.last

    @property
    def local(self) -> ModelConfig:
        return dataclasses.replace(super().local, num_layers=self.last - self.first,
                                   moe_layers=())  # (tensor parallelism: dense models only)


@dataclass(frozen=True)
class ExpertShard:
    """An expert-parallel rank: every layer whole (attention replicated) but only the
    routed experts ``lo`` .. ``hi - 1`` of each MoE layer."""

    rank: int
    size: int
    full: ModelConfig
    first = 0

    @property
    def experts(self) -> tuple[int, int]:
        per = self.full.num_experts // self.size
        return self.rank * per, (self.rank + 1) * per

    @property
    def local(self) -> ModelConfig:
        return dataclasses.replace(self.full, local_experts=self.experts)


def micro_batches(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                  parts: int) -> list[tuple[slice, torch.Tensor, torch.Tensor,
                                            AttentionMetadata]]:
    """A step cut for the pipeline into up to ``parts`` micro-batches of decode rows and
    up to ``parts`` of whole prefill chunks, in row order, each with its own metadata
    (its rows of the slot mapping, block table and context lengths; chunk starts counted
    from its first row). Every stage cuts the same step the same way."""
    b, t = meta.num_decode, input_ids.shape[0]
    out = []
    cuts = [b * i // min(parts, b) for i in range(min(parts, b) + 1)] if b else []
    for lo, hi in itertools.pairwise(cuts):
        out.append((slice(lo, hi), input_ids[lo:hi], positions[lo:hi], dataclasses.replace(
            meta, slot_mapping=meta.slot_mapping[lo:hi], num_decode=hi - lo, prefills=[],
            decode_blocks=None if meta.decode_blocks is None
            else meta.decode_blocks.view(b, -1)[lo:hi].reshape(-1),
            decode_bias=None if meta.decode_bias is None else meta.decode_bias[:, lo:hi],
            decode_table=None if meta.decode_table is None else meta.decode_table[lo:hi],
            decode_ctx=None if meta.decode_ctx is None else meta.decode_ctx[lo:hi],
            row_table=None if meta.row_table is None else meta.row_table[lo:hi],
            row_ctx=None if meta.row_ctx is None else meta.row_ctx[lo:hi])))
    chunks = meta.prefills
    n = min(parts, len(chunks))
    for g in range(n):
        group = chunks[len(chunks) * g // n:len(chunks) * (g + 1) // n]
        lo = group[0].start
        hi = group[-1].start + group[-1].num_tokens
        out.append((slice(lo, hi), input_ids[lo:hi], positions[lo:hi], dataclasses.replace(
            meta, slot_mapping=meta.slot_mapping[lo:hi], num_decode=0, decode_blocks=None,
            decode_bias=None, decode_table=None, decode_ctx=None,
            row_table=None if meta.row_table is None else meta.row_table[lo:hi],
            row_ctx=None if meta.row_ctx is None else meta.row_ctx[lo:hi],
            prefills=[dataclasses.replace(c, start=c.start - lo) for c in group])))
    assert not out or out[-1][0].stop == t
    return out


def all_reduce(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``t`` over the tensor-parallel group (a gloo process group), in place (no
    group: ``t``). Half-precision partial sums are added in float32, rounded once."""
    if group is None:
        return t
    wide = t if t.dtype == torch.float32 else t.float()
    group.allreduce([wide]).wait()
    return t if wide is t else t.copy_(wide)


def vocab_range(rank: int, size: int, vocab: int) -> tuple[int, int]:
    """A tensor-parallel rank's rows of the embedding table and the head: equal shares
    of ceil(vocab / size), the last one shorter when the vocabulary does not divide."""
    per = -(-vocab // size)
    return min(rank * per, vocab), min((rank + 1) * per, vocab)


class VocabEmbedding(nn.Module):
    """This rank's rows ``lo`` .. ``hi - 1`` of the embedding table: a token outside
    them embeds to zeros here, and one all-reduce gives every rank every token's row."""

    def __init__(self, inner: nn.Module, lo: int, hi: int) -> None:
        super().__init__()
        self.inner, self.lo, self.hi = inner, lo, hi
        self.group: Any = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.lo
        inside = (local >= 0) & (local < self.hi - self.lo)
        x = self.inner(local.clamp(0, self.hi - self.lo - 1))
        return all_reduce(x.masked_fill(~inside.unsqueeze(-1), 0), self.group)


def split_vocab(model: torch.nn.Module, shard: Shard) -> None:
    """Keep only this rank's share of the vocabulary in the embedding table and the head
    (one tensor when tied): ``model.logits`` then gives this rank's columns of the logits
    (``gather_logits`` puts them together on rank 0)."""
    from deepserve.layers.gguf_linear import GGUFEmbedding, GGUFLinear
    from deepserve.layers.linear import Linear

    lo, hi = vocab_range(shard.rank, shard.size, shard.full.vocab_size)
    emb, head = model.embed_tokens, model.lm_head
    if isinstance(emb, GGUFEmbedding):
        table = emb.blocks[lo:hi].clone()
        inner: nn.Module = GGUFEmbedding(table, emb.qtype, emb.dim, emb.dtype)
    else:
        table = emb.weight.data[lo:hi].clone()
        inner = nn.Embedding.from_pretrained(table, freeze=True)
    tied = (head.blocks if isinstance(head, GGUFLinear) else head.weight).data_ptr() == \
        (emb.blocks if isinstance(emb, GGUFEmbedding) else emb.weight).data_ptr()
    if isinstance(head, GGUFLinear):
        rows = table if tied else head.blocks[lo:hi].clone()
        model.lm_head = GGUFLinear(rows, head.qtype, head.in_features)
    else:
        model.lm_head = Linear(head.in_features, hi - lo, bias=False, dtype=table.dtype)
        model.lm_head.weight = inner.weight if tied else \
            nn.Parameter(head.weight.data[lo:hi].clone(), requires_grad=False)
    model.embed_tokens = VocabEmbedding(inner, lo, hi)


def gather_logits(part: torch.Tensor, group: Any, size: int, vocab: int) -> torch.Tensor:
    """Every rank's columns of the logits [rows, its share] gathered on rank 0 ->
    [rows, vocab] there (the other ranks get ``part`` back)."""
    per = -(-vocab // size)
    padded = part.new_zeros(part.shape[0], per)
    padded[:, :part.shape[1]] = part
    if group.rank() != 0:
        group.gather([], [padded], _root()).wait()
        return part
    out = [torch.empty_like(padded) for _ in range(size)]
    group.gather([out], [padded], _root()).wait()
    return torch.cat(out, dim=1)[:, :vocab]


def _root() -> Any:
    import torch.distributed as dist

    opts = dist.GatherOptions()
    opts.rootRank = 0
    return opts


def set_group(model: torch.nn.Module, group: Any, mode: str = "tensor",
              dispatch: str = "all-reduce") -> None:
    """Tensor parallelism: every layer sums its output projection and MLP over the
    group, and the embedding its rows; expert parallelism: every MoE layer sums its
    experts' outputs (``dispatch`` "all-reduce"), or sends its tokens' rows to their
    experts' ranks and back ("all-to-all")."""
    if mode == "tensor" and isinstance(model.embed_tokens, VocabEmbedding):
        model.embed_tokens.group = group
    for layer in model.layers:
        if mode == "tensor":
            layer.tp_group = group
        elif getattr(layer, "moe", None) is not None:
            layer.moe.ep_group, layer.moe.ep_dispatch = group, dispatch
