"""GGUF block weights (Q4_0, Q4_1, Q8_0) computed as stored: the kernels on every
instruction-set build this CPU runs against float64, the torch (de)quantizers against
the gguf package's, and the real model on its own Q4_1 blocks and on Q8_0 blocks."""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from prompts import PROMPTS

from deepserve import LLM, SamplingParams, kernels
from deepserve.layers import gguf_linear as gl

TYPES = {"Q4_0": gl.Q4_0, "Q4_1": gl.Q4_1, "Q8_0": gl.Q8_0}


def gguf_blocks(w: torch.Tensor, name: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.quantize(w.numpy(), GT[name]))


@pytest.mark.parametrize("name", list(TYPES))
def test_torch_dequantize_equals_the_gguf_package(name):
    torch.manual_seed(0)
    w = torch.randn(37, 96) * 3
    blocks = gguf_blocks(w, name)
    ref = gguf.quants.dequantize(blocks.numpy(), GT[name])
    assert torch.equal(gl.dequantize(blocks, TYPES[name], 96), torch.from_numpy(ref))


@pytest.mark.parametrize("name", ["Q4_1", "Q8_0"])
def test_torch_quantize_writes_blocks_the_gguf_package_reads(name):
    torch.manual_seed(0)
    w = torch.randn(40, 128)
    blocks = gl.quantize(w, TYPES[name])
    assert blocks.shape == (40, 128 // 32 * gl.BLOCK_BYTES[TYPES[name]])
    back = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), GT[name]))
    step = (w.reshape(40, 4, 32).amax(-1) - w.reshape(40, 4, 32).amin(-1)).max()
    bound = step / 15 * 0.51 if name == "Q4_1" else w.abs().max() / 127 * 0.51
    assert (back - w).abs().max() <= bound * 1.01
    assert torch.equal(gl.dequantize(blocks, TYPES[name], 128), back)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1"])
