"""Build a model and fill it from a checkpoint, mapping HF tensor names onto parameters."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from deepserve.errors import ModelLoadError
from deepserve.layers.rotary import RotaryEmbedding
from deepserve.loader.gguf_loader import GGUFCheckpoint
from deepserve.loader.hf_loader import HFCheckpoint
from deepserve.models.config import ModelConfig
from deepserve.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

# HF per-layer name -> (our parameter, row slice role) for fused projections.
_FUSED = {
    "self_attn.q_proj": ("qkv_proj", 0),
    "self_attn.k_proj": ("qkv_proj", 1),
    "self_attn.v_proj": ("qkv_proj", 2),
    "mlp.gate_proj": ("gate_up_proj", 0),
    "mlp.up_proj": ("gate_up_proj", 1),
}
_PLAIN = {
    "self_attn.o_proj.weight": "o_proj.weight",
    "mlp.down_proj.weight": "down_proj.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
}


def open_checkpoint(path: Path, kind: str) -> GGUFCheckpoint | HFCheckpoint:
    return GGUFCheckpoint(path) if kind == "gguf" else HFCheckpoint(path)


def load_model(ckpt: GGUFCheckpoint | HFCheckpoint, cfg: ModelConfig, max_positions: int,
               dtype: torch.dtype, device: torch.device,
               show_progress: bool = True) -> LlamaForCausalLM:
    """Create the module on ``device`` in ``dtype`` and copy every checkpoint tensor in."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions, dtype)
    model = model.to_empty(device=device).to(dtype)
    # Buffers were created on meta; build the rotary tables for real.
    model.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta,
                                   cfg.rope_scaling, dtype).to(device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight

    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[str] = set()
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, \
        cfg.intermediate_size
    fused_rows = {"qkv_proj": [0, q, q + kv, q + 2 * kv], "gate_up_proj": [0, inter, 2 * inter]}
    source = str(ckpt.path)

    def copy(target: str, tensor: torch.Tensor, rows: tuple[int, int] | None, name: str) -> None:
        if target not in params:
            raise ModelLoadError(f"{source}: tensor {name!r} maps to {target!r}, which this "
                                 f"{cfg.architecture} model does not have")
        dest = params[target].data
        if rows is not None:
            dest = dest[rows[0]:rows[1]]
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ModelLoadError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)} for {cfg.architecture} with "
                                 f"hidden={cfg.hidden_size}, heads={cfg.num_heads}, "
                                 f"kv_heads={cfg.num_kv_heads}")
        with torch.no_grad():
            dest.copy_(tensor.to(dtype))
        filled.add(target if rows is None else f"{target}[{rows[0]}:{rows[1]}]")

    bar = tqdm(ckpt.tensors(cfg), total=len(ckpt), desc="loading weights", unit="tensor",
               disable=not show_progress, leave=False)
    for name, tensor in bar:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name.startswith("model.layers."):
            _, _, idx, rest = name.split(".", 3)
            prefix = f"layers.{idx}."
            base, _, kind = rest.rpartition(".")
            if base in _FUSED:
                fused, part = _FUSED[base]
                bounds = fused_rows[fused]
                target = f"{prefix}{fused}.{kind}"
                copy(target, tensor, (bounds[part], bounds[part + 1]), name)
            elif rest in _PLAIN:
                copy(prefix + _PLAIN[rest], tensor, None, name)
            else:
                raise ModelLoadError(f"{source}: tensor {name!r} is not part of a "
                                     f"{cfg.architecture} decoder layer")
        elif name.startswith("model."):
            copy(name[len("model."):], tensor, None, name)
        else:
            copy(name, tensor, None, name)

    expected = _expected_fills(model, cfg, fused_rows)
    missing = sorted(expected - filled)
    if missing:
        raise ModelLoadError(f"{source}: checkpoint lacks {len(missing)} tensor(s) the "
                             f"{cfg.architecture} model needs, e.g. {missing[:3]}")
    model.eval()
    return model


def _expected_fills(model: LlamaForCausalLM, cfg: ModelConfig,
                    fused_rows: dict[str, list[int]]) -> set[str]:
    out: set[str] = set()
    for name, _ in model.named_parameters():
        if name.startswith("rotary"):
            continue
        fused = next((f for f in fused_rows if f".{f}." in name), None)
        if fused:
            b = fused_rows[fused]
            out.update(f"{name}[{b[i]}:{b[i + 1]}]" for i in range(len(b) - 1))
        else:
            out.add(name)
    return out
