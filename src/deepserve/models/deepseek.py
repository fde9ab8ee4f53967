"""DeepSeek-V2/V3 decoder layers: Multi-head Latent Attention (MLA) with a compressed
latent KV cache, and a DeepSeekMoE or dense MLP (``models/llama.init_mlp``).

MLA projects each token to a latent ``c`` of ``kv_lora_rank`` values (normed) plus one
rotary key ``k_pe`` of ``qk_rope_head_dim`` shared by all heads. The paged cache keeps
only ``[c, k_pe]`` a token and layer: one "head" of ``kv_lora_rank + qk_rope_head_dim``
values, instead of K and V for every head.

Attention runs in the latent space for decode and prefill alike, with the up-projection
``kv_b_proj`` absorbed: head h's key is ``W_UK[h] c`` and its value ``W_UV[h] c``, so

    score = q_nope . (W_UK[h] c) + q_pe . k_pe = (W_UK[h]^T q_nope) . c + q_pe . k_pe

and the query becomes ``[W_UK[h]^T q_nope, q_pe]`` against the cached ``[c, k_pe]``: a
multi-query attention with one shared key/value head, which the paged attention code
(and its CPU decode kernel) already runs. Its output over the value ``[c, k_pe]`` is cut
to ``c``'s part and multiplied by ``W_UV[h]``. Nothing per head is ever materialized for
the cached tokens.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from deepserve import kernels
from deepserve.layers.attention import AttentionMetadata, paged_attention
from deepserve.layers.kv_cache import LayerKV
from deepserve.layers.linear import Linear
from deepserve.layers.rotary import apply_rotary, softmax_mscale
from deepserve.models.config import ModelConfig
from deepserve.models.llama import RMSNorm, init_mlp, mlp, mlp_fused

# The reference implementations norm the low-rank latents with this epsilon.
LATENT_EPS = 1e-6
# bf16 decode attention on the AVX-512 kernels runs in one C++ call (kernels.latent_decode)
LATENT_KERNEL = True


class MLADecoderLayer(nn.Module):
    """Pre-norm MLA + (MoE or dense) MLP."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        h = cfg.num_heads
        self.num_heads = h
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, \
            cfg.v_head_dim
        self.lora = cfg.kv_lora_rank
        self.q_head = self.nope + self.rope
        self.scale = self.q_head ** -0.5 * softmax_mscale(cfg.rope_scaling)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, h * self.q_head, bias=False)
            self.q_proj = None
        else:
            self.q_proj = Linear(cfg.hidden_size, h * self.q_head, bias=False)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, self.lora + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.lora, LATENT_EPS)
        # [H * (nope + v), lora]: read per head as W_UK / W_UV, so kept dense; absorb()
        # replaces it with the two per-head matrices the attention multiplies by
        self.kv_b_proj = nn.Parameter(torch.empty(h * (self.nope + self.v_dim), self.lora),
                                      requires_grad=False)
        self.w_uk: torch.Tensor | None = None  # [H, nope, lora]
        self.w_uv_t: torch.Tensor | None = None  # [H, lora, v]
        # or, on the block kernels (keep_blocks): Q8_0 blocks of W_UK^T [H, lora, nope]
        # and W_UV [H, v, lora], with their kernel types
        self.latent_blocks: tuple[torch.Tensor, int, torch.Tensor, int] | None = None
        self.o_proj = Linear(h * self.v_dim, cfg.hidden_size, bias=False)
        init_mlp(self, cfg, index)

    def absorb(self) -> None:
        """Split kv_b_proj, once loaded, into contiguous W_UK and W_UV^T (bmm would
        otherwise copy the strided halves on every call)."""
        w = self.kv_b_proj.data.view(self.num_heads, self.nope + self.v_dim, self.lora)
        self.w_uk = w[:, :self.nope].contiguous()
        self.w_uv_t = w[:, self.nope:].transpose(1, 2).contiguous()
        del self.kv_b_proj

    def keep_blocks(self, interleave: bool) -> None:
        """W_UK and W_UV per head as Q8_0 blocks, run by ``kernels.bmm_gguf``: half the
        bytes of bf16 read each decode step, on the kernels the layer's other
        projections use (``interleave``: the 8-bit-activation layout of AVX-512 and AVX2). 108 MB a
        token of the DeepSeek-V2-Lite-half file's 52 ms step went to these in bf16."""
        from deepserve.layers import gguf_linear as gl

        if self.nope % gl.QK or self.lora % gl.QK:
            return  # rows of whole 32-value blocks only; these stay dense
        if self.w_uk is None:
            self.absorb()
        parts = []
        for w in (self.w_uk.transpose(1, 2), self.w_uv_t.transpose(1, 2)):  # [H, N, K]
            h, n, k = w.shape
            blocks = gl.quantize(w.reshape(h * n, k).float(), gl.Q8_0)
            if interleave and n % 16 == 0:
                parts += [gl.interleave(blocks, gl.Q8_0, k).view(h, n, -1), gl.Q8_0 + gl.X8]
            else:
                parts += [blocks.view(h, n, -1), gl.Q8_0]
        self.latent_blocks = (parts[0], parts[1], parts[2], parts[3])
        self.w_uk = self.w_uv_t = None

    def _queries(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        if self.q_proj is not None:
            return self.q_proj(x)
        return self.q_b_proj(_norm(self.q_a_layernorm, self.q_a_proj(x), fused))

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  cache: LayerKV, meta: AttentionMetadata, fused: bool = False) -> torch.Tensor:
        t, h = x.shape[0], self.num_heads
        q = self._queries(x, fused).view(t, h, self.q_head)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.lora, self.rope], dim=-1)
        c = _norm(self.kv_a_layernorm, c, fused)
        q_pe = apply_rotary(q_pe, cos, sin)
        k_pe = apply_rotary(k_pe.reshape(t, 1, self.rope), cos, sin)
        latent = torch.cat([c.reshape(t, 1, self.lora), k_pe], dim=-1)  # [T, 1, lora + rope]
        cache.write(latent, latent, meta.slot_mapping)
        lb = self.latent_blocks
        if lb is not None:
            q_lat = kernels.bmm_gguf(q_nope.transpose(0, 1), lb[0], lb[1]).transpose(0, 1)
        else:
            if self.w_uk is None:
                self.absorb()
            q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [T, H, lora]
        query = torch.cat([q_lat, q_pe], dim=-1)
        b = meta.num_decode
        if b and meta.use_kernel and cache.kind in ("auto", "fp16"):
            # decode rows: one small GEMM pair per sequence against its gathered latents
            # (every head shares them), then the prefill chunks as usual
            out = paged_attention(query, latent, latent, cache,
                                  dataclasses.replace(meta, num_decode=0), self.scale)
            out[:b, :, :self.lora] = latent_decode(query[:b], cache, meta, self.scale,
                                                   self.lora)
        else:
            out = paged_attention(query, latent, latent, cache, meta, self.scale)
        o_lat = out[..., :self.lora].transpose(0, 1)  # [H, T, lora]
        o = kernels.bmm_gguf(o_lat, lb[2], lb[3]) if lb is not None else \
            torch.bmm(o_lat, self.w_uv_t)  # [H, T, v]
        return self.o_proj(o.transpose(0, 1).reshape(t, h * self.v_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerKV, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attention(self.input_layernorm(x), cos, sin, cache, meta)
        return x + mlp(self, self.post_attention_layernorm(x))

    def forward_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      cache: LayerKV, meta: AttentionMetadata) -> torch.Tensor:
        """The same layer with its norms (and the residual add) in the fused kernel."""
        norm = self.input_layernorm
        h = kernels.rms_norm(x, None, norm.weight, norm.eps)[0]
        a = self.attention(h, cos, sin, cache, meta, fused=True)
        norm = self.post_attention_layernorm
        h, x = kernels.rms_norm(x, a, norm.weight, norm.eps)
        return x + mlp_fused(self, h)


def _norm(norm: RMSNorm, x: torch.Tensor, fused: bool) -> torch.Tensor:
    if fused:
        return kernels.rms_norm(x.contiguous(), None, norm.weight, norm.eps)[0]
    return norm(x)


def latent_decode(q: torch.Tensor, cache: LayerKV, meta: AttentionMetadata, scale: float,
                  value_dim: int) -> torch.Tensor:
    """Decode attention over the latent cache: q [B, H, D] against each sequence's cached
    latents [L, D] (gathered block by block, padded to the longest context), values their
    first ``value_dim`` entries. Returns [B, H, value_dim]. Two batched GEMMs: with one KV
    head shared by all H query heads this beats the decode kernel, which works per
    (sequence, KV head) (a batch-32 decode step of the DeepSeek-V2-Lite-shaped benchmark
    file: 400 -> 299 ms, BENCHMARKS.md)."""
    b, _, d = q.shape
    bs = meta.block_size
    table, ctx = meta.decode_table, meta.decode_ctx
    if LATENT_KERNEL and q.dtype == cache.k.dtype == torch.bfloat16 and \
            kernels.isa() == "avx512":
        # the same in one C++ call, the cache read in place (52 -> 47 ms a step of the
        # DeepSeek-V2-Lite-half file at one sequence; BENCHMARKS.md)
        return kernels.latent_decode(q, cache.k.view(-1, d), table, ctx, bs, scale,
                                     value_dim)
    length = table.shape[1] * bs
    kv = cache.k.view(-1, bs, d).index_select(0, table.reshape(-1)).view(b, length, d)
    if kv.dtype != q.dtype:  # an fp16 cache under another compute dtype
        kv = kv.to(q.dtype)
    scores = torch.bmm(q, kv.transpose(1, 2)).float() * scale  # [B, H, L]
    pad = torch.arange(length, device=q.device).unsqueeze(0) >= ctx.unsqueeze(1)
    scores.masked_fill_(pad.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(kv.dtype)
    return torch.bmm(probs, kv[..., :value_dim])


def rope_row_order(cfg: ModelConfig, which: str) -> torch.Tensor | None:
    """Row order that turns a checkpoint's adjacent-pair rotary rows into the half-split
    layout deepserve rotates (None when nothing moves). ``which``: "q" (per head, the
    rope rows after the nope rows) or "kv_a" (the rope rows after the latent)."""
    if not (cfg.is_mla and cfg.rope_interleave):
        return None
    r = cfg.qk_rope_head_dim
    pairs = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2)])
    if which == "kv_a":
        return torch.cat([torch.arange(cfg.kv_lora_rank), cfg.kv_lora_rank + pairs])
    head = cfg.qk_nope_head_dim + r
    one = torch.cat([torch.arange(cfg.qk_nope_head_dim), cfg.qk_nope_head_dim + pairs])
    return (torch.arange(cfg.num_heads).unsqueeze(1) * head + one).flatten()
