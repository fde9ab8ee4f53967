"""Build a model and fill it from a checkpoint, mapping HF tensor names onto parameters."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from deepserve.errors import ModelLoadError
from deepserve.layers import kquants
from deepserve.layers.gguf_linear import (
    BLOCK_BYTES,
    HEADS,
    NAMES,
    Q4_0,
    Q4_1,
    QK,
    UNIT,
    X8,
    GGUFEmbedding,
    GGUFLinear,
    GGUFParts,
    interleave_into,
)
from deepserve.layers.rotary import RotaryEmbedding
from deepserve.loader.gguf_loader import K_TYPES, GGUFCheckpoint
from deepserve.loader.hf_loader import HFCheckpoint
from deepserve.models.config import ModelConfig
from deepserve.models.llama import LlamaForCausalLM
from deepserve.models.parallel import ExpertShard, Shard, Stage, StageShard

logger = logging.getLogger(__name__)

# HF per-layer name -> (our parameter, row slice role) for fused projections.
_FUSED = {
    "self_attn.q_proj": ("qkv_proj", 0),
    "self_attn.k_proj": ("qkv_proj", 1),
    "self_attn.v_proj": ("qkv_proj", 2),
    "mlp.gate_proj": ("gate_up_proj", 0),
    "mlp.up_proj": ("gate_up_proj", 1),
    "mlp.shared_experts.gate_proj": ("moe.shared.gate_up_proj", 0),
    "mlp.shared_experts.up_proj": ("moe.shared.gate_up_proj", 1),
}
_PLAIN = {
    "self_attn.o_proj.weight": "o_proj.weight",
    "mlp.down_proj.weight": "down_proj.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attn.q_norm.weight": "q_norm.weight",
    "self_attn.k_norm.weight": "k_norm.weight",
    "mlp.gate.weight": "moe.gate",
    "mlp.gate.e_score_correction_bias": "moe.correction_bias",
    "mlp.shared_experts.down_proj.weight": "moe.shared.down_proj.weight",
    "mlp.experts.down_proj": "moe.experts.down",  # fused [E, H, I] (transformers 5)
    # Multi-head Latent Attention (DeepSeek)
    "self_attn.q_a_proj.weight": "q_a_proj.weight",
    "self_attn.q_a_layernorm.weight": "q_a_layernorm.weight",
    "self_attn.q_b_proj.weight": "q_b_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "kv_a_proj_with_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "kv_a_layernorm.weight",
    "self_attn.kv_b_proj.weight": "kv_b_proj",
}
_MLA_Q = {"self_attn.q_proj.weight": "q_proj.weight"}
# rows reordered for the rotary layout (models/deepseek.rope_row_order)
_ROPE_ROWS = {"q_proj.weight": "q", "q_b_proj.weight": "q", "kv_a_proj_with_mqa.weight": "kv_a"}
# row-parallel under tensor parallelism: each rank takes its input columns
_ROW_PARALLEL = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
# experts bigger than this run as mapped at first, the kernels' layout written after the
# load (the copy is about a third of a second per GB, page faults included)
MAPPED_EXPERTS_OVER = 1 << 30
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def open_checkpoint(path: Path, kind: str) -> GGUFCheckpoint | HFCheckpoint:
    return GGUFCheckpoint(path) if kind == "gguf" else HFCheckpoint(path)


def load_model(ckpt: GGUFCheckpoint | HFCheckpoint, cfg: ModelConfig, max_positions: int,
               dtype: torch.dtype, device: torch.device,
               show_progress: bool = True, keep_blocks: bool = False,
               shard: Shard | Stage | ExpertShard | None = None,
               interleave: bool = False, expert_layout: str = "load") -> LlamaForCausalLM:
    """Create the module on ``device`` in ``dtype`` and copy every checkpoint tensor in.

    ``keep_blocks``: a GGUF's Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K projections and experts
    (and an embedding table in one of the first three) keep the file's blocks
    (``GGUFLinear``, ``moe.Experts``; K-quants rewritten exactly), and are never
    materialized in ``dtype``.

    ``shard``: build this tensor-parallel rank's part (``cfg`` is then its local
    configuration): its heads' rows of Q/K/V, its rows of gate/up, its input columns of
    the output projection and down; GGUF blocks are cut at block boundaries. A pipeline
    ``Stage`` builds its range of layers alone (``cfg``: that many layers); an
    ``ExpertShard`` every layer, with only its routed experts (``cfg.local_experts``).

    ``interleave``: the SIMD kernels will run the blocks (``setup.interleave_blocks``);
    4-bit experts then go from the mapped file to that order in one copy, at load or (one
    process alone) in the background (``expert_layout``: load | background | auto)."""
    from deepserve.layers.moe import Experts, SparseMoE
    from deepserve.models.deepseek import rope_row_order

    with torch.device("meta"), _no_init():
        model = LlamaForCausalLM(cfg, max_positions, dtype)
    file_cfg = shard.full if shard is not None else cfg  # the checkpoint's own shapes
    first = shard.first if shard is not None else 0  # a pipeline stage's first layer
    layers = range(first, first + cfg.num_layers)
    plan = ckpt.block_plan(cfg, first) if keep_blocks and isinstance(ckpt, GGUFCheckpoint) \
        else {}
    tp = shard if isinstance(shard, Shard) else None
    lo, hi = cfg.local_experts or (0, cfg.num_experts)  # expert parallelism
    in_features = {path: getattr(model.get_submodule(path), "in_features", None)
                   for path in plan}
    for path in plan:  # placeholders: nothing is allocated for them
        module = model.get_submodule(path)
        if isinstance(module, Experts):
            module.drop_dense()
        else:
            _set_module(model, path, nn.Identity())
    # torch.empty per tensor, not Module.to_empty: empty_like on meta tensors imports
    # torch's symbolic-shape stack (sympy), 0.4 s of every start.
    model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    model = model.to(dtype)
    for module in model.modules():  # routers stay in float32, as the references keep them
        if isinstance(module, SparseMoE):
            module.gate.data = module.gate.data.float()
            if module.correction_bias is not None:
                module.correction_bias.data = module.correction_bias.data.float()
    # Buffers were created on meta; build the rotary tables for real.
    model.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta,
                                   cfg.rope_scaling, dtype).to(device)
    if cfg.tie_word_embeddings and "lm_head" not in plan:
        model.lm_head.weight = model.embed_tokens.weight
    skip = _install_blocks(model, ckpt, cfg, plan, dtype, in_features, tp, first, interleave,
                           expert_layout if shard is None else "load") if plan else frozenset()

    params = dict(model.named_parameters(remove_duplicate=False))
    # what has been filled: per parameter, its leading dims (rows; experts x rows)
    # (each tensor once: a tied head is filled with the embedding)
    filled = {name: torch.zeros(p.shape[:max(1, p.dim() - 1)], dtype=torch.bool)
              for name, p in model.named_parameters() if not name.startswith("rotary")}
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    source = str(ckpt.path)
    orders = {k: rope_row_order(cfg, k) for k in ("q", "kv_a")}
    skipped: set[int] = set()

    def copy(target: str, tensor: torch.Tensor, index: tuple, name: str) -> None:
        if target not in params:
            raise ModelLoadError(f"{source}: tensor {name!r} maps to {target!r}, which this "
                                 f"{cfg.architecture} model does not have")
        dest = params[target].data[index]
        shape = tuple(tensor.shape)
        if shape != tuple(dest.shape) and tensor.dim() == 3 and \
                shape == (dest.shape[0], dest.shape[2], dest.shape[1]):
            tensor = tensor.transpose(1, 2)  # fused experts stored [E, in, out]
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ModelLoadError(f"{source}: tensor {name!r} has shape {shape}, expected "
                                 f"{tuple(dest.shape)} for {target} of {cfg.architecture} "
                                 f"with hidden={cfg.hidden_size}, heads={cfg.num_heads}, "
                                 f"kv_heads={cfg.num_kv_heads}, experts={cfg.num_experts}")
        kind = _ROPE_ROWS.get(target.split(".", 2)[-1] if target.startswith("layers.")
                              else target)
        if kind and orders[kind] is not None:
            tensor = tensor[orders[kind]]
        with torch.no_grad():
            dest.copy_(tensor)
        if target in filled:
            filled[target][index] = True

    # a pipeline stage reads its own layers' tensors only
    tensors = ckpt.tensors(file_cfg, skip,
                           layers if isinstance(shard, Stage | StageShard) else None)
    bar = tqdm(tensors, total=len(ckpt) - len(skip), desc="loading weights", unit="tensor",
               disable=not show_progress, leave=False)
    for name, tensor in bar:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name.startswith("model.layers."):
            _, _, idx, rest = name.split(".", 3)
            if int(idx) >= file_cfg.num_layers:  # multi-token-prediction layers
                skipped.add(int(idx))
                continue
            if int(idx) not in layers:  # another pipeline stage's layer
                continue
            prefix = f"layers.{int(idx) - first}."
            base, _, kind = rest.rpartition(".")
            expert = _EXPERT.fullmatch(rest)
            if cfg.is_mla and rest in _MLA_Q:
                copy(prefix + _MLA_Q[rest], tensor, (), name)
            elif base in _FUSED:
                fused, part = _FUSED[base]
                if fused == "qkv_proj":
                    bounds = [0, q, q + kv, q + 2 * kv]
                else:
                    half = params.get(f"{prefix}{fused}.{kind}", tensor).shape[0] // 2
                    bounds = [0, half, 2 * half]
                if tp is not None and not fused.startswith("moe."):  # (shared experts:
                    tensor = tp.rows(tensor, bounds[part + 1] - bounds[part])  # whole)
                copy(f"{prefix}{fused}.{kind}", tensor,
                     (slice(bounds[part], bounds[part + 1]),), name)
            elif expert:
                e, which = int(expert.group(1)) - lo, expert.group(2)
                if not 0 <= e < hi - lo:  # another expert-parallel rank's expert
                    continue
                inter = cfg.moe_intermediate_size
                if which == "down":
                    copy(prefix + "moe.experts.down", tensor, (e,), name)
                else:
                    rows = slice(0, inter) if which == "gate" else slice(inter, 2 * inter)
                    copy(prefix + "moe.experts.gate_up", tensor, (e, rows), name)
            elif rest in ("mlp.experts.gate_up_proj", "mlp.experts.gate_proj",
                          "mlp.experts.up_proj"):
                inter = cfg.moe_intermediate_size
                rows = {"mlp.experts.gate_up_proj": slice(0, 2 * inter),
                        "mlp.experts.gate_proj": slice(0, inter),
                        "mlp.experts.up_proj": slice(inter, 2 * inter)}[rest]
                copy(prefix + "moe.experts.gate_up", tensor[lo:hi], (slice(None), rows), name)
            elif rest in _PLAIN:
                if rest == "mlp.experts.down_proj":  # fused [E, H, I]: this rank's experts
                    tensor = tensor[lo:hi]
                if tp is not None and rest in _ROW_PARALLEL:
                    tensor = tp.cols(tensor, q if rest.startswith("self_attn") else
                                     cfg.intermediate_size)
                copy(prefix + _PLAIN[rest], tensor, (), name)
            else:
                raise ModelLoadError(f"{source}: tensor {name!r} is not part of a "
                                     f"{cfg.architecture} decoder layer")
        elif name.startswith("model."):
            copy(name[len("model."):], tensor, (), name)
        else:
            copy(name, tensor, (), name)

    if skipped:
        logger.info("%s: skipped %d multi-token-prediction layer(s) (%s): deepserve "
                    "decodes one token a step", source, len(skipped),
                    ", ".join(f"model.layers.{i}" for i in sorted(skipped)))
    missing = sorted(n for n, m in filled.items() if not bool(m.all()))
    if missing:
        raise ModelLoadError(f"{source}: checkpoint lacks {len(missing)} tensor(s) the "
                             f"{cfg.architecture} model needs, e.g. {missing[:3]}")
    for layer in model.layers:
        if hasattr(layer, "absorb"):  # MLA: kv_b_proj -> W_UK, W_UV^T
            layer.absorb()
    model.eval()
    return model


_init_lock = threading.Lock()


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Layers built on the meta device skip their random initialization (every value is
    loaded): the init calls cost 0.1 s a start through torch's device dispatch."""
    with _init_lock:
        saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
        nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
        try:
            yield
        finally:
            nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _interleaved(ckpt: GGUFCheckpoint, names: list[str], qtype: int, k: int,
                 cfg: ModelConfig) -> torch.Tensor:
    """The tensors ``names`` (each a multiple of 8 rows) one after another in the kernels'
    interleaved order (``gguf_linear.interleave``), read from the mapped file."""
    views = [ckpt.blocks(n, cfg, copy=False) for n in names]
    out = torch.empty(sum(v.shape[0] for v in views), views[0].shape[1], dtype=torch.uint8)
    at = 0
    for name, v in zip(names, views, strict=True):
        interleave_into(v.unsqueeze(0), out[at:at + v.shape[0]].unsqueeze(0), qtype, k)
        at += v.shape[0]
        ckpt.release(name)
    return out


