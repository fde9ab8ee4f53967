"""GGUF types kept as blocks after a rewrite: Q5_0, Q5_1, Q4_K and Q6_K rewritten at load
into the kernels' blocks of 32 lose nothing (the gguf package's dequantization, bit for
bit), the kernels on every instruction-set build this CPU runs match float64, and a GGUF
whose projections come in these types loads them as blocks and answers like the
original."""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from kquant_files import quantize_q4_k, quantize_q6_k, write_copy, write_tiny_tied_q6_k

from deepserve import LLM, SamplingParams, kernels
from deepserve.layers import gguf_linear as gl
from deepserve.layers import kquants
from deepserve.loader.resolve import default_model_path

NAMES = {"Q5_0": kquants.Q5_0, "Q5_1": kquants.Q5_1, "Q4_K": kquants.Q4_K,
         "Q6_K": kquants.Q6_K}
QUANT = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}
# where each block keeps its fp16 scales
SCALES = {"Q5_0": (0, 2), "Q5_1": (0, 4), "Q4_K": (0, 4), "Q6_K": (208, 210)}


def random_blocks(name: str, n: int, k: int, seed: int) -> torch.Tensor:
    """Any bytes are a valid block once its fp16 scales are finite: random codes, high
    bits and sub-scales, and sane fp16 scales (every bit pattern the layout has)."""
    g = torch.Generator().manual_seed(seed)
    qt = NAMES[name]
    size, s = kquants.FILE_BYTES[qt], k // kquants.FILE_BLOCK[qt]
    raw = torch.randint(0, 256, (n, s, size), generator=g, dtype=torch.uint8)
    a, b = SCALES[name]
    d16 = (torch.rand(n, s, (b - a) // 2, generator=g) * 0.01 + 1e-4).half()
    raw[..., a:b] = d16.view(torch.uint8)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("name", list(NAMES))
def test_kept_layout_dequantizes_bit_for_bit_like_the_gguf_package(name):
    raw = random_blocks(name, 24, 512, seed=0)
    ref = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), GT[name]))
    kept = kquants.keep(raw, NAMES[name], 512)
    assert kept.shape == (24, 512 // 32 * kquants.KEPT_BYTES[NAMES[name]])
    assert torch.equal(gl.dequantize(kept, NAMES[name], 512), ref)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_kept_layout_in_cpp_is_the_torch_rewrites_byte_for_byte(name, each_isa,
                                                                 monkeypatch):
    """Q4_K / Q6_K rows are rewritten at load by one C++ pass (``keep_kquant``), on every
    ISA build the same bytes as the torch operations write; subnormal, zero and negative
    scales included, and from a read-only view such as a mapped file's."""
    qt = NAMES[name]
    raw = random_blocks(name, 24, 512, seed=5)
    a, _ = SCALES[name]
    blocks = raw.view(24, -1, kquants.FILE_BYTES[qt])
    for i, h in enumerate((0x0001, 0x0000, 0xAE66, 0x03FF)):  # subnormal, 0, < 0
        blocks[i, 0, a:a + 2] = torch.tensor([h & 0xFF, h >> 8], dtype=torch.uint8)
    got = kernels.ops().keep_kquant(raw, qt, 512)
    with monkeypatch.context() as m:
        m.setattr(kernels, "loaded", lambda: False)
        want = kquants.keep(raw, qt, 512)
    assert torch.equal(got, want)
    assert torch.equal(kquants.keep(raw, qt, 512), want)  # keep() takes the C++ pass
    frozen = raw.numpy().copy()
    frozen.setflags(write=False)
    with warnings.catch_warnings():  # torch warns (once) that the array is read-only
        warnings.simplefilter("ignore", UserWarning)
        view = torch.from_numpy(frozen)
    assert torch.equal(kernels.ops().keep_kquant(view, qt, 512), want)


@pytest.mark.parametrize("name", list(QUANT))
def test_test_quantizers_write_blocks_the_gguf_package_reads(name):
    torch.manual_seed(1)
    w = torch.randn(16, 512)
    back = torch.from_numpy(gguf.quants.dequantize(QUANT[name](w).numpy(), GT[name]))
    # 4 and 6 bits: about 1/15 and 1/31 of a sub-block's range, within rounding
    assert (back - w).abs().max() < (0.6 if name == "Q4_K" else 0.25)


@pytest.mark.parametrize("name", ["Q5_0", "Q5_1", "Q4_K"])
def test_kept_k_quants_on_amx_tiles_match_float64(name, amx_tiles):
    """Kept Q5_0 / Q5_1 / Q4_K against 16 bf16 rows and more run on AMX bf16 tiles, their
    fifth bits and sub-block scales dequantized per panel: float64 within bf16's rounding,
    and other bits than the VNNI kernel's."""
    n, k = 64, 768
    raw = random_blocks(name, n, k, seed=5)
    deq = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), GT[name])).double()
    layer = gl.GGUFLinear(kquants.keep(raw, NAMES[name], k), NAMES[name], k, None)
    layer.use_kernel = True
    torch.manual_seed(6)
    for rows in (16, 33):
        x = torch.randn(rows, k).to(torch.bfloat16)
        ref = x.double() @ deq.t()
        got = layer(x)
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err < 0.01, (rows, err.item())
        kernels.set_amx(False)
        try:
            assert not torch.equal(got, layer(x))
        finally:
            kernels.set_amx(True)