def test_interleave_is_the_documented_reordering_and_reverses(name):
    torch.manual_seed(5)
    k = 96
    blocks = gguf_blocks(torch.randn(16, k), name)
    qt, bb = TYPES[name], gl.BLOCK_BYTES[TYPES[name]]
    packed = gl.interleave(blocks, qt, k)
    assert packed.shape == blocks.shape
    assert torch.equal(gl.deinterleave(packed, qt, k), blocks)
    hb = bb - 16
    for g, b, r in [(0, 0, 0), (1, 2, 5), (1, 1, 7)]:
        chunk = packed.reshape(2, 3, 8 * bb)[g, b]
        blk = blocks[8 * g + r].reshape(3, bb)[b]
        for h in range(hb // 2):  # fp16 d (and m) of row r at slot r of their group of 8
            assert torch.equal(chunk[16 * h + 2 * r:16 * h + 2 * r + 2], blk[2 * h:2 * h + 2])
        for t in range(4):  # word r of code vector t: the row's code bytes 4t .. 4t + 3
            start = 8 * hb + 32 * t + 4 * r
            assert torch.equal(chunk[start:start + 4], blk[hb + 4 * t:hb + 4 * t + 4])


# Q4_0x8 / Q4_1x8: the same blocks interleaved eight rows at a time (gl.interleave)
@pytest.mark.parametrize("name", [*TYPES, "Q4_0x8", "Q4_1x8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# in_features of 3, 18 and 48 blocks: none, some and no blocks left after groups of 8
@pytest.mark.parametrize("k", [96, 576, 1536])
def test_linear_gguf_matches_float64_on_each_isa(name, dtype, k, each_isa):
    torch.manual_seed(1)
    x8 = name.endswith("x8")
    name = name.removesuffix("x8")
    n = 200 if x8 else 203
    w = torch.randn(n, k)
    blocks = gguf_blocks(w, name)
    deq = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), GT[name])).double()
    qtype = TYPES[name]
    if x8:
        blocks, qtype = gl.interleave(blocks, qtype, k), qtype + gl.X8
    bias = torch.randn(n)
    # 1-13: the row counts of one weight-row pass (4 or 8 rows) and their remainders;
    # 70: more than one tile of input rows (64 at most), with a remainder
    for rows in (1, 2, 3, 4, 5, 7, 8, 9, 13, 70):
        x = torch.randn(rows, k).to(dtype)
        ref = x.double() @ deq.t() + bias.double()
        got = kernels.linear_gguf(x, blocks, qtype, bias)
        assert got.dtype == dtype and got.shape == (rows, n)
        # 8-bit activations per block of 32 (as llama.cpp): about 0.5% of the output
        # scale; a wrong nibble order, scale or offset gives errors of 30% and more.
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err < (0.02 if dtype == torch.float32 else 0.025), (rows, err.item())


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_codes_are_the_documented_rounding_on_each_isa(interleaved, dtype,
                                                                  each_isa):
    """Each input row becomes 8-bit codes per block of 32: d = max|x| / 127, code =
    x * (1 / d) rounded half to even. One-hot Q4_1 rows (d = 1, m = 0) read each code
    back times its d, alone, so every ISA's quantizer must equal that rule bit for bit."""
    torch.manual_seed(3)
    k = 96
    blocks = torch.zeros(k, k // 32, 20, dtype=torch.uint8)
    blocks[:, :, 0:2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    for n in range(k):  # weight n of row n is code 1: low nibble of byte n % 16, or high
        j = n % 32
        blocks[n, n // 32, 4 + j % 16] = 1 if j < 16 else 0x10
    blocks, qtype = blocks.reshape(k, -1), gl.Q4_1
    if interleaved:
        blocks, qtype = gl.interleave(blocks, qtype, k), qtype + gl.X8
    x = torch.randn(9, k) * torch.logspace(-3, 3, 9).unsqueeze(1)
    x[2, 32:64] = 0.0  # an all-zero block: d = 0, codes 0
    x[3, 5] = 1e-30    # a value far below its block's step
    x = x.to(dtype)
    xf = x.float().reshape(9, 3, 32)
    d = xf.abs().amax(dim=2, keepdim=True) / 127
    inv = torch.where(d > 0, torch.ones(()) / d, torch.zeros(()))
    want = (torch.round(xf * inv) * d).reshape(9, k).to(dtype)
    got = kernels.linear_gguf(x, blocks, qtype, None)
    assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1"])
def test_interleaved_blocks_write_bf16_rows_as_the_float_path_rounds_them(name, each_isa):
    """bf16 rows in, no bias, a multiple of 16 output columns: the AVX-512 kernel writes
    bf16 itself; the result is the float path's, rounded to bf16, bit for bit."""
    torch.manual_seed(2)
    n, k = 208, 576
    blocks = gguf_blocks(torch.randn(n, k), name)
    packed, qtype = gl.interleave(blocks, TYPES[name], k), TYPES[name] + gl.X8
    for rows in (1, 5, 8, 70):
        x = torch.randn(rows, k).to(torch.bfloat16)
        got = kernels.linear_gguf(x, packed, qtype, None)
        want = kernels.linear_gguf(x.float(), packed, qtype, None).to(torch.bfloat16)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), rows


def test_per_head_q8_0_products_match_float64(each_isa):
    """kernels.bmm_gguf (MLA's W_UK / W_UV per head): x [H, M, K] from a strided view
    times each head's Q8_0 blocks, against float64 on the dequantized blocks; on
    AVX-512 and AVX2 also the interleaved layout (every head in one parallel loop)."""
    torch.manual_seed(9)
    h, n, k = 5, 48, 128
    blocks = gguf_blocks(torch.randn(h * n, k), "Q8_0")
    deq = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), GT["Q8_0"])).double()
    deq = deq.view(h, n, k)
    layouts = [(blocks.view(h, n, -1), gl.Q8_0)]
    if each_isa in ("avx512", "avx2"):
        layouts.append((gl.interleave(blocks, gl.Q8_0, k).view(h, n, -1), gl.Q8_0 + gl.X8))
    for packed, qtype in layouts:
        for m in (1, 3, 9):
            x = torch.randn(m, h, k).transpose(0, 1)  # [H, M, K], not contiguous
            for dtype in (torch.float32, torch.bfloat16):
                xd = x.to(dtype)
                ref = torch.bmm(xd.double(), deq.transpose(1, 2))
                got = kernels.bmm_gguf(xd, packed, qtype)
                assert got.dtype == dtype and got.shape == (h, m, n)
                err = (got.double() - ref).abs().max() / ref.abs().max()
                assert err < (2e-4 if dtype == torch.float32 else 8e-3), (qtype, m, err)


