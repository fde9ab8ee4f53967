"""The architecture hyper-parameters a model needs, read from config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# HF model_type of each architecture deepserve runs (GGUF names: loader/gguf_loader.py).
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v2", "deepseek_v3")
MOE_ARCHITECTURES = ("qwen3_moe", "deepseek_v2", "deepseek_v3")
MLA_ARCHITECTURES = ("deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer: the Llama family (Llama, Qwen2, Qwen3), with
    mixture-of-experts MLPs (Qwen3-MoE, DeepSeek-V2/V3) and Multi-head Latent Attention
    (DeepSeek-V2/V3). For MLA models ``head_dim`` is the rotary part of a head
    (``qk_rope_head_dim``) and ``num_kv_heads`` is 1: the cache holds one latent vector of
    ``kv_lora_rank + qk_rope_head_dim`` values a token."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each q and k head before rotary
    # mixture of experts (num_experts 0: every layer dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()
    norm_topk_prob: bool = False
    n_shared_experts: int = 0
    scoring_func: str = "softmax"  # or "sigmoid" (DeepSeek-V3, with a correction bias)
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"  # V2: a group's best expert; V3: "top2" (sum of its best two)
    routed_scaling_factor: float = 1.0
    # Multi-head Latent Attention (kv_lora_rank 0: plain attention)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # checkpoint rotates adjacent pairs (rows are reordered)
    skipped_layers: int = 0  # MTP layers in the checkpoint past num_layers, not loaded
    # expert parallelism: the routed experts [lo, hi) this rank holds (None: all)
    local_experts: tuple[int, int] | None = None

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def cache_heads(self) -> int:
        """Heads of the paged KV cache: 1 for MLA (one latent per token)."""
        return 1 if self.is_mla else self.num_kv_heads

    @property
    def cache_dim(self) -> int:
        """Values per cached head: the latent plus the rotary key for MLA."""
        return self.kv_lora_rank + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def full_kv_values(self) -> int:
        """Values per token per layer an uncompressed cache of the same model would hold
        (K and V of every head): what MLA's latent is measured against."""
        if self.is_mla:
            return self.num_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim
                                     + self.v_head_dim)
        return 2 * self.num_kv_heads * self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe_layers

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str) -> ModelConfig:
        """Map a transformers ``config.json`` dict onto a ModelConfig."""
        from deepserve.errors import ModelLoadError

        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: model_type {model_type!r} is not supported; deepserve runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"]
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ModelLoadError(f"{source}: config.json lacks {missing}, which a "
                                 f"{model_type} model needs")
        heads = cfg["num_attention_heads"]
        extra = _moe_fields(cfg, model_type, source) if model_type in MOE_ARCHITECTURES else {}
        if model_type in MLA_ARCHITECTURES:
            extra.update(_mla_fields(cfg, source))
        return cls(
            architecture=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=(1 if model_type in MLA_ARCHITECTURES
                          else cfg.get("num_key_value_heads") or heads),
            head_dim=(extra.get("qk_rope_head_dim") if model_type in MLA_ARCHITECTURES
                      else cfg.get("head_dim") or cfg["hidden_size"] // heads),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(cfg),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            **extra,
        )


def _moe_fields(cfg: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    from deepserve.errors import ModelLoadError

    experts = (cfg.get("num_experts") or cfg.get("n_routed_experts")
               or cfg.get("num_local_experts"))
    need = {"number of experts": experts, "num_experts_per_tok": cfg.get("num_experts_per_tok"),
            "moe_intermediate_size": cfg.get("moe_intermediate_size")}
    missing = [k for k, v in need.items() if not v]
    if missing:
        raise ModelLoadError(f"{source}: config.json lacks {missing}, which a {model_type} "
                             "mixture-of-experts model needs")
    layers = cfg["num_hidden_layers"]
    if model_type == "qwen3_moe":
        step = int(cfg.get("decoder_sparse_step") or 1)
        dense = set(cfg.get("mlp_only_layers") or [])
        moe = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
        return dict(num_experts=int(experts), num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                    moe_intermediate_size=int(cfg["moe_intermediate_size"]), moe_layers=moe,
                    norm_topk_prob=bool(cfg.get("norm_topk_prob", False)))
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    v3 = model_type == "deepseek_v3"
    method = cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    grouped = method in ("group_limited_greedy", "noaux_tc")
    scoring = cfg.get("scoring_func") or ("sigmoid" if v3 else "softmax")
    if scoring not in ("softmax", "sigmoid"):
        raise ModelLoadError(f"{source}: scoring_func {scoring!r} is not supported "
                             "(softmax or sigmoid)")
    n_group = int(cfg.get("n_group") or 1) if grouped else 1
    if experts % n_group:
        raise ModelLoadError(f"{source}: {experts} experts do not split into n_group="
                             f"{n_group} groups")
    return dict(num_experts=int(experts), num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                moe_layers=tuple(range(first_dense, layers)),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                n_shared_experts=int(cfg.get("n_shared_experts") or 0),
                scoring_func=scoring, n_group=n_group,
                topk_group=int(cfg.get("topk_group") or 1) if grouped else 1,
                group_score="top2" if v3 else "max",
                routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0))


def _mla_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    from deepserve.errors import ModelLoadError

    need = ["kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
    missing = [k for k in need if not cfg.get(k)]
    if missing:
        raise ModelLoadError(f"{source}: config.json lacks {missing}, which Multi-head Latent "
                             "Attention needs")
    return dict(q_lora_rank=cfg.get("q_lora_rank") or None,
                kv_lora_rank=int(cfg["kv_lora_rank"]),
                qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
                qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
                v_head_dim=int(cfg["v_head_dim"]),
                # V2's reference rotates adjacent pairs; V3's does unless told otherwise
                rope_interleave=bool(cfg.get("rope_interleave", True)),
                skipped_layers=int(cfg.get("num_nextn_predict_layers") or 0))


def _rope_theta(cfg: dict[str, Any]) -> float:
    # transformers >= 5 nests rope settings under "rope_parameters".
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    return dict(scaling, rope_type=kind)
