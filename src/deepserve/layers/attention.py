"""Attention over the paged KV cache, for a flat batch that mixes prefill and decode.

Layout of one step's batch (built by the model runner): decode sequences first, one
query token each, then prefill chunks. The KV cache of a layer is two tensors
``[kv_heads, num_slots, head_dim]`` where slot = block_id * block_size + offset.
Decode attention gathers every decode sequence's context with one index tensor
(padded, masked) and runs one batched SDPA call; each prefill chunk runs its own
causal SDPA call over its cached prefix plus the new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


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
    decode_slots: torch.Tensor | None = None  # [B, L] padded slot ids of decode contexts
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, L] bool, True where a key is real
    prefills: list[PrefillChunk] = field(default_factory=list)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k, v: [T, kv_heads, head_dim] -> cache[:, slots]."""
    k_cache.index_copy_(1, slots, k.transpose(0, 1))
    v_cache.index_copy_(1, slots, v.transpose(0, 1))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, heads, d]; k, v: [T, kv_heads, d] (already written to the cache).

    Returns [T, heads, d].
    """
    num_tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    b = meta.num_decode
    if b:
        # Query heads of one KV head become the "query length" axis: no K/V repeat needed.
        qd = q[:b].view(b, kv_heads, group, dim)
        kd = k_cache[:, meta.decode_slots].transpose(0, 1)  # [B, kv_heads, L, d]
        vd = v_cache[:, meta.decode_slots].transpose(0, 1)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
        out[:b] = od.reshape(b, heads, dim)
    for chunk in meta.prefills:
        rows = slice(chunk.start, chunk.start + chunk.num_tokens)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
        if chunk.slots is None:
            kp = k[rows].transpose(0, 1).unsqueeze(0)
            vp = v[rows].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale,
                                                enable_gqa=group > 1)
        else:
            kp = k_cache[:, chunk.slots].unsqueeze(0)
            vp = v_cache[:, chunk.slots].unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=chunk.mask, scale=scale,
                                                enable_gqa=group > 1)
        out[rows] = op[0].transpose(0, 1)
    return out