def test_the_default_models_head_rows_go_in_one_part_in_bf16_and_two_in_float32():
    """The default model's Q8_0 head (tied to the embedding): a bf16 engine runs it on
    rows in one 8-bit part (Q8_0_HEAD, as llama.cpp), a float32 engine, asked for
    precision, on two; dtype auto (bf16, or float32 where the CPU lacks native bf16) on
    one."""
    if kernels.isa() not in ("avx512", "avx2"):
        pytest.skip("the interleaved Q8_0 head runs on the AVX-512 and AVX2 kernels only")
    for dtype, want in (("bfloat16", gl.Q8_0_HEAD), ("float32", gl.Q8_0 + gl.X8),
                        ("auto", gl.Q8_0_HEAD)):
        head = LLM(dtype=dtype, show_progress=False, kv_cache_memory="16MiB").engine.model.lm_head
        assert head.batch_blocks is not None and head.batch_qtype == want, dtype


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("k", [96, 576, 1536])
def test_interleaved_q8_0_for_batches_matches_float64(k, isa):
    """Q8_0 blocks interleaved (qtype 108): rows as two 8-bit parts against signed
    codes on the AVX-512 VNNI kernel and the AVX2 one (vpmaddubsw on the codes'
    magnitudes, the rows given their signs), against the file's blocks in float64,
    measured 2e-5 of the output scale; and as an output head runs them (qtype 208,
    Q8_0_HEAD): rows in one 8-bit part per block of 32, as llama.cpp's Q8_0 head, measured
    5e-3 (a bf16 output gives 3e-3; a wrong scale, offset or column order 30% and more).
    Both builds take the same exact integer dots and the same float steps: where the CPU
    runs both, their outputs agree to float rounding."""
    if isa not in kernels.supported_isas() or not kernels.load(isa):
        pytest.skip(f"this CPU cannot run the {isa} build")
    op = kernels.ops(isa).linear_gguf
    torch.manual_seed(4)
    n = 208  # 13 pairs of interleaved groups
    w = torch.randn(n, k)
    blocks = gguf_blocks(w, "Q8_0")
    deq = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), GT["Q8_0"])).double()
    packed = gl.interleave(blocks, gl.Q8_0, k)
    assert torch.equal(gl.deinterleave(packed, gl.Q8_0, k), blocks)
    bias = torch.randn(n)
    other = kernels.ops("avx512").linear_gguf if isa == "avx2" and \
        "avx512" in kernels.supported_isas() and kernels.load("avx512") else None
    for rows in (1, 3, 4, 8, 9, 13, 70):
        x = torch.randn(rows, k)
        ref = x.double() @ deq.t() + bias.double()
        got = op(x, packed, gl.Q8_0 + gl.X8, bias)
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err < 2e-4, (rows, err.item())
        head = op(x, packed, gl.Q8_0_HEAD, bias)
        err = (head.double() - ref).abs().max() / ref.abs().max()
        assert 2e-4 < err < 1e-2, (rows, err.item())  # one part: coarser than two
        if other is not None:
            for qtype, want in ((gl.Q8_0 + gl.X8, got), (gl.Q8_0_HEAD, head)):
                torch.testing.assert_close(other(x, packed, qtype, bias), want, rtol=1e-5,
                                           atol=1e-5 * ref.abs().max().item())
    with pytest.raises(RuntimeError, match="multiple of 16"):
        op(torch.randn(2, k), packed[:8], gl.Q8_0 + gl.X8, None)
    interleaves = kernels.isa() in ("avx512", "avx2")  # the build the engine picked
    layer = gl.GGUFLinear(blocks, gl.Q8_0, k, bias)  # any Q8_0 layer (a Q8_0 file)
    assert layer.interleave_blocks() == interleaves
    assert torch.equal(layer.file_blocks(), blocks)
    layer.use_kernel = True
    for rows in (1, 9):
        x = torch.randn(rows, k)
        err = (layer(x).double() - (x.double() @ deq.t() + bias.double())).abs().max()
        assert err / (x.double() @ deq.t()).abs().max() < 2e-4
    for shared in (True, False):  # a copy beside the embedding's blocks, or in place
        layer = gl.GGUFLinear(blocks, gl.Q8_0, k, bias)
        layer.use_kernel = True
        assert layer.keep_batch_blocks(shared) == interleaves
        if interleaves:
            assert (layer.batch_blocks is not None) is shared
            assert layer.kernel_qtype == (gl.Q8_0 if shared else gl.Q8_0_HEAD)
        assert torch.equal(layer.file_blocks(), blocks)
        for rows in (1, gl.DENSE_ROWS, gl.DENSE_ROWS + 1):
            x = torch.randn(rows, k)
            want = x.double() @ deq.t()
            got = layer(x)
            if interleaves:  # the head's kernel, exactly
                assert torch.equal(got, kernels.linear_gguf(x, packed, gl.Q8_0_HEAD, bias))
            assert (got.double() - want - bias.double()).abs().max() / want.abs().max() < 1e-2


@pytest.mark.parametrize("name", list(TYPES))
def test_gguf_rows_equal_the_dequantized_table_on_each_isa(name, each_isa):
    torch.manual_seed(2)
    w = torch.randn(50, 64)
    blocks = gguf_blocks(w, name)
    ids = torch.tensor([49, 0, 7, 7])
    ref = gl.dequantize(blocks, TYPES[name], 64)[ids]
    assert torch.equal(kernels.gguf_rows(blocks, ids, TYPES[name], 64), ref)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.gguf_rows(blocks, torch.tensor([50]), TYPES[name], 64)


