"""Read a GGUF file: architecture metadata and dequantized tensors under HF names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepserve.errors import ModelLoadError
from deepserve.loader.gguf_file import GGUFFile
from deepserve.models.config import SUPPORTED_ARCHITECTURES, ModelConfig

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
}
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
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{path}: GGUF architecture {self.arch!r} is not supported; deepserve runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} models")
        self._tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default: Any = None) -> Any:
        return self.reader.fields.get(key, default)

    def model_config(self) -> ModelConfig:
        a = self.arch

        def need(key: str) -> Any:
            value = self.field(f"{a}.{key}")
            if value is None:
                raise ModelLoadError(f"{self.path}: GGUF metadata lacks {a}.{key}, which a "
                                     f"{a} model needs")
            return value

        heads = int(need("attention.head_count"))
        hidden = int(need("embedding_length"))
        vocab = self.field(f"{a}.vocab_size")
        if vocab is None:
            vocab = len(self.field("tokenizer.ggml.tokens", []))
        scaling = None
        if self.field(f"{a}.rope.scaling.type") not in (None, "none"):
            scaling = {"rope_type": self.field(f"{a}.rope.scaling.type"),
                       "factor": float(self.field(f"{a}.rope.scaling.factor", 1.0))}
        return ModelConfig(
            architecture=a,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=heads,
            num_kv_heads=int(self.field(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(self.field(f"{a}.attention.key_length", hidden // heads)),
            rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(self.field(f"{a}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in self._tensors,
            attention_bias="blk.0.attn_q.bias" in self._tensors,
        )

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

    def block_plan(self, config: ModelConfig) -> dict[str, tuple[int | None, list[str]]]:
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
        for i in range(config.num_layers):
            p = f"blk.{i}."
            groups[f"layers.{i}.qkv_proj"] = [p + "attn_q.weight", p + "attn_k.weight",
                                              p + "attn_v.weight"]
            groups[f"layers.{i}.o_proj"] = [p + "attn_output.weight"]
            groups[f"layers.{i}.gate_up_proj"] = [p + "ffn_gate.weight", p + "ffn_up.weight"]
            groups[f"layers.{i}.down_proj"] = [p + "ffn_down.weight"]
        plan = {}
        for module, names in groups.items():
            if not all(n in self._tensors for n in names):
                continue
            types = [self.tensor_type(n) for n in names]
            if module == "embed_tokens":
                # Q6_K too: K-quant files of tied models keep their table (and head) in it
                if types[0] in BLOCK_TYPES or types[0] == 14:
                    plan[module] = (types[0], names)
            elif all(t in BLOCK_TYPES or (t in K_TYPES and not (t in _EIGHTS and self.rows(n) % 8))
                     for t, n in zip(types, names, strict=True)):
                plan[module] = (types[0] if len(set(types)) == 1 else None, names)
        return plan

    def rows(self, name: str) -> int:
        """A tensor's rows (its output features, for a projection)."""
        return int(self._tensors[name].data.shape[0])

    def tensor_type(self, name: str) -> int:
        """A tensor's GGUF type id (2 for Q4_0, 12 for Q4_K, ...)."""
        return int(self._tensors[name].tensor_type)

    def blocks(self, name: str, config: ModelConfig) -> torch.Tensor:
        """One tensor's rows as the file stores them: [rows, bytes per row] uint8 (llama's
        q/k rows put back in rotary order: a row permutation, so blocks stay whole)."""
        t = self._tensors[name]
        data = torch.from_numpy(np.array(t.data, dtype=np.uint8, copy=True))
        if self.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_heads if "attn_q" in name else config.num_kv_heads
            data = _unpermute_rotary(data, heads).contiguous()
        return data

    def tensors(self, config: ModelConfig, skip: frozenset[str] = frozenset()
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, float32 tensor) for every tensor not in ``skip``, dequantized."""
        import gguf

        for name, t in self._tensors.items():
            if name in skip:
                continue
            hf = self.hf_name(name)
            if hf is None:
                if name.startswith("rope_freqs"):
                    continue
                raise ModelLoadError(f"{self.path}: tensor {name!r} has no place in a "
                                     f"{self.arch} model (expected one of the standard "
                                     "GGUF llama/qwen2 tensor names)")
            try:
                data = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
            except NotImplementedError as exc:
                raise ModelLoadError(f"{self.path}: tensor {name!r} uses quantization "
                                     f"{t.tensor_type.name}, which the gguf package cannot "
                                     "dequantize") from exc
            # numpy dims are reversed GGUF dims: (rows, cols) like torch's Linear weight.
            tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
            if self.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = config.num_heads if "attn_q" in name else config.num_kv_heads
                tensor = _unpermute_rotary(tensor, heads)
            yield hf, tensor


def _unpermute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's converter, which interleaves the two rotary halves of each head."""
    rows = w.shape[0]
    return (w.reshape(heads, rows // heads // 2, 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape))
