"""Attention over the paged KV cache, for a flat batch that mixes prefill and decode.

Layout of one step's batch (built by the model runner): decode sequences first, one
query token each, then prefill chunks. The KV cache of a layer is two tensors
``[kv_heads, num_slots, head_dim]`` where slot = block_id * block_size + offset. Decode
attention gathers every decode sequence's context block by block with one
``index_select`` (whole 16-token blocks are contiguous, so this is a few large copies,
measured 4x faster than per-slot indexing), pads to the longest context, masks the
padding, and runs two batched matmuls: on this CPU that beat SDPA's flash kernel by 2x
for one-token queries. On CPU with deepserve's kernels built, decode attention instead
reads K/V in place through the block table (``paged_decode_attention``: no copy of the
context, 1.5-10x faster than the gather depending on the KV dtype). Each prefill chunk
runs its own causal SDPA call over its cached prefix plus the new tokens, except where
the model runner gives every row of the step a block table and a context length
(``row_table``: short prompts over a bf16 or 8-bit cache, on the kernel's AVX-512 bf16
path); then each prompt token is a row of the same kernel, its context its position + 1
(the chunk's K/V are written first), and the whole step is one call: 32 prompts of 128
tokens, 5.6 vs 10.1 ms a layer for 32 SDPA calls. SDPA stays faster past about 1024
tokens of context (``PAGED_PREFILL``), and on the float32 and AVX2 paths (1.5-3x).
Inside that call, the rows that are one prompt's consecutive tokens (a run: contexts c +
1, c + 2, ... on the same blocks) attend as one causal block: on AMX tiles every run of
16 rows or more, a whole prompt or a chunk past its cached prefix
(``prompt_attention_amx`` in ``cpu_kernels.cpp``: 0.99 against 2.05 ms a layer for 16
prompts of 128 tokens, and long contexts too, ``PAGED_PREFILL_TILES``); without tiles a
whole prompt of 1024 tokens or more over a bf16 cache (context starting at 1) as one
causal SDPA call (``kSdpaRun``). Other rows, and an 8-bit cache's, run row by row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from deepserve import kernels
from deepserve.layers.kv_cache import LayerKV


@dataclass
class PrefillChunk:
    """One sequence's prompt chunk in the flat batch."""

    start: int  # first row of this chunk in the flat batch
    num_tokens: int  # query tokens computed this step
    context_len: int  # tokens in the cache after this step (cached prefix + chunk)
    slots: torch.Tensor | None  # [context_len] slot ids, only when a cached prefix exists
    mask: torch.Tensor | None  # [num_tokens, context_len] bool, only with a cached prefix


@dataclass
class AttentionMetadata:
    """Per-step tensors shared by every layer."""

    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_decode: int = 0
    decode_blocks: torch.Tensor | None = None  # [B * max_blocks] block ids, padded with 0
    decode_bias: torch.Tensor | None = None  # [1, B, 1, max_blocks * block_size] 0 or -inf
    decode_table: torch.Tensor | None = None  # [B, max_blocks] (kernel path)
    decode_ctx: torch.Tensor | None = None  # [B] context lengths (kernel path)
    use_kernel: bool = False  # decode attention through kernels.paged_decode_attention
    block_size: int = 16
    prefills: list[PrefillChunk] = field(default_factory=list)
    # every row's block table [T, max_blocks] and context length [T] (decode rows, then
    # each prefill token): the kernel then runs the whole step's attention
    row_table: torch.Tensor | None = None
    row_ctx: torch.Tensor | None = None


# Prefill chunks run on the paged kernel (with the decode rows, one call) while every
# chunk's context is at most this many tokens; SDPA's tiles win on longer ones. Where the
# kernel's prompt runs take AMX tiles (``prompt_attention_amx``), up to PAGED_PREFILL_TILES:
# 1.4x SDPA on a whole 2048-token prompt, 7.5x on a 2048-token chunk after 2048 cached
# tokens (benchmarks/prompt_attention.py; the chunk there runs row by row, and the Python
# path takes it as SDPA with an explicit mask).
PAGED_PREFILL = 512
PAGED_PREFILL_TILES = 1 << 16


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, heads, d]; k, v: [T, kv_heads, d] (already written to the cache).

    Returns [T, heads, d].
    """
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    group = heads // kv_heads
    b = meta.num_decode
    if meta.row_table is not None:
        return kernels.paged_decode_attention(
            q, cache.k, cache.v, getattr(cache, "k_scale", None),
            getattr(cache, "v_scale", None), meta.row_table, meta.row_ctx, meta.block_size,
            scale)
    if b and meta.use_kernel:
        od = kernels.paged_decode_attention(
            q[:b], cache.k, cache.v, getattr(cache, "k_scale", None),
            getattr(cache, "v_scale", None), meta.decode_table, meta.decode_ctx,
            meta.block_size, scale)
        if not meta.prefills:
            return od
        out = torch.empty_like(q)
        out[:b] = od
    else:
        out = torch.empty_like(q)
    if b and not meta.use_kernel:
        # Query heads sharing a KV head form the "query length" axis: no K/V repeat needed.
        kd, vd = cache.gather_blocks(meta.decode_blocks, meta.block_size, b)
        qd = q[:b].view(b, kv_heads, group, dim).transpose(0, 1)  # [kv_heads, B, group, d]
        scores = torch.matmul(qd, kd.transpose(-1, -2)).float() * scale + meta.decode_bias
        probs = torch.softmax(scores, dim=-1).to(vd.dtype)
        out[:b] = torch.matmul(probs, vd).transpose(0, 1).reshape(b, heads, dim)
    for chunk in meta.prefills:
        rows = slice(chunk.start, chunk.start + chunk.num_tokens)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
        if chunk.slots is None:
            kp = k[rows].transpose(0, 1).unsqueeze(0)
            vp = v[rows].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale,
                                                enable_gqa=group > 1)
        else:
            kc, vc = cache.gather_slots(chunk.slots)
            kp, vp = kc.unsqueeze(0), vc.unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=chunk.mask, scale=scale,
                                                enable_gqa=group > 1)
        out[rows] = op[0].transpose(0, 1)
    return out