def test_linear_gguf_names_a_bad_shape_or_type(each_isa):
    blocks = gguf_blocks(torch.randn(8, 64), "Q8_0")
    with pytest.raises(RuntimeError, match="in_features 96"):
        kernels.linear_gguf(torch.randn(1, 96), blocks, gl.Q8_0)
    with pytest.raises(RuntimeError, match="GGUF type 12"):
        kernels.linear_gguf(torch.randn(1, 64), blocks, 12)
    q4 = gl.interleave(gguf_blocks(torch.randn(8, 64), "Q4_1"), gl.Q4_1, 64)
    with pytest.raises(RuntimeError, match="multiple of 8 rows, not 4"):
        kernels.linear_gguf(torch.randn(1, 64), q4[:4], gl.Q4_1 + gl.X8)


# 1003: a vocabulary that leaves lanes after the last full vector (AVX2: 8, AVX-512: 16)
@pytest.mark.parametrize("vocab", [1000, 1003])
def test_sample_rows_draws_by_the_cumulative_softmax_on_each_isa(vocab, each_isa):
    torch.manual_seed(3)
    logits = torch.randn(6, vocab) * 3
    logits[2, 500:] = -float("inf")
    logits[4, ::3] = -float("inf")  # masked tokens inside every vector, and in the tail
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)
    u = torch.tensor([0.01, 0.3, 0.5, 0.77, 0.9, 0.999])
    got = kernels.sample_rows(logits, u.float())
    want = torch.searchsorted(cdf, (u.double() * cdf[:, -1]).unsqueeze(1)).squeeze(1)
    assert torch.equal(got, want)
    assert got[2] < 500 and got[4] % 3 != 0


def test_gguf_linear_layer_without_kernels_dequantizes_in_torch():
    torch.manual_seed(4)
    w = torch.randn(24, 64)
    layer = gl.GGUFLinear(gl.quantize(w, gl.Q4_1), gl.Q4_1, 64, torch.randn(24))
    layer.use_kernel = False
    x = torch.randn(3, 64)
    ref = x @ layer.dequantized().t() + layer.bias
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert layer.interleave_blocks()  # the same weights in the kernels' order
    assert torch.allclose(layer(x), ref, atol=1e-5)