@pytest.mark.parametrize("name", list(NAMES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_on_kept_k_quants_matches_float64_on_each_isa(name, dtype, each_isa):
    n, k = 72, 768  # 9 groups of 8 rows: pairs for the 16-column kernel, and one left
    raw = random_blocks(name, n, k, seed=2)
    deq = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), GT[name])).double()
    layer = gl.GGUFLinear(kquants.keep(raw, NAMES[name], k), NAMES[name], k, torch.randn(n))
    assert layer.kernel_qtype == (NAMES[name] if name == "Q6_K" else NAMES[name] + gl.X8)
    layer.use_kernel = True
    torch.manual_seed(3)
    for rows in (1, 2, 3, 4, 5, 8, 9, 13, 70):
        x = torch.randn(rows, k).to(dtype)
        ref = x.double() @ deq.t() + layer.bias.double()
        got = layer(x)
        assert got.dtype == dtype and got.shape == (rows, n)
        err = (got.double() - ref).abs().max() / ref.abs().max()
        # Q5_x, Q4_K: 8-bit activations (as for Q4_0 / Q4_1); Q6_K: float activations
        bound = 0.02 if name != "Q6_K" else (1e-5 if dtype == torch.float32 else 0.01)
        assert err < bound, (rows, err.item())
    layer.use_kernel = False  # torch's path over the same kept blocks
    x = torch.randn(3, k)
    assert torch.allclose(layer(x).double(), x.double() @ deq.t() + layer.bias.double(),
                          rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", ["Q5_0", "Q4_K"])
def test_interleaved_only_types_need_rows_in_eights(name):
    raw = random_blocks(name, 12, 256, seed=4)
    with pytest.raises(ValueError, match=f"{name} blocks need a multiple of 8 rows, not 12"):
        gl.GGUFLinear(kquants.keep(raw, NAMES[name], 256), NAMES[name], 256)


def test_a_k_quant_gguf_keeps_its_blocks_and_answers(tmp_path, caplog):
    """The default model with its down projections (in 1536 = 6 x 256) rewritten as
    Q4_K and Q6_K, alternating by layer, gate and up as Q5_0 or Q5_1 in every fourth
    layer or the one after, and the v projection of every third layer as Q8_0 (a fused
    q / k / v of mixed types, as Q4_K_M files have): all load as blocks, never dense,
    and greedy decoding still names Paris."""
    src = str(default_model_path())
    dst = str(tmp_path / "smollm2-kquants.gguf")
    types = {f"blk.{i}.ffn_down.weight": (12 if i % 2 else 14) for i in range(30)}
    types.update({f"blk.{i}.attn_v.weight": 8 for i in range(0, 30, 3)})
    for i in range(30):
        if i % 4 < 2:
            types.update({f"blk.{i}.ffn_gate.weight": 6 + i % 4,
                          f"blk.{i}.ffn_up.weight": 6 + i % 4})
    write_copy(src, dst, types)
    caplog.set_level("INFO", logger="deepserve.engine.llm_engine")
    llm = LLM(model=dst, show_progress=False, kv_cache_memory="64MiB")
    model = llm.engine.model
    layers = [m for m in model.modules() if isinstance(m, gl.GGUFLinear)]
    counts = {name: sum(gl.NAMES[m.qtype] == name for m in layers) for name in gl.NAMES.values()}
    # Q4_1: o in 30 layers, gate_up in 14, fused q/k/v in 20, q and k as parts in 10;
    # Q8_0: the tied head and the 10 v parts
    assert counts == {"Q4_0": 0, "Q4_1": 30 + 14 + 20 + 20, "Q5_0": 8, "Q5_1": 8,
                      "Q8_0": 1 + 10, "Q4_K": 15, "Q6_K": 15}, counts
    assert "Q4_K x 15" in caplog.text and "Q6_K x 15" in caplog.text
    mixed = [m for m in model.modules() if isinstance(m, gl.GGUFParts)]
    assert len(mixed) == 10 and [p.out_features for p in mixed[0].parts] == [576, 192, 192]
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    out = llm.chat([{"role": "user", "content": "Name the capital city of France."}],
                   SamplingParams(temperature=0, max_tokens=12))[0]
    assert "Paris" in out.text
    if kernels.available():
        assert all(m.use_kernel for m in layers)
    if kernels.available() and kernels.isa() != "portable":
        # a Q4_K layer holds its file blocks rewritten (keep_kquant) and interleaved
        from pathlib import Path

        from deepserve.loader.weights import open_checkpoint
        ckpt = open_checkpoint(Path(dst), "gguf")
        down = model.layers[1].down_proj
        assert down.qtype == kquants.Q4_K and down.kernel_qtype == kquants.Q4_K + gl.X8
        kept = kquants.keep(ckpt.blocks("blk.1.ffn_down.weight", ckpt.model_config()),
                            kquants.Q4_K, 1536)
        assert torch.equal(down.blocks, gl.interleave(kept, kquants.Q4_K, 1536))


def test_parts_of_different_types_side_by_side_with_the_fused_bias():
    k = 512
    a, b = random_blocks("Q4_K", 16, k, seed=5), random_blocks("Q6_K", 8, k, seed=6)
    deq = torch.cat([torch.from_numpy(gguf.quants.dequantize(a.numpy(), GT.Q4_K)),
                     torch.from_numpy(gguf.quants.dequantize(b.numpy(), GT.Q6_K))]).double()
    bias = torch.randn(24)
    parts = gl.GGUFParts([gl.GGUFLinear(kquants.keep(a, kquants.Q4_K, k), kquants.Q4_K, k),
                          gl.GGUFLinear(kquants.keep(b, kquants.Q6_K, k), kquants.Q6_K, k)],
                         bias)
    assert parts.out_features == 24
    x = torch.randn(2, 3, k)
    ref = x.double() @ deq.t() + bias.double()
    for on in (False, True) if kernels.available() else (False,):
        for p in parts.parts:
            p.use_kernel = on
        got = parts(x)
        assert got.shape == (2, 3, 24)
        assert ((got.double() - ref).abs().max() / ref.abs().max()) < 0.02


def test_a_tied_q6_k_table_stays_in_blocks_for_embedding_and_head(tmp_path):
    """K-quant files of tied models (Qwen2.5, Llama 3.2) store the token table in Q6_K:
    the embedding looks rows up in the kept blocks and the head shares them, instead of a
    dense float copy of the table; greedy tokens equal transformers' float32 reading of
    the same file."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny-tied-q6k.gguf"
    write_tiny_tied_q6_k(str(default_model_path()), str(path))
    llm = LLM(model=str(path), dtype="float32", show_progress=False, kv_cache_memory="16MiB")
    model = llm.engine.model
    embed, head = model.embed_tokens, model.lm_head
    assert isinstance(embed, gl.GGUFEmbedding) and embed.qtype == kquants.Q6_K
    assert isinstance(head, gl.GGUFLinear) and head.blocks.data_ptr() == embed.blocks.data_ptr()
    raw = torch.from_numpy(np.array(gguf.GGUFReader(str(path)).get_tensor(0).data))
    ids = torch.tensor([[0, 5, 49151], [7, 7, 1234]])
    ref = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), GT.Q6_K))
    assert torch.equal(embed(ids), ref[ids])

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    prompt = [1, 504, 3458, 314, 4771, 28, 253, 5248]
    with torch.inference_mode():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                           pad_token_id=0)[0, len(prompt):].tolist()
    got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8,
                                                ignore_eos=True))[0].outputs[0].token_ids
    assert got == want
