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
                        # whole 32-value blocks: W_UK / W_UV run on Q8_0 blocks
                        kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                        v_head_dim=32,
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


GGUF_ARCH = {"qwen3": "qwen3", "qwen3_moe": "qwen3moe", "deepseek_v2": "deepseek2",
             "deepseek_v3": "deepseek2"}


_TOKENIZER_FIELDS: dict[str, list] = {}


def _tokenizer_fields(default_gguf: Path) -> list:
    """The default model's ``tokenizer.*`` metadata (read once: the gguf package's reader
    takes seconds over a 49k-token vocabulary)."""
    import gguf

    key = str(default_gguf)
    if key not in _TOKENIZER_FIELDS:
        src = gguf.GGUFReader(key)
        _TOKENIZER_FIELDS[key] = [
            (f.name, f.contents(), f.types[0],
             f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
            for f in src.fields.values() if f.name.startswith("tokenizer.")]
    return _TOKENIZER_FIELDS[key]


def write_gguf(model, arch: str, path: Path, default_gguf: Path, qtype: int = 0) -> Path:
    """The same weights as a GGUF file, named and laid out as llama.cpp's converter
    writes them (deepseek2: kv_b split into attn_k_b, transposed, and attn_v_b; MoE
    experts as 3-D ``*_exps``). Projections whose rows hold whole blocks of 32 are
    written in ``qtype`` (0 = F32, 8 = Q8_0, 2 = Q4_0), everything else in F32; the
    tokenizer is copied from the default model's file."""
    import gguf
    import numpy as np

    cfg = model.config
    a = GGUF_ARCH[arch]
    w = gguf.GGUFWriter(str(path), a)
    for name, value, vtype, sub in _tokenizer_fields(default_gguf):
        w.add_key_value(name, value, vtype, sub_type=sub)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    moe = arch in ("qwen3_moe", "deepseek_v2", "deepseek_v3")
    if moe:
        experts = getattr(cfg, "num_experts", None) or cfg.n_routed_experts
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if a.startswith("qwen3"):
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    else:
        w.add_head_count_kv(1)
        w.add_leading_dense_block_count(cfg.first_k_dense_replace)
        if cfg.q_lora_rank:
            w.add_q_lora_rank(cfg.q_lora_rank)
        w.add_kv_lora_rank(cfg.kv_lora_rank)
        w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.kv_lora_rank)
        w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        w.add_value_length_mla(cfg.v_head_dim)
        w.add_rope_dimension_count(cfg.qk_rope_head_dim)
        w.add_expert_shared_count(cfg.n_shared_experts)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        if cfg.norm_topk_prob:
            w.add_expert_weights_norm(True)
        if arch == "deepseek_v3":
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
            w.add_expert_group_count(cfg.n_group)
            w.add_expert_group_used_count(cfg.topk_group)
        rope = cfg.rope_parameters
        if rope.get("rope_type") == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rope["factor"])
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])

    def put(name: str, t: torch.Tensor, quantize: bool = True) -> None:
        arr = t.detach().float().contiguous().numpy()
        if quantize and qtype and arr.ndim >= 2 and arr.shape[-1] % 32 == 0:
            qt = gguf.GGMLQuantizationType(qtype)
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, arr.astype(np.float32))

    sd = model.state_dict()
    put("token_embd.weight", sd["model.embed_tokens.weight"], quantize=False)
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])
    h = cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        at = p + "self_attn."
        put(b + "attn_output.weight", sd[at + "o_proj.weight"])
        if a.startswith("qwen3"):
            for x in "qkv":
                put(b + f"attn_{x}.weight", sd[at + f"{x}_proj.weight"])
            put(b + "attn_q_norm.weight", sd[at + "q_norm.weight"])
            put(b + "attn_k_norm.weight", sd[at + "k_norm.weight"])
        else:
            if cfg.q_lora_rank:
                put(b + "attn_q_a.weight", sd[at + "q_a_proj.weight"])
                put(b + "attn_q_a_norm.weight", sd[at + "q_a_layernorm.weight"])
                put(b + "attn_q_b.weight", sd[at + "q_b_proj.weight"])
            else:
                put(b + "attn_q.weight", sd[at + "q_proj.weight"])
            put(b + "attn_kv_a_mqa.weight", sd[at + "kv_a_proj_with_mqa.weight"])
            put(b + "attn_kv_a_norm.weight", sd[at + "kv_a_layernorm.weight"])
            kv_b = sd[at + "kv_b_proj.weight"].view(h, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
            k_b, v_b = kv_b.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            put(b + "attn_k_b.weight", k_b.transpose(1, 2))
            put(b + "attn_v_b.weight", v_b)
        mp = p + "mlp."
        if mp + "gate.weight" in sd:
            put(b + "ffn_gate_inp.weight", sd[mp + "gate.weight"], quantize=False)
            if mp + "gate.e_score_correction_bias" in sd:
                put(b + "exp_probs_b.bias", sd[mp + "gate.e_score_correction_bias"])
            gate, up = sd[mp + "experts.gate_up_proj"].chunk(2, dim=1)  # [E, 2I, H] in memory
            put(b + "ffn_gate_exps.weight", gate)
            put(b + "ffn_up_exps.weight", up)
            put(b + "ffn_down_exps.weight", sd[mp + "experts.down_proj"])
            if mp + "shared_experts.gate_proj.weight" in sd:
                for part in ("gate", "up", "down"):
                    put(b + f"ffn_{part}_shexp.weight",
                        sd[mp + f"shared_experts.{part}_proj.weight"])
        else:
            for part in ("gate", "up", "down"):
                put(b + f"ffn_{part}.weight", sd[mp + f"{part}_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
