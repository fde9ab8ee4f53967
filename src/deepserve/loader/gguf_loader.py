"""Read a GGUF file: architecture metadata and dequantized tensors under HF names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepserve.errors import ModelLoadError
from deepserve.loader.gguf_file import GGUFFile
from deepserve.models.config import ModelConfig

# GGUF tensor name (per layer, after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # Qwen3
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    # mixture of experts (3-D expert tensors: [experts, rows, row length])
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj",
    "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
    # Multi-head Latent Attention (deepseek2)
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
}
# GGUF architecture -> deepserve's (HF model_type) name; deepseek2 is V3 when its router
# uses sigmoid scores
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                      "qwen3moe": "qwen3_moe", "deepseek2": "deepseek_v2"}
# rows in rotary order after this (MLA): a row permutation of whole rows
_MLA_ROPE = {"attn_q.weight": "q", "attn_q_b.weight": "q", "attn_kv_a_mqa.weight": "kv_a"}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# GGUF types deepserve computes with directly (layers/gguf_linear.py): Q4_0, Q4_1, Q8_0,
# and for projections also Q5_0, Q5_1, Q4_K and Q6_K, rewritten exactly at load
# (layers/kquants.py); all but Q6_K need rows in eights.
BLOCK_TYPES = (2, 3, 8)
K_TYPES = (6, 7, 12, 14)
_EIGHTS = (6, 7, 12)


class GGUFCheckpoint:
    """A GGUF file's header, its tensors memory-mapped (nothing read yet)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.reader = GGUFFile(path)
        except Exception as exc:  # the gguf package raises plain ValueError/OSError
            raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc
        self.arch = str(self.field("general.architecture", ""))
        if self.arch not in GGUF_ARCHITECTURES:
            raise ModelLoadError(
                f"{path}: GGUF architecture {self.arch!r} is not supported; deepserve runs "
                f"{', '.join(GGUF_ARCHITECTURES)} GGUF files")
        self._tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default: Any = None) -> Any:
        return self.reader.fields.get(key, default)

    def need(self, key: str) -> Any:
        """``{arch}.{key}`` from the metadata, or an error naming it."""
        value = self.field(f"{self.arch}.{key}")
        if value is None:
            raise ModelLoadError(f"{self.path}: GGUF metadata lacks {self.arch}.{key}, which "
                                 f"a {self.arch} model needs")
        return value

    def model_config(self) -> ModelConfig:
        a, need = self.arch, self.need

        heads = int(need("attention.head_count"))
        hidden = int(need("embedding_length"))
        vocab = self.field(f"{a}.vocab_size")
        if vocab is None:
            vocab = len(self.field("tokenizer.ggml.tokens", []))
        scaling = None
        if self.field(f"{a}.rope.scaling.type") not in (None, "none"):
            scaling = {"rope_type": self.field(f"{a}.rope.scaling.type"),
                       "factor": float(self.field(f"{a}.rope.scaling.factor", 1.0))}
            old = self.field(f"{a}.rope.scaling.original_context_length")
            if old:
                scaling["original_max_position_embeddings"] = int(old)
            log_mul = self.field(f"{a}.rope.scaling.yarn_log_multiplier")
            if a == "deepseek2" and log_mul:  # 0.1 * mscale_all_dim (= mscale in DeepSeek's)
                scaling["mscale"] = scaling["mscale_all_dim"] = float(log_mul) / 0.1
        extra = self._moe_mla_fields(heads) if a in ("qwen3moe", "deepseek2") else {}
        arch = GGUF_ARCHITECTURES[a]
        if extra.get("scoring_func") == "sigmoid":
            arch = "deepseek_v3"
        head_dim = int(self.field(f"{a}.attention.key_length", hidden // heads))
        if a == "deepseek2":
            head_dim = extra["qk_rope_head_dim"]
        return ModelConfig(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=heads,
            num_kv_heads=(1 if a == "deepseek2"
                          else int(self.field(f"{a}.attention.head_count_kv", heads))),
            head_dim=head_dim,
            rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(self.field(f"{a}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in self._tensors,
            attention_bias="blk.0.attn_q.bias" in self._tensors,
            qk_norm=a in ("qwen3", "qwen3moe"),
            **extra,
        )

    def _moe_mla_fields(self, heads: int) -> dict[str, Any]:
        """Experts (qwen3moe, deepseek2) and latent attention (deepseek2) from metadata."""
        a, need = self.arch, self.need

        layers = int(need("block_count"))
        # MoE layers are those with a router (llama.cpp's qwen3moe has no dense-layer
        # setting; deepseek2's leading dense layers have none either)
        moe_layers = tuple(i for i in range(layers)
                           if f"blk.{i}.ffn_gate_inp.weight" in self._tensors)
        out: dict[str, Any] = dict(
            num_experts=int(need("expert_count")),
            num_experts_per_tok=int(need("expert_used_count")),
            moe_intermediate_size=int(need("expert_feed_forward_length")))
        if a == "qwen3moe":  # llama.cpp renormalises Qwen3-MoE's top-k weights
            out.update(moe_layers=moe_layers, norm_topk_prob=True)
            return out
        gating = int(self.field(f"{a}.expert_gating_func", 1))
        groups = int(self.field(f"{a}.expert_group_count", 1) or 1)
        out.update(
            moe_layers=moe_layers,
            norm_topk_prob=bool(self.field(f"{a}.expert_weights_norm", False)),
            n_shared_experts=int(self.field(f"{a}.expert_shared_count", 0)),
            scoring_func="sigmoid" if gating == 2 else "softmax",
            n_group=groups,
            topk_group=int(self.field(f"{a}.expert_group_used_count", 1) or 1),
            group_score="top2",  # llama.cpp ranks groups by their best two, either gating
            routed_scaling_factor=float(self.field(f"{a}.expert_weights_scale", 1.0) or 1.0),
            q_lora_rank=int(self.field(f"{a}.attention.q_lora_rank", 0)) or None,
            kv_lora_rank=int(need("attention.kv_lora_rank")),
            qk_rope_head_dim=int(need("rope.dimension_count")),
            rope_interleave=True)  # llama.cpp rotates deepseek2's adjacent pairs
        key_mla = self.field(f"{a}.attention.key_length_mla")
        if key_mla:  # files with the latent split (attn_k_b / attn_v_b)
            out["qk_nope_head_dim"] = int(key_mla) - out["qk_rope_head_dim"]
            out["v_head_dim"] = int(need("attention.value_length_mla"))
        else:
            out["qk_nope_head_dim"] = int(need("attention.key_length")) - out["qk_rope_head_dim"]
            out["v_head_dim"] = int(need("attention.value_length"))
        return out

    def hf_name(self, gguf_name: str) -> str | None:
        if gguf_name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[gguf_name]
        if gguf_name.startswith("blk."):
            _, layer, rest = gguf_name.split(".", 2)
            if rest in _LAYER_NAMES:
                return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
        return None

    def __len__(self) -> int:
        return len(self._tensors)

    def block_plan(self, config: ModelConfig, first: int = 0
                   ) -> dict[str, tuple[int | None, list[str]]]:
        """Modules that can keep the file's own blocks: module path -> (GGUF type, the
        GGUF tensors it is made of, in row order). A projection qualifies when each of its
        parts is one of Q4_0, Q4_1, Q8_0, Q6_K, or Q5_0 / Q5_1 / Q4_K with rows a multiple
        of 8; the type is
        None when a fused projection's parts differ (as Q4_K_M files mix Q4_K and Q6_K
        in q / k / v). The embedding table qualifies in Q4_0, Q4_1, Q8_0 or Q6_K (the
        type of a tied table in K-quant files; the head then shares its blocks)."""
        groups = {"embed_tokens": ["token_embd.weight"],
                  "lm_head": ["output.weight" if "output.weight" in self._tensors
                              else "token_embd.weight"]}
        for i in range(config.num_layers):  # (a pipeline stage's layers from ``first``)
            p, m = f"blk.{i + first}.", f"layers.{i}."
            if config.is_mla:
                if config.q_lora_rank:
                    groups[m + "q_a_proj"] = [p + "attn_q_a.weight"]
                    groups[m + "q_b_proj"] = [p + "attn_q_b.weight"]
                else:
                    groups[m + "q_proj"] = [p + "attn_q.weight"]
                groups[m + "kv_a_proj_with_mqa"] = [p + "attn_kv_a_mqa.weight"]
            else:
                groups[m + "qkv_proj"] = [p + "attn_q.weight", p + "attn_k.weight",
                                          p + "attn_v.weight"]
            groups[m + "o_proj"] = [p + "attn_output.weight"]
            if config.is_moe_layer(i):
                groups[m + "moe.experts"] = [p + "ffn_gate_exps.weight", p + "ffn_up_exps.weight",
                                             p + "ffn_down_exps.weight"]
                if config.n_shared_experts:
                    groups[m + "moe.shared.gate_up_proj"] = [p + "ffn_gate_shexp.weight",
                                                             p + "ffn_up_shexp.weight"]
                    groups[m + "moe.shared.down_proj"] = [p + "ffn_down_shexp.weight"]
            else:
                groups[m + "gate_up_proj"] = [p + "ffn_gate.weight", p + "ffn_up.weight"]
                groups[m + "down_proj"] = [p + "ffn_down.weight"]
        plan = {}
        for module, names in groups.items():
            if not all(n in self._tensors for n in names):
                continue
            types = [self.tensor_type(n) for n in names]
            if module == "embed_tokens":
                # Q6_K too: K-quant files of tied models keep their table (and head) in it
                if types[0] in BLOCK_TYPES or types[0] == 14:
                    plan[module] = (types[0], names)
            elif module.endswith(".moe.experts"):
                # experts stay in blocks when gate and up share a type the kernels run
                if types[0] == types[1] and all(self._keepable(n) for n in names):
                    plan[module] = (types[0], names)
            elif all(self._keepable(n) for n in names):
                plan[module] = (types[0] if len(set(types)) == 1 else None, names)
        return plan

    def _keepable(self, name: str) -> bool:
        """A tensor a block layer can compute with as stored (rows per expert for 3-D)."""
        t = self.tensor_type(name)
        rows = int(self._tensors[name].data.shape[-2])
        return t in BLOCK_TYPES or (t in K_TYPES and not (t in _EIGHTS and rows % 8))

    def rows(self, name: str) -> int:
        """A tensor's rows (its output features, for a projection)."""
        return int(self._tensors[name].data.shape[0])

    def tensor_type(self, name: str) -> int:
        """A tensor's GGUF type id (2 for Q4_0, 12 for Q4_K, ...)."""
        return int(self._tensors[name].tensor_type)

    def view(self, name: str) -> torch.Tensor:
        """A tensor's blocks as a read-only view of the mapped file (no copy: the caller
        copies what it keeps, then ``release``s the pages)."""
        import warnings

        with warnings.catch_warnings():  # read-only memory: only ever read from here
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(self._tensors[name].data)

    def release(self, name: str) -> None:
        """Drop a tensor's file pages from resident memory (once copied)."""
        self.reader.release(self._tensors[name].data)

    def blocks(self, name: str, config: ModelConfig, copy: bool = True) -> torch.Tensor:
        """One tensor's rows as the file stores them: [rows, bytes per row] uint8 (llama's
        q/k rows put back in rotary order: a row permutation, so blocks stay whole).
        ``copy=False``: rows in the file's order stay a read-only view of the mapped file
        (the caller copies them, then ``release``s the pages)."""
        t = self._tensors[name]
        if copy:
            data = torch.from_numpy(np.array(t.data, dtype=np.uint8, copy=True))
            self.reader.release(t.data)
        else:
            data = self.view(name)
        if self.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_heads if "attn_q" in name else config.num_kv_heads
            data = _unpermute_rotary(data, heads).contiguous()
        order = self._rope_order(name, config)
        if order is not None:
            data = data[order].contiguous()
        return data

    def _rope_order(self, name: str, config: ModelConfig) -> torch.Tensor | None:
        """deepseek2's rotary rows, reordered as the HF loader reorders them."""
        from deepserve.models.deepseek import rope_row_order

        kind = _MLA_ROPE.get(name.split(".", 2)[-1]) if self.arch == "deepseek2" else None
        return None if kind is None else rope_row_order(config, kind)

    def tensors(self, config: ModelConfig, skip: frozenset[str] = frozenset(),
                layers: range | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, float32 tensor) for every tensor not in ``skip``, dequantized
        (with ``layers``, of those layers only, besides the model-wide tensors)."""

        split_kv: dict[str, dict[str, torch.Tensor]] = {}  # layer -> attn_k_b / attn_v_b
        for name, t in self._tensors.items():
            if name in skip or (layers is not None and name.startswith("blk.") and
                                int(name.split(".", 2)[1]) not in layers):
                continue
            hf = self.hf_name(name)
            if hf is None and name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
                # llama.cpp's converter splits kv_b_proj per head into K (transposed) and
                # V; put it back together: [H * (nope + v), kv_lora_rank]
                _, layer, rest = name.split(".", 2)
                parts = split_kv.setdefault(layer, {})
                parts[rest[5]] = (name, t)
                if len(parts) == 2:
                    # copied once, from the mapped file into place (these are float32
                    # in llama.cpp's files: 216 MB for a DeepSeek-V2-Lite half)
                    k_b, v_b = (self._floats(*parts[x]) for x in "kv")
                    heads, rank, nope = k_b.shape
                    kv_b = torch.empty(heads, nope + v_b.shape[1], rank)
                    kv_b[:, :nope].copy_(k_b.transpose(1, 2))
                    kv_b[:, nope:].copy_(v_b)
                    for _, info in parts.values():
                        self.reader.release(info.data)
                    yield (f"model.layers.{layer}.self_attn.kv_b_proj.weight",
                           kv_b.reshape(-1, rank))
                continue
            if hf is None:
                if name.startswith("rope_freqs"):
                    continue
                raise ModelLoadError(f"{self.path}: tensor {name!r} has no place in a "
                                     f"{self.arch} model (expected one of the standard "
                                     f"GGUF {self.arch} tensor names)")
            tensor = self._dequantized(name, t)
            if self.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = config.num_heads if "attn_q" in name else config.num_kv_heads
                tensor = _unpermute_rotary(tensor, heads)
            yield hf, tensor

    def _floats(self, name: str, t: Any) -> torch.Tensor:
        """A tensor as float32: a view of the mapped file where it is stored so (the
        caller copies it, then releases the pages), else dequantized."""
        import gguf

        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            return self._dequantized(name, t)
        return self.view(name)

    def _dequantized(self, name: str, t: Any) -> torch.Tensor:
        import gguf

        try:
            data = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
            self.reader.release(t.data)
        except NotImplementedError as exc:
            raise ModelLoadError(f"{self.path}: tensor {name!r} uses quantization "
                                 f"{t.tensor_type.name}, which the gguf package cannot "
                                 "dequantize") from exc
        # numpy dims are reversed GGUF dims: (rows, cols) like torch's Linear weight.
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))


def _unpermute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's converter, which interleaves the two rotary halves of each head."""
    rows = w.shape[0]
    return (w.reshape(heads, rows // heads // 2, 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape))
