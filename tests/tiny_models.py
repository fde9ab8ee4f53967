"""Tiny random checkpoints of the newer architectures, written by transformers itself
(float32), with the default model's tokenizer: Qwen3, Qwen3-MoE, DeepSeek-V2 and
DeepSeek-V3 (MLA + MoE), plus a GGUF file of the same weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=512, tie_word_embeddings=False)

CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3": dict(COMMON, num_key_value_heads=2, head_dim=32, intermediate_size=128,
                  rope_theta=1000000.0),
    "qwen3_moe": dict(COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                      moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1]),
    "deepseek_v2": dict(COMMON, num_key_value_heads=4, intermediate_size=128,
                        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=2, first_k_dense_replace=1,
                        topk_method="group_limited_greedy", n_group=2, topk_group=1,
                        norm_topk_prob=False, routed_scaling_factor=1.0, q_lora_rank=None,
                        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                        v_head_dim=24),
    "deepseek_v3": dict(COMMON, num_key_value_heads=4, intermediate_size=128,
                        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                        norm_topk_prob=True, routed_scaling_factor=2.5, q_lora_rank=48,
                        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                        v_head_dim=24,
                        rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 128,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                      "mscale_all_dim": 1.0, "rope_theta": 10000.0}),
}
CLASSES = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
           "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
           "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
           "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM")}


def write_tiny(path: Path, arch: str, default_gguf: Path, seed: int = 0):
    """Save a random model of ``arch``; returns the transformers model (float32)."""
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    conf_cls, model_cls = (getattr(transformers, n) for n in CLASSES[arch])
    kw = dict(CONFIGS[arch])
    scaling = kw.pop("rope_scaling", None)
    cfg = conf_cls(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                   eos_token_id=tok.eos_token_id, **kw)
    if scaling:
        cfg.rope_parameters = dict(scaling)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand_like(b) * 0.5)  # moves the choice, not the weights
    model.eval()
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return model


def greedy(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()