def test_isa_env_is_checked_with_a_clear_error():
    env = dict(os.environ, DEEPSERVE_ISA="sse9")
    code = ("from deepserve import LLM\n"
            "try:\n    LLM(show_progress=False)\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert "DeepserveError DEEPSERVE_ISA='sse9' is not one of auto, avx512, avx2, portable" \
        in out.stdout, out.stdout + out.stderr


# ---- the real model on its own blocks ----------------------------------------------------

def test_default_gguf_keeps_its_blocks_and_says_so(caplog):
    caplog.set_level("INFO", logger="deepserve.engine.llm_engine")
    llm = LLM(show_progress=False, kv_cache_memory="64MiB")
    layers = [m for m in llm.engine.model.modules() if isinstance(m, gl.GGUFLinear)]
    # 30 layers x 4 projections in Q4_1, and the tied output head on the Q8_0 embedding
    assert sorted({gl.NAMES[m.qtype] for m in layers}) == ["Q4_1", "Q8_0"]
    assert len(layers) == 121
    assert isinstance(llm.engine.model.embed_tokens, gl.GGUFEmbedding)
    assert llm.engine.model.lm_head.blocks.data_ptr() == \
        llm.engine.model.embed_tokens.blocks.data_ptr()
    assert "weights auto: Q4_1 x 120 + Q8_0 x 1" in caplog.text
    # the SIMD builds run the 4-bit layers interleaved; the tied head keeps the table's order
    x8 = kernels.available() and kernels.isa() != "portable"
    assert {m.kernel_qtype for m in layers if m.qtype == gl.Q4_1} == \
        {gl.Q4_1 + gl.X8 if x8 else gl.Q4_1}
    assert llm.engine.model.lm_head.kernel_qtype == gl.Q8_0
    out = llm.chat([{"role": "user", "content": "Name the capital city of France."}],
                   SamplingParams(temperature=0, max_tokens=12))[0]
    assert "Paris" in out.text


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0 one part"])
def test_amx_tiles_match_float64_and_leave_other_shapes_to_vnni(name, amx_tiles):
    """12 bf16 rows and more against interleaved blocks run on AMX bf16 tiles (each panel
    of 16 columns dequantized to bf16 once): the float64 product within bf16's rounding,
    and not the VNNI kernel's bits (a different path ran); so do float32 rows that bf16
    holds exactly (a bf16 model's head), giving float32, and rows that start off a cache
    line (bit for bit as aligned ones). Fewer rows, other float32 rows, a
    width that is not a multiple of 32, or Q8_0 in two 8-bit parts (more precise than bf16
    rows) stay on the VNNI kernel, bit for bit."""
    torch.manual_seed(4)
    base = name.split()[0]
    n, k = 96, 576  # three pairs of 16-column panels
    blocks = gguf_blocks(torch.randn(n, k), base)
    deq = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), GT[base])).double()
    packed = gl.interleave(blocks, TYPES[base], k)
    qtype = 208 if name.endswith("one part") else TYPES[base] + gl.X8

    def vnni(x, w):
        kernels.set_amx(False)
        try:
            return kernels.linear_gguf(x, w, qtype)
        finally:
            kernels.set_amx(True)

    for rows in (16, 17, 40):  # one row tile; one and a row; two pairs of tiles, one short
        x = torch.randn(rows, k).to(torch.bfloat16)
        ref = x.double() @ deq.t()
        got = kernels.linear_gguf(x, packed, qtype)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err < 0.01, (rows, err.item())  # bf16 rows and weights: about 0.3%
        assert not torch.equal(got, vnni(x, packed)), rows
        exact = kernels.linear_gguf(x.float(), packed, qtype)
        assert exact.dtype == torch.float32 and torch.equal(exact.to(torch.bfloat16), got)
        # rows that do not start on a cache line (the tiles read them from a copy)
        shifted = torch.empty(rows * k + 1, dtype=torch.bfloat16)[1:].view(rows, k)
        shifted.copy_(x)
        assert torch.equal(kernels.linear_gguf(shifted, packed, qtype), got), rows
    for x, w in ((torch.randn(11, k).to(torch.bfloat16), packed), (torch.randn(40, k), packed),
                 (torch.randn(40, k).to(torch.bfloat16), packed[:80])):
        assert torch.equal(kernels.linear_gguf(x, w, qtype), vnni(x, w))
    if base == "Q8_0":
        qtype = TYPES[base] + gl.X8  # two parts
        x = torch.randn(40, k).to(torch.bfloat16)
        assert torch.equal(kernels.linear_gguf(x, packed, qtype), vnni(x, packed))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0 one part"])
def test_amx_tiles_reuse_panels_across_row_chunks_and_fuse_swiglu(name, amx_tiles):
    """Rows past one L2 chunk (256 rows of 2048 inputs) run on panels dequantized once
    ahead for every chunk: each row exactly as it comes alone, and the float64 product
    within bf16's rounding. Within one chunk, each thread dequantizes its next panel pair
    while the tiles multiply the current one: within bf16's rounding too. swiglu_gguf (a
    gate_up projection and SwiGLU in one pass on the tiles) gives
    silu_mul(linear_gguf(...)) bit for bit, at one row tile and over two chunks; where the
    tiles do not run (11 rows, float32 rows) it says so (None)."""
    torch.manual_seed(5)
    base = name.split()[0]
    n, k = 512, 256  # 16 panel pairs: each thread's share holds several
    blocks = gguf_blocks(torch.randn(n, k) * 0.1, base)
    deq = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), GT[base])).double()
    packed = gl.interleave(blocks, TYPES[base], k)
    qtype = 208 if name.endswith("one part") else TYPES[base] + gl.X8
    x = torch.randn(40, k).to(torch.bfloat16)
    ref = x.double() @ deq.t()
    got = kernels.linear_gguf(x, packed, qtype)
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 0.01
    assert torch.equal(kernels.swiglu_gguf(x, packed, qtype), kernels.silu_mul(got))
    n, k = 64, 2048
    blocks = gguf_blocks(torch.randn(n, k) * 0.1, base)
    deq = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), GT[base])).double()
    packed = gl.interleave(blocks, TYPES[base], k)
    qtype = 208 if name.endswith("one part") else TYPES[base] + gl.X8
    x = torch.randn(300, k).to(torch.bfloat16)
    got = kernels.linear_gguf(x, packed, qtype)
    ref = x.double() @ deq.t()
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 0.01
    assert torch.equal(got[:40], kernels.linear_gguf(x[:40], packed, qtype))
    assert torch.equal(got[40:], kernels.linear_gguf(x[40:], packed, qtype))
    for rows in (12, 300):
        fused = kernels.swiglu_gguf(x[:rows], packed, qtype)
        assert fused is not None and fused.shape == (rows, n // 2)
        assert torch.equal(fused, kernels.silu_mul(kernels.linear_gguf(x[:rows], packed, qtype)))
    assert kernels.swiglu_gguf(x[:11], packed, qtype) is None
    assert kernels.swiglu_gguf(x[:40].float(), packed, qtype) is None
    if base == "Q4_0":  # outputs past 4 MB leave by streaming stores, bf16 and float32
        blocks = gguf_blocks(torch.randn(2048, 64) * 0.1, base)
        deq = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), GT[base])).double()
        packed = gl.interleave(blocks, TYPES[base], 64)
        x = torch.randn(1100, 64).to(torch.bfloat16)
        ref = x.double() @ deq.t()
        got = kernels.linear_gguf(x, packed, qtype)
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 0.01
        assert torch.equal(got[:16], kernels.linear_gguf(x[:16], packed, qtype))
        exact = kernels.linear_gguf(x.float(), packed, qtype)  # float32 out: 9 MB
        assert exact.dtype == torch.float32 and torch.equal(exact.to(torch.bfloat16), got)


