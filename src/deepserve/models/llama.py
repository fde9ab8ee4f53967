"""The decoder as plain torch: the Llama family (Llama, SmolLM2, TinyLlama, Llama-3,
Qwen2/2.5, Qwen3 with its q/k norms), with mixture-of-experts MLPs where the config has
them (Qwen3-MoE, DeepSeek; ``layers/moe.py``) and Multi-head Latent Attention layers for
DeepSeek-V2/V3 (``models/deepseek.py``).

Q/K/V and gate/up projections are fused into one matmul each: fewer, larger matmuls
keep the CPU's bf16 units busier than many small ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepserve import kernels
from deepserve.layers.attention import AttentionMetadata, paged_attention
from deepserve.layers.gguf_linear import GGUFLinear
from deepserve.layers.kv_cache import LayerKV
from deepserve.layers.linear import KernelLayer, Linear
from deepserve.layers.moe import SparseMoE
from deepserve.layers.rotary import RotaryEmbedding, apply_rotary
from deepserve.models.config import ModelConfig
from deepserve.models.parallel import all_reduce


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as the reference implementations do."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        # filled by the loader (a checkpoint without it is refused); torch.ones cost 1 ms
        # a norm on the meta device the model is built on
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# Whether decode steps on GGUF blocks run each layer as one C++ call (tests compare both)
FUSED_DECODE = True


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP (or a sparse MoE). Under tensor parallelism
    (``tp_group`` set) it holds its rank's heads and MLP rows, and sums the output
    projection's and the MLP's partial results over the ranks."""

    tp_group: object = None

    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        init_mlp(self, cfg, index)

    def _norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """Qwen3: RMSNorm over each q and k head (before rotary)."""
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(t, self.num_heads, self.head_dim)).reshape(t, self.q_size)
        k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim)).reshape(t, self.kv_size)
        return torch.cat([q, k, v], dim=-1)

    def _rotate_and_store(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          cache: LayerKV, meta: AttentionMetadata
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split the fused projection, rotate q and k, write k and v to the cache."""
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.view(t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(k.view(t, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        cache.write(k, v, meta.slot_mapping)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerKV, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(self.input_layernorm(x))
        if self.q_norm is not None:
            qkv = self._norm_qk(qkv)
        q, k, v = self._rotate_and_store(qkv, cos, sin, cache, meta)
        attn = paged_attention(q, k, v, cache, meta, self.scale)
        x = x + all_reduce(self.o_proj(attn.view(t, self.q_size)), self.tp_group)
        return x + all_reduce(mlp(self, self.post_attention_layernorm(x)), self.tp_group)

    def decode_weights(self) -> tuple | None:
        """The arguments ``kernels.decode_layer`` takes from this layer, when it can run a
        decode step as one C++ call: its projections on GGUF blocks (no bf16 copies), no
        tensor parallelism. Qwen3's q/k norms go into the call; an MoE layer's MLP stays
        in Python (the call then stops after the post-attention norm). Else None."""
        from deepserve.layers.gguf_linear import GGUFLinear

        names = ("qkv_proj", "o_proj") + (("gate_up_proj", "down_proj") if self.moe is None
                                          else ())
        projs = [getattr(self, n, None) for n in names]
        if (self.tp_group is not None
                or not all(isinstance(p, GGUFLinear) and p.use_kernel and p.dense is None
                           and p.batch_blocks is None for p in projs)
                or any(p.bias is not None for p in projs[1:])
                or (self.q_norm is not None and self.q_norm.eps != self.input_layernorm.eps)):
            return None
        qkv, o = projs[:2]
        mlp = (None, 0, None, 0) if self.moe is not None else \
            (projs[2].blocks, projs[2].kernel_qtype, projs[3].blocks, projs[3].kernel_qtype)
        norms = (None, None) if self.q_norm is None else (self.q_norm.weight,
                                                          self.k_norm.weight)
        return (self.input_layernorm.weight, self.post_attention_layernorm.weight,
                self.input_layernorm.eps, *norms, qkv.blocks, qkv.kernel_qtype, qkv.bias,
                o.blocks, o.kernel_qtype, *mlp)

    def forward_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      cache: LayerKV, meta: AttentionMetadata) -> torch.Tensor:
        """The same layer through deepserve's fused CPU kernels (``kernels.py``): norm,
        rotary + cache write and SwiGLU each in one call; same rounding points. A decode
        step on GGUF blocks, or a step whose every row has a block table (short prompts
        beside the decodes: ``AttentionMetadata.row_table``), runs the whole layer as one
        call (``decode_weights``)."""
        t = x.shape[0]
        plan = self.__dict__.get("_decode_plan", False)
        if plan is False:  # decided once, after loading
            plan = self._decode_plan = self.decode_weights()
        rows = fused_rows(meta, t, cache)
        if plan is not None and rows is not None:
            out = kernels.decode_layer(x, *plan, cos, sin, cache.k, cache.v,
                                       meta.slot_mapping, self.num_heads, self.num_kv_heads,
                                       *rows, meta.block_size, self.scale,
                                       *kv_scales(cache))
            return out[0] if self.moe is None else out[1] + self.moe(out[0])
        h = kernels.rms_norm(x, None, self.input_layernorm.weight, self.input_layernorm.eps)[0]
        qkv = self.qkv_proj(h)
        if self.q_norm is not None:  # per-head norms through the fused kernel, in place
            for norm, cols in ((self.q_norm, slice(0, self.q_size)),
                               (self.k_norm, slice(self.q_size, self.q_size + self.kv_size))):
                part = qkv[:, cols]
                normed = kernels.rms_norm(part.reshape(-1, self.head_dim).contiguous(), None,
                                          norm.weight, norm.eps)[0]
                part.copy_(normed.view(t, -1))
        # the kernel encodes K/V as it writes, for every cache kind (fp16, int8, fp8)
        q, k = kernels.rope_write_kv(qkv, cos, sin, cache.k, cache.v, meta.slot_mapping,
                                     self.num_heads, self.num_kv_heads, *kv_scales(cache))
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
        attn = paged_attention(q, k, v, cache, meta, self.scale)
        norm = self.post_attention_layernorm
        h, x = kernels.rms_norm(x, all_reduce(self.o_proj(attn.view(t, self.q_size)),
                                              self.tp_group), norm.weight, norm.eps)
        return x + all_reduce(mlp_fused(self, h), self.tp_group)


def kv_scales(cache: LayerKV) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """An int8 cache's per-slot K and V scales; (None, None) for the other kinds."""
    return getattr(cache, "k_scale", None), getattr(cache, "v_scale", None)


def fused_rows(meta: AttentionMetadata, t: int, cache: LayerKV) -> tuple | None:
    """The block table and context lengths a one-call layer (``kernels.decode_layer`` /
    ``decode_layers``) attends with, where a step of ``t`` rows can run as one: the
    kernels on and every row with a table (decodes, or short prompts' row tables); the
    fused rotary writes every cache kind. Else None."""
    if not (meta.use_kernel and FUSED_DECODE):
        return None
    if meta.row_table is not None:
        return meta.row_table, meta.row_ctx
    return (meta.decode_table, meta.decode_ctx) if meta.num_decode == t else None


def init_mlp(layer: nn.Module, cfg: ModelConfig, index: int) -> None:
    """A layer's MLP: a sparse MoE on the config's MoE layers, else dense SwiGLU."""
    layer.moe = SparseMoE(cfg) if cfg.is_moe_layer(index) else None
    if layer.moe is None:
        layer.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        layer.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
    layer.intermediate_size = cfg.intermediate_size


def mlp(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if layer.moe is not None:
        return layer.moe(h)
    gate, up = layer.gate_up_proj(h).split(layer.intermediate_size, dim=-1)
    return layer.down_proj(F.silu(gate) * up)


def mlp_fused(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if layer.moe is not None:
        return layer.moe(h)
    gate_up = layer.gate_up_proj
    act = gate_up.swiglu(h) if isinstance(gate_up, GGUFLinear) else None  # AMX, one pass
    return layer.down_proj(act if act is not None else kernels.silu_mul(gate_up(h)))


class LlamaForCausalLM(KernelLayer, nn.Module):
    """The whole decoder; ``forward`` returns hidden states, ``logits`` projects chosen rows."""

    def __init__(self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = cfg
        # _weight skips the random init (on the meta device it would import torch's
        # compiler stack: 1.6 s of the load); the loader fills every weight.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        if cfg.is_mla:
            from deepserve.models.deepseek import MLADecoderLayer

            self.layers = nn.ModuleList(MLADecoderLayer(cfg, i) for i in range(cfg.num_layers))
        else:
            self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # built on the meta device, the loader makes the tables (once, 0.1 s)
        self.rotary = None if torch.get_default_device().type == "meta" else \
            RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling,
                            dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[LayerKV], meta: AttentionMetadata,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after the layers this module holds; ``hidden``: a pipeline
        stage's input from the stage before (instead of embedding ``input_ids``)."""
        x = self.embed_tokens(input_ids) if hidden is None else hidden
        cos, sin = self.rotary.tables(positions)
        if self.use_kernel and self._fusable():
            whole = self._whole_step(x, cos, sin, kv_caches, meta)
            if whole is not None:
                return whole
            for layer, cache in zip(self.layers, kv_caches, strict=True):
                x = layer.forward_fused(x, cos, sin, cache, meta)
            return x
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, cache, meta)
        return x

    def _whole_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    kv_caches: list[LayerKV], meta: AttentionMetadata) -> torch.Tensor | None:
        """A step whose every layer ``forward_fused`` would run as one ``decode_layer``
        call runs as one ``kernels.decode_layers`` call: one dispatch instead of one a
        layer. None where that does not apply."""
        plans = self.__dict__.get("_plans", False)
        if plans is False:  # decided once, after loading
            plans = self._plans = self.decode_plans()
        rows = fused_rows(meta, x.shape[0], kv_caches[0])
        if plans is None or rows is None:
            return None
        first = self.layers[0]
        scales = [kv_scales(c) for c in kv_caches]
        return kernels.decode_layers(x, *plans, cos, sin, [c.k for c in kv_caches],
                                     [c.v for c in kv_caches], meta.slot_mapping,
                                     first.num_heads, first.num_kv_heads, *rows,
                                     meta.block_size, first.scale, [s[0] for s in scales],
                                     [s[1] for s in scales])

    def decode_plans(self) -> tuple | None:
        """``kernels.decode_layers``' per-layer arguments (``DecoderLayer.decode_weights``
        of each layer, field by field, as lists) where every layer is dense with such a
        plan and all share one norm epsilon; else None."""
        layers = list(self.layers)
        if not layers or not all(isinstance(m, DecoderLayer) and m.moe is None
                                 for m in layers):
            return None
        plans = [m.decode_weights() for m in layers]
        if any(p is None for p in plans) or len({p[2] for p in plans}) != 1:
            return None
        fields = [list(f) for f in zip(*plans, strict=True)]
        return (fields[0], fields[1], plans[0][2], *fields[3:])

    def _fusable(self) -> bool:
        # The fused kernels handle float32 and bfloat16 with same-dtype norm weights.
        w = self.norm.weight
        return w.dtype in (torch.float32, torch.bfloat16) and w.device.type == "cpu"

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and self._fusable() and hidden.dtype == self.norm.weight.dtype:
            # the fused kernel, as every layer's norms (7 torch ops: 0.4 ms at 64 rows)
            return kernels.rms_norm(hidden.contiguous(), None, self.norm.weight,
                                    self.norm.eps)[0]
        return self.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of the rows; a head on GGUF blocks computes them from float rows,
        so they are never rounded to bf16 and converted back ([64, 49152]: 3.6 ms)."""
        head, h = self.lm_head, self.final_norm(hidden)
        if getattr(head, "float_rows_ok", False) and head.float_rows_ok(h.shape[0]):
            return head(h.float())
        return head(h).float()

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """``logits(hidden).argmax(-1)`` where the head picks on its tiles without writing
        the logits (64 x 49152 float32 not written and read back: 0.9 ms a step); None
        elsewhere."""
        pick = getattr(self.lm_head, "argmax", None)
        return None if pick is None else pick(self.final_norm(hidden).float())
