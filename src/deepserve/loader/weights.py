"""Build a model and fill it from a checkpoint, mapping HF tensor names onto parameters."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from deepserve.errors import ModelLoadError
from deepserve.layers import kquants
from deepserve.layers.gguf_linear import GGUFEmbedding, GGUFLinear, GGUFParts
from deepserve.layers.rotary import RotaryEmbedding
from deepserve.loader.gguf_loader import K_TYPES, GGUFCheckpoint
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
               show_progress: bool = True, keep_blocks: bool = False) -> LlamaForCausalLM:
    """Create the module on ``device`` in ``dtype`` and copy every checkpoint tensor in.

    ``keep_blocks``: a GGUF's Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K projections (and an
    embedding table in one of the first three) keep the file's blocks (``GGUFLinear``;
    K-quants rewritten exactly), and are never materialized in ``dtype``."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions, dtype)
    plan = ckpt.block_plan(cfg) if keep_blocks and isinstance(ckpt, GGUFCheckpoint) else {}
    for path in plan:  # placeholders: nothing is allocated for them
        _set_module(model, path, nn.Identity())
    # torch.empty per tensor, not Module.to_empty: empty_like on meta tensors imports
    # torch's symbolic-shape stack (sympy), 0.4 s of every start.
    model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    model = model.to(dtype)
    # Buffers were created on meta; build the rotary tables for real.
    model.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta,
                                   cfg.rope_scaling, dtype).to(device)
    if cfg.tie_word_embeddings and "lm_head" not in plan:
        model.lm_head.weight = model.embed_tokens.weight
    skip = _install_blocks(model, ckpt, cfg, plan, dtype) if plan else frozenset()

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

    tensors = ckpt.tensors(cfg, skip) if skip else ckpt.tensors(cfg)
    bar = tqdm(tensors, total=len(ckpt) - len(skip), desc="loading weights", unit="tensor",
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


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _install_blocks(model: LlamaForCausalLM, ckpt: GGUFCheckpoint, cfg: ModelConfig,
                    plan: dict[str, tuple[int | None, list[str]]], dtype: torch.dtype
                    ) -> frozenset[str]:
    """Put GGUF-block layers where ``plan`` says; returns the GGUF tensors they took."""
    shared: dict[str, torch.Tensor] = {}

    def kept(name: str, qtype: int, k: int) -> torch.Tensor:
        raw = ckpt.blocks(name, cfg)  # K-quants rewritten exactly into blocks of 32
        return kquants.keep(raw, qtype, k) if qtype in K_TYPES else raw

    for path, (qtype, names) in plan.items():
        k = cfg.hidden_size
        if path.endswith("o_proj"):
            k = cfg.num_heads * cfg.head_dim
        elif path.endswith("down_proj"):
            k = cfg.intermediate_size
        bias = (torch.zeros(sum(ckpt.rows(n) for n in names)) if path.endswith("qkv_proj")
                and cfg.attention_bias else None)
        if qtype is None:  # parts of different types: one block layer each
            layer: nn.Module = GGUFParts(
                [GGUFLinear(kept(n, ckpt.tensor_type(n), k), ckpt.tensor_type(n), k)
                 for n in names], bias)
        elif names == ["token_embd.weight"] and "token_embd.weight" in shared:
            layer = GGUFLinear(shared["token_embd.weight"], qtype, k, bias)
        else:
            parts = [kept(n, qtype, k) for n in names]
            blocks = parts[0] if len(parts) == 1 else torch.cat(parts)
            if names == ["token_embd.weight"]:
                shared["token_embd.weight"] = blocks
            if path == "embed_tokens":
                layer = GGUFEmbedding(blocks, qtype, cfg.hidden_size, dtype)
            else:
                layer = GGUFLinear(blocks, qtype, k, bias)
        _set_module(model, path, layer)
    return frozenset(n for _, names in plan.values() for n in names)


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
