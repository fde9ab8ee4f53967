"""Test helpers: Q4_K / Q6_K blocks from float weights (plain round-to-nearest, as a
reference for the layout, not for quality), and a copy of a GGUF file with chosen
tensors rewritten in those types."""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256


def quantize_q4_k(w: torch.Tensor) -> torch.Tensor:
    """[n, k] float -> [n, k / 256 * 144] uint8 Q4_K blocks (w = d*sc*q - dmin*m)."""
    n, k = w.shape
    g = w.double().reshape(n, k // QK_K, 8, 32)
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1)
    scale_f, min_f = (hi - lo) / 15, -lo
    d = (scale_f.amax(-1, keepdim=True) / 63).clamp(min=1e-8).half()
    dmin = (min_f.amax(-1, keepdim=True) / 63).clamp(min=1e-8).half()
    sc = torch.round(scale_f / d.double()).clamp(0, 63).to(torch.int32)
    m = torch.round(min_f / dmin.double()).clamp(0, 63).to(torch.int32)
    eff_d = (d.double() * sc).unsqueeze(-1)
    eff_m = (dmin.double() * m).unsqueeze(-1)
    q = torch.where(eff_d > 0, torch.round((g + eff_m) / eff_d.clamp(min=1e-30)),
                    torch.zeros_like(g)).clamp(0, 15).to(torch.uint8)
    packed = torch.cat([
        (sc[..., :4] | ((sc[..., 4:] >> 4) << 6)),
        (m[..., :4] | ((m[..., 4:] >> 4) << 6)),
        ((sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)),
    ], dim=-1).to(torch.uint8)                                        # [n, s, 12]
    qs = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).reshape(n, k // QK_K, 128)
    head = torch.cat([d.view(torch.uint8), dmin.view(torch.uint8)], dim=-1)
    return torch.cat([head.reshape(n, k // QK_K, 4), packed, qs], dim=-1).reshape(n, -1)


def quantize_q6_k(w: torch.Tensor) -> torch.Tensor:
    """[n, k] float -> [n, k / 256 * 210] uint8 Q6_K blocks (w = d*sc*(q - 32))."""
    n, k = w.shape
    s = k // QK_K
    g = w.double().reshape(n, s, 16, 16)
    scale_f = g.abs().amax(-1) / 31
    d = (scale_f.amax(-1, keepdim=True) / 127).clamp(min=1e-8).half()
    sc = torch.round(scale_f / d.double()).clamp(-128, 127).to(torch.int8)
    eff = (d.double() * sc.double()).unsqueeze(-1)
    q = torch.where(eff > 0, torch.round(g / eff.clamp(min=1e-30)), torch.zeros_like(g))
    q = (q.clamp(-32, 31) + 32).to(torch.uint8).reshape(n, s, 2, 128)  # two halves
    low = q & 15
    ql = low[..., :64] | (low[..., 64:] << 4)                          # [n, s, 2, 64]
    top = (q >> 4).reshape(n, s, 2, 4, 32)
    qh = top[..., 0, :] | (top[..., 1, :] << 2) | (top[..., 2, :] << 4) | (top[..., 3, :] << 6)
    return torch.cat([ql.reshape(n, s, 128), qh.reshape(n, s, 64), sc.view(torch.uint8),
                      d.view(torch.uint8).reshape(n, s, 2)], dim=-1).reshape(n, -1)


def write_copy(src: str, dst: str, types: dict[str, int]) -> None:
    """Copy the GGUF at ``src`` to ``dst`` with the tensors named in ``types`` (GGUF name
    -> 6 Q5_0, 7 Q5_1, 8 Q8_0, 12 Q4_K or 14 Q6_K) requantized from their dequantized
    values."""
    import gguf
    from gguf import GGMLQuantizationType as GT

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    def packaged(qtype: int):  # the gguf package's own quantizer
        return lambda w: torch.from_numpy(gguf.quants.quantize(w.numpy(), GT(qtype)))

    quant = {12: quantize_q4_k, 14: quantize_q6_k, 6: packaged(6), 7: packaged(7),
             8: packaged(8)}
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape.tolist())]   # rows first
        if t.name in types:
            w = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(shape)
            blocks = quant[types[t.name]](torch.from_numpy(w).float()).numpy()
            # (the writer takes a block tensor's shape as [rows, bytes per row])
            writer.add_tensor(t.name, blocks, raw_dtype=gguf.GGMLQuantizationType(types[t.name]))
        else:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_tied_q6_k(src: str, dst: str, seed: int = 0) -> None:
    """A small random Llama GGUF whose rows are whole K-quant super-blocks (hidden 256, 2
    layers, 4 heads / 2 KV heads) with the default model's tokenizer and a tied token
    table in Q6_K, as llama.cpp's quantizer writes tied models' tables in K-quant files.
    Every other tensor is F32."""
    import gguf

    reader = gguf.GGUFReader(src)
    hidden, inter, layers, heads, kv_heads = 256, 512, 2, 4, 2
    sizes = {"llama.embedding_length": hidden, "llama.feed_forward_length": inter,
             "llama.block_count": layers, "llama.attention.head_count": heads,
             "llama.attention.head_count_kv": kv_heads,
             "llama.rope.dimension_count": hidden // heads}
    writer = gguf.GGUFWriter(dst, "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = sizes.get(field.name, field.contents())
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    g = torch.Generator().manual_seed(seed)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    head_dim = hidden // heads

    def rand(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (torch.randn(*shape, generator=g) * scale).numpy()

    table = quantize_q6_k(torch.from_numpy(rand(vocab, hidden, scale=0.5)))
    writer.add_tensor("token_embd.weight", table.numpy(), raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    writer.add_tensor("output_norm.weight", 1 + rand(hidden, scale=0.1))
    for i in range(layers):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", 1 + rand(hidden, scale=0.1))
        writer.add_tensor(p + "ffn_norm.weight", 1 + rand(hidden, scale=0.1))
        writer.add_tensor(p + "attn_q.weight", rand(heads * head_dim, hidden))
        writer.add_tensor(p + "attn_k.weight", rand(kv_heads * head_dim, hidden))
        writer.add_tensor(p + "attn_v.weight", rand(kv_heads * head_dim, hidden))
        writer.add_tensor(p + "attn_output.weight", rand(hidden, heads * head_dim))
        writer.add_tensor(p + "ffn_gate.weight", rand(inter, hidden))
        writer.add_tensor(p + "ffn_up.weight", rand(inter, hidden))
        writer.add_tensor(p + "ffn_down.weight", rand(hidden, inter))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