@pytest.mark.parametrize("name", ["Q4_0", "Q8_0 one part"])
def test_amx_head_picks_greedy_tokens_without_writing_the_logits(name, amx_tiles, llm_bf16):
    """argmax_gguf gives argmax_rows(linear_gguf(...)) from the tiles, each thread's columns
    merged: the first of equal largest values (two equal columns), the first NaN column,
    rows over two chunks; None where the tiles do not take the rows. The default model's
    greedy decode then picks on the head's tiles, the same tokens as with logprobs asked
    (which reads the logits)."""
    torch.manual_seed(6)
    base = name.split()[0]
    qtype = 208 if name.endswith("one part") else TYPES[base] + gl.X8
    for n, k, rows in ((1024, 256, (12, 40, 131)), (256, 2048, (300,))):
        tie, tie2, nan, nan2 = n * 5 // 16, n * 7 // 8, n // 3, n * 5 // 8  # both halves
        w = torch.randn(n, k) * 0.1
        w[tie2] = w[tie] = w[tie] * 4  # equal columns, largest for many rows
        blocks = gguf_blocks(w, base)
        for c in (nan, nan + 40, nan2):  # float16 NaN scales: NaN columns
            blocks[c, :2] = torch.tensor([0, 0x7E], dtype=torch.uint8)
        packed = gl.interleave(blocks, TYPES[base], k)
        for m in rows:
            x = torch.randn(m, k).to(torch.bfloat16).float()
            ref = kernels.argmax_rows(kernels.linear_gguf(x, packed, qtype))
            got = kernels.argmax_gguf(x, packed, qtype)
            assert got is not None and torch.equal(got, ref), (n, m)
            assert torch.equal(kernels.argmax_gguf(x.to(torch.bfloat16), packed, qtype), ref)
        if n == 1024:
            assert (ref == nan).all()  # every row meets the first NaN column
            clean = gl.interleave(gguf_blocks(w, base), TYPES[base], k)
            x = torch.randn(64, k).to(torch.bfloat16).float()
            ref = kernels.argmax_rows(kernels.linear_gguf(x, clean, qtype))
            assert (ref == tie).any() and not (ref == tie2).any()
            assert torch.equal(kernels.argmax_gguf(x, clean, qtype), ref)
    x = torch.randn(40, 256)
    assert kernels.argmax_gguf(x, packed[:256], qtype) is None  # not bf16's values
    assert kernels.argmax_gguf(x[:11].to(torch.bfloat16), packed[:256], qtype) is None
    # the engine: greedy rows pick on the tiles, as the logits they would have given
    from deepserve import SamplingParams

    runner = llm_bf16.engine.runner
    calls = []
    pick = runner.model.greedy_tokens
    runner.model.greedy_tokens = lambda h: calls.append(h.shape[0]) or pick(h)
    try:
        prompts = [f"Tell me about the number {i}." for i in range(16)]
        plain = llm_bf16.generate(prompts, SamplingParams(max_tokens=8, temperature=0))
        read = llm_bf16.generate(prompts, SamplingParams(max_tokens=8, temperature=0,
                                                         logprobs=1))
    finally:
        del runner.model.greedy_tokens
    assert calls and max(calls) == 16
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in read]


