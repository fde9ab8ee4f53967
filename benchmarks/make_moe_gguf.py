"""Random-weight GGUF files of mixture-of-experts shapes, for serving benchmarks that
llama.cpp runs on the same files: a Qwen3-MoE of about 1B total / 0.2B active parameters
and a DeepSeek-V2-Lite-shaped model (MLA + DeepSeekMoE) scaled to fit this machine; and
a dense Llama of TinyLlama's 1.1B shape (``--only llama-1.1b``: the tensor-parallel
benchmark's 1B-class model).

Weights are random Q4_0 blocks written directly (a random fp16 scale and random
nibbles per block of 32), norms are ones and the router F32, so a 1B file takes seconds
to make; the tokenizer is the default model's. Speed does not depend on the values.

    .venv/bin/python benchmarks/make_moe_gguf.py --out build/bench-models
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SHAPES = {
    # TinyLlama-1.1B's shape: 22 layers, hidden 2048, 32 heads / 4 KV heads, MLP 5632
    "llama-1.1b": dict(arch="llama", layers=22, hidden=2048, heads=32, kv_heads=4,
                       head_dim=64, ff=5632),
    # 16 layers, hidden 1024, 32 experts of 512, 4 used: 0.95B total, 0.19B active
    "qwen3moe-1b-a0.2b": dict(arch="qwen3moe", layers=16, hidden=1024, heads=16, kv_heads=4,
                              head_dim=64, experts=32, used=4, expert_ff=512),
    # DeepSeek-V2-Lite's 27 layers, attention (16 heads, kv_lora 512, nope 128, rope 64,
    # v 128, no q_lora) and routing (64 experts, 6 used, 2 shared, first layer dense), at
    # half its widths (hidden 1024, experts of 704, dense MLP 5472): 4.0B total, 0.7B
    # active. (llama.cpp takes a deepseek2 file without q_lora only at 26 or 27 layers.)
    "deepseek2-lite-half": dict(arch="deepseek2", layers=27, hidden=1024, heads=16,
                                experts=64, used=6, expert_ff=704, shared=2, dense_ff=5472,
                                kv_lora=512, nope=128, rope=64, v=128),
}


def q4_0(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Random Q4_0 blocks for a weight of ``shape`` (last dim the row length)."""
    *lead, k = shape
    blocks = int(np.prod(lead)) * (k // 32)
    out = np.empty((blocks, 18), dtype=np.uint8)
    out[:, :2] = (rng.uniform(0.002, 0.01, blocks).astype(np.float16)
                  .view(np.uint8).reshape(blocks, 2))
    out[:, 2:] = rng.integers(0, 256, (blocks, 16), dtype=np.uint8)
    return out.reshape(*lead, k // 32 * 18)


def write(name: str, shape: dict, out: Path, default_gguf: Path) -> Path:
    import gguf

    rng = np.random.default_rng(0)
    a, h, layers = shape["arch"], shape["hidden"], shape["layers"]
    path = out / f"{name}.Q4_0.gguf"
    w = gguf.GGUFWriter(str(path), a)
    src = gguf.GGUFReader(str(default_gguf))
    vocab = 0
    for field in src.fields.values():
        if field.name.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
            if field.name == "tokenizer.ggml.tokens":
                vocab = len(field.contents())
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(h)
    w.add_head_count(shape["heads"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    if "experts" in shape:
        w.add_expert_count(shape["experts"])
        w.add_expert_used_count(shape["used"])
        w.add_expert_feed_forward_length(shape["expert_ff"])
    Q = gguf.GGMLQuantizationType.Q4_0

    def put_q(tname: str, *dims: int) -> None:
        w.add_tensor(tname, q4_0(rng, *dims), raw_dtype=Q)

    def put_f(tname: str, arr: np.ndarray) -> None:
        w.add_tensor(tname, arr.astype(np.float32))

    put_q("token_embd.weight", vocab, h)
    put_f("output_norm.weight", np.ones(h))
    put_q("output.weight", vocab, h)
    e, ff = shape.get("experts", 0), shape.get("expert_ff", shape.get("ff", 0))
    if a in ("qwen3moe", "llama"):
        hd, kvh = shape["head_dim"], shape["kv_heads"]
        w.add_feed_forward_length(ff)
        w.add_head_count_kv(kvh)
        w.add_key_length(hd)
        w.add_value_length(hd)
    else:
        w.add_feed_forward_length(shape["dense_ff"])
        w.add_head_count_kv(1)
        w.add_leading_dense_block_count(1)
        w.add_kv_lora_rank(shape["kv_lora"])
        w.add_key_length(shape["kv_lora"] + shape["rope"])
        w.add_value_length(shape["kv_lora"])
        w.add_key_length_mla(shape["nope"] + shape["rope"])
        w.add_value_length_mla(shape["v"])
        w.add_rope_dimension_count(shape["rope"])
        w.add_expert_shared_count(shape["shared"])
        w.add_expert_weights_scale(1.0)
    for i in range(layers):
        b = f"blk.{i}."
        put_f(b + "attn_norm.weight", np.ones(h))
        put_f(b + "ffn_norm.weight", np.ones(h))
        if a in ("qwen3moe", "llama"):
            nh = shape["heads"]
            put_q(b + "attn_q.weight", nh * hd, h)
            put_q(b + "attn_k.weight", kvh * hd, h)
            put_q(b + "attn_v.weight", kvh * hd, h)
            put_q(b + "attn_output.weight", h, nh * hd)
            if a == "qwen3moe":
                put_f(b + "attn_q_norm.weight", np.ones(hd))
                put_f(b + "attn_k_norm.weight", np.ones(hd))
        else:
            nh, lora, nope, rope, v = (shape[k] for k in ("heads", "kv_lora", "nope", "rope",
                                                          "v"))
            put_q(b + "attn_q.weight", nh * (nope + rope), h)
            put_q(b + "attn_kv_a_mqa.weight", lora + rope, h)
            put_f(b + "attn_kv_a_norm.weight", np.ones(lora))
            # the latent split as llama.cpp's converter writes it
            put_f(b + "attn_k_b.weight", rng.normal(0, 0.02, (nh, lora, nope)))
            put_f(b + "attn_v_b.weight", rng.normal(0, 0.02, (nh, v, lora)))
            put_q(b + "attn_output.weight", h, nh * v)
        if a == "llama":
            put_q(b + "ffn_gate.weight", ff, h)
            put_q(b + "ffn_up.weight", ff, h)
            put_q(b + "ffn_down.weight", h, ff)
            continue
        if a == "deepseek2" and i == 0:
            put_q(b + "ffn_gate.weight", shape["dense_ff"], h)
            put_q(b + "ffn_up.weight", shape["dense_ff"], h)
            put_q(b + "ffn_down.weight", h, shape["dense_ff"])
            continue
        put_f(b + "ffn_gate_inp.weight", rng.normal(0, 0.05, (e, h)))
        put_q(b + "ffn_gate_exps.weight", e, ff, h)
        put_q(b + "ffn_up_exps.weight", e, ff, h)
        put_q(b + "ffn_down_exps.weight", e, h, ff)
        if a == "deepseek2":
            sff = ff * shape["shared"]
            put_q(b + "ffn_gate_shexp.weight", sff, h)
            put_q(b + "ffn_up_shexp.weight", sff, h)
            put_q(b + "ffn_down_shexp.weight", h, sff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main() -> None:
    from deepserve.loader.resolve import default_model_path

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/bench-models")
    ap.add_argument("--only", nargs="*", choices=list(SHAPES), default=list(SHAPES))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        path = write(name, SHAPES[name], out, default_model_path())
        print(f"{path}: {path.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