def _install_blocks(model: LlamaForCausalLM, ckpt: GGUFCheckpoint, cfg: ModelConfig,
                    plan: dict[str, tuple[int | None, list[str]]], dtype: torch.dtype,
                    in_features: dict[str, int | None], shard: Shard | None = None,
                    first: int = 0, interleave: bool = False,
                    expert_layout: str = "load") -> frozenset[str]:
    """Put GGUF-block layers where ``plan`` says; returns the GGUF tensors they took.
    With ``shard``, each layer keeps this rank's rows or input columns of the blocks.
    ``interleave``: experts are written straight into the kernels' interleaved order, at
    load or (``expert_layout`` "background", or "auto" past ``MAPPED_EXPERTS_OVER`` bytes)
    after it: until then they run as mapped (``engine.layout``)."""
    shared: dict[str, torch.Tensor] = {}
    file_cfg = shard.full if shard is not None else cfg  # (``first``: a pipeline stage's)
    experts = [n for p, (_, ns) in plan.items() if p.endswith(".moe.experts") for n in ns]
    mapped = expert_layout == "background" or (
        expert_layout == "auto" and
        sum(ckpt.view(n).nbytes for n in experts) > MAPPED_EXPERTS_OVER)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    local_rows = {"qkv_proj": (q, kv, kv), "gate_up_proj": (cfg.intermediate_size,) * 2}

    def kept(name: str, qtype: int, k: int, path: str = "", part: int = 0) -> torch.Tensor:
        split = path.rpartition(".")[2] if shard is not None and ".moe." not in path else ""
        k_file = k * shard.size if split in ("o_proj", "down_proj") else k
        raw = ckpt.blocks(name, file_cfg)  # K-quants rewritten exactly into blocks of 32
        raw = kquants.keep(raw, qtype, k_file) if qtype in K_TYPES else raw
        if split in local_rows:
            return shard.rows(raw, local_rows[split][part]).contiguous()
        if split in ("o_proj", "down_proj"):
            if k % UNIT.get(qtype, QK):
                raise ModelLoadError(f"{ckpt.path}: {name} is in {NAMES[qtype]} blocks of "
                                     f"{UNIT.get(qtype, QK)} weights, and {shard.size} "
                                     f"ranks would cut them ({k} columns each); pick "
                                     "another --tensor-parallel-size")
            return shard.cols(raw, k // QK, BLOCK_BYTES[qtype])
        return raw

    for path, (qtype, names) in plan.items():
        if path.endswith(".moe.experts"):  # [gate, up, down] of every expert
            # read straight from the mapped file: the gate/up concatenation (or the K-quant
            # rewrite) is the one copy made; 90% of an MoE file's bytes are here
            lo, hi = cfg.local_experts or (0, cfg.num_experts)  # this rank's experts
            gate, up, down = (ckpt.view(n)[lo:hi] for n in names)
            h, inter = cfg.hidden_size, cfg.moe_intermediate_size
            gtype, dtype_ = ckpt.tensor_type(names[0]), ckpt.tensor_type(names[2])

            def keep3(raw: torch.Tensor, t: int, k: int) -> torch.Tensor:
                if t not in K_TYPES:
                    return raw
                # K-quants rewritten exactly, over every expert's rows at once
                flat = kquants.keep(raw.reshape(-1, raw.shape[-1]).clone(), t, k)
                return flat.reshape(raw.shape[0], raw.shape[1], -1)

            direct = interleave and gtype in HEADS and dtype_ in HEADS and \
                not {gtype, dtype_} & set(K_TYPES) and inter % 8 == 0 and h % 8 == 0
            if direct and mapped:
                # run as mapped; the kernels' order is written beside the serving
                model.get_submodule(path).to_blocks(
                    gate, gtype, down, dtype_, up=up,
                    release=lambda names=names: [ckpt.release(n) for n in names])
                continue
            if direct:
                # the kernels' order written straight from the file: one pass, one copy
                gate_up = torch.empty(hi - lo, 2 * inter, gate.shape[2], dtype=torch.uint8)
                interleave_into(gate, gate_up[:, :inter], gtype, h)
                interleave_into(up, gate_up[:, inter:], gtype, h)
                down_kept = torch.empty(down.shape, dtype=torch.uint8)
                interleave_into(down, down_kept, dtype_, inter)
            else:
                gate_up = torch.cat([keep3(gate, gtype, h), keep3(up, gtype, h)], dim=1)
                down_kept = keep3(down, dtype_, inter)
                if down_kept is down:
                    down_kept = down.clone()
            for n in names:
                ckpt.release(n)
            model.get_submodule(path).to_blocks(gate_up, gtype, down_kept, dtype_,
                                                interleaved=direct)
            continue
        k = in_features.get(path) or cfg.hidden_size
        bias = (torch.zeros(q + 2 * kv) if path.endswith("qkv_proj")
                and cfg.attention_bias else None)
        if qtype is None:  # parts of different types: one block layer each
            layer: nn.Module = GGUFParts(
                [GGUFLinear(kept(n, ckpt.tensor_type(n), k, path, i), ckpt.tensor_type(n), k)
                 for i, n in enumerate(names)], bias)
        elif names == ["token_embd.weight"] and "token_embd.weight" in shared:
            layer = GGUFLinear(shared["token_embd.weight"], qtype, k, bias)
        elif interleave and shard is None and qtype in (Q4_0, Q4_1) and \
                names != ["token_embd.weight"] and \
                all(ckpt.view(n).shape[0] % 8 == 0 for n in names):
            # the kernels' order written straight from the mapped file, part by part into
            # its rows: one copy (a copy, a concatenation and an interleave took three)
            layer = GGUFLinear(_interleaved(ckpt, names, qtype, k, file_cfg), qtype, k, bias)
            layer.kernel_qtype = qtype + X8
        else:
            parts = [kept(n, qtype, k, path, i) for i, n in enumerate(names)]
            blocks = parts[0] if len(parts) == 1 else torch.cat(parts)
            if names == ["token_embd.weight"]:
                shared["token_embd.weight"] = blocks
            if path == "embed_tokens":
                layer = GGUFEmbedding(blocks, qtype, cfg.hidden_size, dtype)
            else:
                layer = GGUFLinear(blocks, qtype, k, bias)
        _set_module(model, path, layer)
    return frozenset(n for _, names in plan.values() for n in names)