def test_amx_tiles_give_the_default_models_greedy_tokens(amx_tiles):
    """The default model in bf16 with its batches on AMX tiles (bf16 activations) and on
    the VNNI kernel (8-bit activations): the same first greedy tokens for nearly every
    prompt (rounding moves only near-ties), 21 prompts at once so decode steps have 16
    rows and more."""
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = PROMPTS * 3
    llm = LLM(dtype="bfloat16", show_progress=False, kv_cache_memory="64MiB")
    tiles = [o.token_ids for o in llm.generate(prompts, greedy)]
    kernels.set_amx(False)
    try:
        vnni = [o.token_ids for o in llm.generate(prompts, greedy)]
    finally:
        kernels.set_amx(True)
    agree = sum(a[:4] == b[:4] for a, b in zip(tiles, vnni, strict=True))
    assert agree >= len(prompts) - 3, (agree, len(prompts))
    assert "Paris" in llm.tokenizer.decode(tiles[0])


@pytest.mark.skipif(not kernels.available(), reason="needs the CPU kernels")
def test_q8_0_blocks_give_the_float32_greedy_tokens():
    """Q8_0 through the 8-bit kernel against float32 matmuls over the very same
    dequantized Q8_0 weights (kernels off): only the activations' 8-bit rounding
    differs, and greedy decoding must not notice."""
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    fast = LLM(dtype="float32", quantization="int8", show_progress=False,
               kv_cache_memory="64MiB")
    slow = LLM(dtype="float32", quantization="int8", cpu_kernels=False, show_progress=False,
               kv_cache_memory="64MiB")
    a = [o.token_ids for o in fast.generate(PROMPTS, greedy)]
    b = [o.token_ids for o in slow.generate(PROMPTS, greedy)]
    assert a == b


def test_dense_copy_for_large_batches_gives_the_same_tokens(monkeypatch):
    """Where bf16 GEMMs are native, block layers keep a bf16 copy for large batches;
    both sides of DENSE_ROWS compute the same checkpoint weights."""
    from deepserve.engine import setup

    monkeypatch.setenv("DEEPSERVE_DENSE_COPY", "1")  # always, not measured (copies_pay)
    if not (kernels.available() and setup.dense_for_batches()):
        pytest.skip("no native bf16 GEMM here: block layers keep no dense copy")
    llm = LLM(dtype="bfloat16", show_progress=False, kv_cache_memory="64MiB")
    layer = llm.engine.model.layers[0].down_proj
    assert layer.dense is not None
    x = torch.randn(gl.DENSE_ROWS + 8, layer.in_features, dtype=torch.bfloat16)
    big = layer(x).float()
    small = torch.cat([layer(x[i:i + 1]) for i in range(x.shape[0])]).float()
    assert ((big - small).abs().max() / small.abs().max()) < 0.03
    monkeypatch.setenv("DEEPSERVE_DENSE_COPY", "0")
    lean = LLM(dtype="bfloat16", show_progress=False, kv_cache_memory="64MiB")
    assert lean.engine.model.layers[0].down_proj.dense is None
    assert lean.engine.weight_bytes < llm.engine.weight_bytes


def test_warm_up_is_short_when_every_layer_runs_on_blocks(caplog, monkeypatch):
    """With no bf16 copies the warm-up is one 4-token request; with copies (oneDNN's
    first calls are slow) it runs the long prefill and batches 1/8/32."""
    from deepserve.engine import setup
    from deepserve.engine.warmup import blocks_only, warm_up

    caplog.set_level("INFO", logger="deepserve.engine.warmup")
    for copies in ("0", "1"):
        monkeypatch.setenv("DEEPSERVE_DENSE_COPY", copies)
        if copies == "1" and not (kernels.available() and setup.dense_for_batches()):
            continue
        llm = LLM(dtype="bfloat16", show_progress=False, kv_cache_memory="64MiB")
        caplog.clear()
        warm_up(llm.engine)
        assert blocks_only(llm.engine.model) is (copies == "0")
        short = "warm-up: 1 x 4 tokens in" in caplog.text
        assert short is blocks_only(llm.engine.model), caplog.text
        assert not llm.engine.has_unfinished()
        del llm


def test_bf16_copies_for_large_batches_only_within_their_memory_budget(caplog):
    """An 8B model's bf16 copies would be 16 GB: the copies are made only when all of
    them fit a quarter of free memory (and 2 GiB); else the blocks serve every batch."""
    from deepserve.engine.setup import keep_dense_copies

    torch.manual_seed(6)
    model = torch.nn.Sequential(*[gl.GGUFLinear(gl.quantize(torch.randn(64, 128), gl.Q4_1),
                                                gl.Q4_1, 128) for _ in range(3)])
    caplog.set_level("INFO", logger="deepserve.engine.llm_engine")
    assert not keep_dense_copies(model, torch.bfloat16, free=4 * 3 * 64 * 128 * 2 - 4)
    assert all(m.dense is None for m in model) and "over the" in caplog.text
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # (oneDNN packs bf16 copies only where this CPU has bf16)
        assert keep_dense_copies(model, torch.bfloat16, free=4 * 3 * 64 * 128 * 2)
        assert all(m.dense is not None for m in model)


def test_copies_are_kept_only_where_they_measured_faster(caplog, monkeypatch):
    """DEEPSERVE_DENSE_COPY unset: one block layer is timed on its blocks and on a bf16
    copy at 32 rows, and the copies are kept only when the copy was 1.25x faster; the
    log gives both figures, timed only once ``settle()`` (the engine's tokenizer load)
    has returned. Where the blocks run on AMX tiles, never (the log says so). A wrong
    setting is refused with the three it takes."""
    import re

    from deepserve.engine import setup
    from deepserve.errors import DeepserveError

    if not (kernels.available() and setup.dense_for_batches()):
        pytest.skip("no native bf16 GEMM here: block layers keep no dense copy")
    torch.manual_seed(7)
    model = torch.nn.Sequential(*[gl.GGUFLinear(gl.quantize(torch.randn(256, 512), gl.Q4_1),
                                                gl.Q4_1, 512) for _ in range(2)])
    for m in model:
        m.use_kernel = True
        m.interleave_blocks()
    caplog.set_level("INFO", logger="deepserve.engine.llm_engine")
    order, timed = [], kernels.linear_gguf
    monkeypatch.setattr(kernels, "linear_gguf", lambda *a: order.append("timed") or timed(*a))
    pays = setup.copies_pay(model, torch.bfloat16, settle=lambda: order.append("settled"))
    assert all(m.dense is None for m in model)  # the probe's copy is not kept
    assert kernels.amx() or order[:2] == ["settled", "timed"], order
    if kernels.amx():  # the blocks on AMX tiles keep the one-call layer: never copies
        assert not pays and "the blocks run on AMX tiles" in caplog.text
    else:
        found = re.search(r"blocks (\d+) GFLOP/s, bf16 copy (\d+) GFLOP/s", caplog.text)
        assert found, caplog.text
        blocks, copy = (float(v) for v in found.groups())
        if abs(copy / blocks - setup.COPY_MARGIN) > 0.1:  # clear of rounding in the log
            assert pays == (copy > setup.COPY_MARGIN * blocks), caplog.text
        assert ("kept, faster on this CPU" in caplog.text) == pays
    monkeypatch.setenv("DEEPSERVE_DENSE_COPY", "sometimes")
    with pytest.raises(DeepserveError, match=r"auto .* 1 .* 0"):
        setup.dense_mode()


@pytest.mark.parametrize("qtype", [2, 3, 6, 12])
def test_interleave_kernel_equals_the_torch_reordering(qtype, each_isa):
    """kernels.interleave_blocks against gguf_linear.interleave's torch copies, also
    from a strided view (a mapped file's rows inside a larger array)."""
    from deepserve import kernels

    torch.manual_seed(1)
    k = 512
    nu, ub, _ = gl._units(qtype, k)
    wide = torch.randint(0, 256, (24, nu * ub + 40), dtype=torch.uint8)
    blocks = wide[:, 8:8 + nu * ub]  # rows in place, row stride larger than the row
    fields = [x for field in gl.HEADS[qtype] for x in field]
    got = kernels.interleave_blocks(blocks, fields, nu, ub)
    state = kernels._state.pop("ok")  # the torch path
    try:
        ref = gl.interleave(blocks.contiguous(), qtype, k)
    finally:
        kernels._state["ok"] = state
    assert torch.equal(got, ref)


@pytest.mark.parametrize("qtype", [2, 3, 8])
def test_experts_interleaved_straight_into_place(qtype, each_isa):
    """The loader's one copy for experts: gate and up blocks [E, I, bytes] written into
    the two halves of gate_up [E, 2I, bytes] (strided slices), equal to interleaving
    each expert's concatenated rows."""
    torch.manual_seed(2)
    e, inter, k = 3, 16, 256
    nbytes = k // gl.QK * gl.BLOCK_BYTES[qtype]
    gate, up = (torch.randint(0, 256, (e, inter, nbytes), dtype=torch.uint8) for _ in "gu")
    out = torch.full((e, 2 * inter, nbytes), 7, dtype=torch.uint8)
    gl.interleave_into(gate, out[:, :inter], qtype, k)
    gl.interleave_into(up, out[:, inter:], qtype, k)
    for x in range(e):
        assert torch.equal(out[x], gl.interleave(torch.cat([gate[x], up[x]]), qtype, k))
    with pytest.raises(RuntimeError, match="rows"):  # 8-row groups only
        gl.interleave_into(gate[:, :12], out[:, :12], qtype, k)
