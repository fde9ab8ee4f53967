"""Linear and embedding layers whose weights stay in GGUF blocks (Q4_0, Q4_1, Q8_0).

A GGUF checkpoint's quantized tensors are used as the file stores them: no dequantize
then requantize, so the model computes with exactly the checkpoint's weights and reads
a quarter (Q4) to a half (Q8_0) of the bytes a bf16 copy would. ``--quantization
int8|int4|mixed`` quantizes a full-precision checkpoint into the same blocks (Q8_0 and
Q4_1), so every weight format runs through one kernel family,
``kernels.linear_gguf``, with AVX-512, AVX2 and portable builds.

Without the C++ kernels these layers dequantize in torch on each call: the same
results, only slower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepserve import kernels
from deepserve.layers import kquants
from deepserve.layers.kquants import Q4_K, Q5_0, Q5_1, Q6_K
from deepserve.layers.linear import KernelLayer

Q4_0, Q4_1, Q8_0 = 2, 3, 8
# Bytes per 32 weights as a layer keeps them (Q5_x and K-quants as rewritten by
# layers/kquants.py).
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q5_0: 24, Q5_1: 24, Q8_0: 34, Q4_K: 19, Q6_K: 40}
NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1", Q8_0: "Q8_0", Q4_K: "Q4_K",
         Q6_K: "Q6_K"}
# The fields, as (count, bytes), that open a unit (a block; for Q4_K a super-block of 256)
# of a type the 8-bit dot kernel runs interleaved: fp16 d; fp16 d and m; Q4_K's fp32 d
# and -dmin, then 8 sub-block scales and 8 mins. The codes follow as 4-byte words (16
# bytes of nibbles per 32 weights, and for Q5_x 4 bytes of fifth bits).
HEADS = {Q4_0: ((1, 2),), Q4_1: ((2, 2),), Q4_K: ((2, 4), (8, 1), (8, 1)),
         Q5_0: ((2, 2),), Q5_1: ((2, 2),)}
# Q8_0 takes the same layout only as the output head's copy for batches (keep_batch_blocks)
LAYOUT = {**HEADS, Q8_0: ((1, 2),)}
UNIT = {Q4_K: 256}  # weights per interleaved unit where not QK
# types whose kernel reads only the interleaved order
X8_ONLY = (Q4_K, Q5_0, Q5_1)
QK = 32
# The kernels' code for a 4-bit type's blocks interleaved eight rows at a time (see
# ``interleave``): the GGUF type plus this.
X8 = 100
# Interleaved Q8_0 against rows in one 8-bit part per block of 32, as llama.cpp computes a
# Q8_0 head (other Q8_0 layers' rows go in two parts, about 15 bits): the output head of
# a bf16 model, half the instructions at batches, at the cost of 0.0006 nats of mean KL
# to float32 on the default model (0.0034 -> 0.0040, benchmarks/quality.py).
Q8_0_HEAD = 200 + Q8_0
# Rows above which a layer with a dense bf16 copy uses it. Measured on a 2-core AVX-512
# BF16 CPU over a whole decode step (benchmarks/decode_step.py, Q4_1 model): the
# 8-bit dot kernel wins at 1-8 rows, oneDNN's bf16 GEMM from about 16 up.
DENSE_ROWS = 8


def dequantize(blocks: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """[N, bytes] uint8 blocks -> [N, k] float32 (torch ops only)."""
    if qtype in kquants.REWRITTEN:
        return kquants.dequantize_kept(blocks, qtype, k)
    n, nb = blocks.shape[0], k // QK
    b = blocks.reshape(n, nb, BLOCK_BYTES[qtype])
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [n, nb, 1]
    if qtype == Q8_0:
        q = b[..., 2:].contiguous().view(torch.int8).float()
        return (q * d).reshape(n, k)
    codes = b[..., 4:] if qtype == Q4_1 else b[..., 2:]
    q = torch.cat([codes & 0x0F, codes >> 4], dim=-1).float()
    m = b[..., 2:4].contiguous().view(torch.float16).float() if qtype == Q4_1 else -8.0 * d
    return (q * d + m).reshape(n, k)


def _units(qtype: int, k: int) -> tuple[int, int, int]:
    """(units per row, bytes per unit, header bytes) of an interleaved type."""
    unit = UNIT.get(qtype, QK)
    return k // unit, unit // QK * BLOCK_BYTES[qtype], sum(c * s for c, s in LAYOUT[qtype])


def interleave(blocks: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """Blocks of a type in ``HEADS`` ``[N, bytes]`` (N a multiple of 8) reordered for the
    kernels: rows 8g .. 8g + 7 keep unit u together, each header field for the 8 rows
    first (field i of rows 0..7, then field i + 1), then 32-byte vectors (four of
    nibbles per 32 weights, and for Q5_x one of fifth bits) whose 4-byte word r holds row
    r's bytes 4t .. 4t + 3. The same bytes, so the same weights; the shape is unchanged."""
    nu, ub, hb = _units(qtype, k)
    if kernels.loaded() and blocks.dim() == 2 and blocks.stride(1) == 1:
        # one pass in C++ (the strided torch copies below took 2.7 s for a 2.4 GB file)
        fields = [x for field in LAYOUT[qtype] for x in field]
        return kernels.interleave_blocks(blocks, fields, nu, ub)
    n, g = blocks.shape[0], blocks.shape[0] // 8
    b = blocks.reshape(g, 8, nu, ub)
    out = torch.empty(g, nu, 8 * ub, dtype=torch.uint8)
    # strided copies straight into place (a cat of permuted copies took 3 ms a layer)
    at = 0
    for cnt, size in LAYOUT[qtype]:
        out[..., 8 * at:8 * (at + cnt * size)].unflatten(-1, (cnt, 8, size)).copy_(
            b[..., at:at + cnt * size].unflatten(-1, (cnt, size)).permute(0, 2, 3, 1, 4))
        at += cnt * size
    out[..., 8 * hb:].unflatten(-1, ((ub - hb) // 4, 8, 4)).copy_(
        b[..., hb:].unflatten(-1, ((ub - hb) // 4, 4)).permute(0, 2, 3, 1, 4))
    return out.reshape(n, nu * ub)


def interleave_into(blocks: torch.Tensor, out: torch.Tensor, qtype: int, k: int) -> None:
    """``interleave`` of ``blocks`` [A, R, bytes] (e.g. a mapped file's expert tensor)
    written into ``out`` of the same shape (e.g. a slice of a larger tensor): the one copy
    an interleaved layer's blocks take from the file."""
    if kernels.loaded():
        nu, ub, _ = _units(qtype, k)
        kernels.interleave_blocks_into(blocks, out, [x for f in LAYOUT[qtype] for x in f],
                                       nu, ub)
        return
    for a in range(blocks.shape[0]):
        out[a].copy_(interleave(blocks[a], qtype, k))


def deinterleave(packed: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """The inverse of ``interleave``: the file's own block order."""
    n, g = packed.shape[0], packed.shape[0] // 8
    nu, ub, hb = _units(qtype, k)
    p = packed.reshape(g, nu, 8 * ub)
    parts, at = [], 0
    for cnt, size in LAYOUT[qtype]:
        field = p[..., 8 * at:8 * (at + cnt * size)].reshape(g, nu, cnt, 8, size)
        parts.append(field.permute(0, 3, 1, 2, 4).reshape(g, 8, nu, cnt * size))
        at += cnt * size
    codes = p[..., 8 * hb:].reshape(g, nu, (ub - hb) // 4, 8, 4).permute(0, 3, 1, 2, 4)
    parts.append(codes.reshape(g, 8, nu, ub - hb))
    return torch.cat(parts, dim=-1).reshape(n, nu * ub)


def quantize(w: torch.Tensor, qtype: int) -> torch.Tensor:
    """[N, K] float weights -> [N, K / 32 * bytes] uint8 GGUF blocks."""
    n, k = w.shape
    if qtype not in (Q8_0, Q4_1):
        raise ValueError(f"quantize: GGUF type {qtype} is not Q8_0 or Q4_1")
    if k % QK:
        raise ValueError(f"in_features {k} is not a multiple of {QK}")
    g = w.float().reshape(n, k // QK, QK)
    if qtype == Q8_0:
        d = (g.abs().amax(-1, keepdim=True) / 127.0).half()
        inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros_like(d, dtype=torch.float))
        q = torch.round(g * inv).clamp(-127, 127).to(torch.int8)
        parts = [d.view(torch.uint8), q.view(torch.uint8)]
    else:  # Q4_1: w = d * q + m, q in 0..15
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        d = ((hi - lo) / 15.0).half()
        m = lo.half()
        inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros_like(lo))
        q = torch.round((g - m.float()) * inv).clamp(0, 15).to(torch.uint8)
        codes = q[..., :16] | (q[..., 16:] << 4)
        parts = [d.view(torch.uint8), m.view(torch.uint8), codes]
    return torch.cat(parts, dim=-1).reshape(n, -1).contiguous()


class GGUFLinear(KernelLayer, nn.Module):
    """y = x W^T (+ b), W as GGUF blocks ``[out_features, in_features / 32 * bytes]``
    (Q5_x and K-quants in the layout ``kquants.keep`` writes; kept Q4_K and Q5_x are
    interleaved at once, as their kernel reads only that order)."""

    def __init__(self, blocks: torch.Tensor, qtype: int, in_features: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if qtype not in BLOCK_BYTES:
            raise ValueError(f"GGUF type {qtype} is not one of {', '.join(NAMES.values())}")
        if blocks.dtype != torch.uint8 or blocks.shape[1] != in_features // QK * BLOCK_BYTES[qtype]:
            raise ValueError(f"blocks {tuple(blocks.shape)} do not hold rows of {in_features} "
                             f"{NAMES[qtype]} weights")
        self.register_buffer("blocks", blocks.contiguous(), persistent=False)
        self.qtype = qtype
        self.kernel_qtype = qtype  # qtype + X8 once interleave_blocks() has run
        self.in_features = in_features
        self.out_features = blocks.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.register_buffer("dense", None, persistent=False)  # oneDNN copy, large batches
        # Q8_0 interleaved, for batches of more than DENSE_ROWS rows (keep_batch_blocks)
        self.register_buffer("batch_blocks", None, persistent=False)
        self.batch_qtype = Q8_0 + X8
        self.dense_bias: torch.Tensor | None = None
        if qtype in X8_ONLY:
            if self.out_features % 8:
                raise ValueError(f"{NAMES[qtype]} blocks need a multiple of 8 rows, not "
                                 f"{self.out_features}")
            self.interleave_blocks()

    def interleave_blocks(self) -> bool:
        """Reorder 4-bit blocks eight rows at a time for the kernels (``interleave``), and
        Q8_0 blocks for the 8-bit-activation kernels of AVX-512 and AVX2 (rows as two 8-bit
        parts, 2e-5 of the output scale: 2.2x the float-row kernel at one row, 2x at 8);
        False where the layout does not apply (rows not a multiple of 8, or of 16 for
        Q8_0)."""
        if self.qtype == Q8_0 and self.kernel_qtype == Q8_0 and self.out_features % 16 == 0 \
                and kernels.loaded() and kernels.isa() in ("avx512", "avx2"):
            self.blocks = interleave(self.blocks, Q8_0, self.in_features)
            self.kernel_qtype = Q8_0 + X8
            return True
        if (self.qtype not in HEADS or self.out_features % 8
                or self.kernel_qtype != self.qtype):
            return False
        self.blocks = interleave(self.blocks, self.qtype, self.in_features)
        self.kernel_qtype = self.qtype + X8
        return True

    def file_blocks(self) -> torch.Tensor:
        """The blocks in the file's own order."""
        if self.kernel_qtype == self.qtype:
            return self.blocks
        return deinterleave(self.blocks, self.qtype, self.in_features)

    def keep_dense(self, dtype: torch.dtype) -> None:
        """Keep a oneDNN-packed ``dtype`` copy of the dequantized weight: batches above
        ``DENSE_ROWS`` rows use it (where bf16 GEMMs run natively they beat the 8-bit
        dot kernel there; see ``DENSE_ROWS``)."""
        with torch.no_grad():
            if self.use_kernel and self.qtype in (Q4_0, Q4_1, Q8_0):
                rows = torch.arange(self.out_features)
                w = kernels.gguf_rows(self.file_blocks(), rows, self.qtype,
                                      self.in_features).to(dtype)
            else:
                w = self.dequantized().to(dtype)
            self.dense = torch.ops.mkldnn._reorder_linear_weight(w)
            self.dense_bias = None if self.bias is None else self.bias.to(dtype)

    def keep_batch_blocks(self, shared: bool = True, one_part: bool = True) -> bool:
        """A Q8_0 layer (the output head: a large vocabulary, often tied to the embedding
        table, which reads the file's order) runs on its blocks interleaved for the
        8-bit-activation kernels (AVX-512 or AVX2), against rows in one 8-bit part
        (``one_part``: ``Q8_0_HEAD``, 5e-3 of the output scale; the default model's head at
        64 rows 5.7 ms, half of two parts' time, and at one row its 30 MB of blocks at
        memory speed) or two (2e-5). With ``shared`` (an embedding reads the same blocks)
        the interleaved blocks are a copy, ``batch_blocks``; otherwise they replace the
        file's order, as ``interleave_blocks`` does for any Q8_0 layer. False where that
        does not apply."""
        if not (self.use_kernel and self.qtype == Q8_0 and self.kernel_qtype == Q8_0):
            return False
        kind = Q8_0_HEAD if one_part else Q8_0 + X8
        if not shared:
            if not self.interleave_blocks():
                return False
            self.kernel_qtype = kind
            return True
        if self.out_features % 16 or kernels.isa() not in ("avx512", "avx2"):
            return False
        self.batch_blocks = interleave(self.blocks, Q8_0, self.in_features)
        self.batch_qtype = kind
        return True

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {NAMES[self.qtype]}"

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.file_blocks(), self.qtype, self.in_features)

    def float_rows_ok(self, rows: int) -> bool:
        """Whether ``rows`` float32 rows would run on the block kernels (which then return
        float32) rather than on the bf16 copy or torch."""
        return (self.dense is None or rows <= DENSE_ROWS) and (
            self.batch_blocks is not None or self.use_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.dense is not None and x2.shape[0] > DENSE_ROWS and x2.dtype == torch.bfloat16:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.dense, self.dense_bias, "none",
                                                   [], "")
        elif self.batch_blocks is not None:
            y = kernels.linear_gguf(x2, self.batch_blocks, self.batch_qtype, self.bias)
        elif self.use_kernel:
            y = kernels.linear_gguf(x2, self.blocks, self.kernel_qtype, self.bias)
        else:
            y = F.linear(x2.float(), self.dequantized(), self.bias).to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each row's ``self(x).argmax(-1)`` for float32 rows, from the AMX tiles without
        writing the outputs (``kernels.argmax_gguf``); None where they do not take it."""
        if self.bias is not None or x.dim() != 2 or not self.float_rows_ok(x.shape[0]):
            return None
        if self.batch_blocks is not None:
            return kernels.argmax_gguf(x, self.batch_blocks, self.batch_qtype)
        return kernels.argmax_gguf(x, self.blocks, self.kernel_qtype)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of this fused gate_up projection in one pass on AMX tiles, bit
        for bit ``silu_mul(self(x))``; None where the tiles do not take it."""
        if self.use_kernel and self.bias is None and self.batch_blocks is None and \
                (self.dense is None or x.shape[0] <= DENSE_ROWS) and x.dim() == 2:
            return kernels.swiglu_gguf(x, self.blocks, self.kernel_qtype)
        return None


class GGUFParts(nn.Module):
    """A fused projection whose parts the file stores in different block types (Q4_K_M
    files keep q and k in Q4_K and v in Q6_K): one ``GGUFLinear`` per part, outputs side
    by side, then the fused bias."""

    def __init__(self, parts: list[GGUFLinear], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([p(x) for p in self.parts], dim=-1)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class GGUFEmbedding(KernelLayer, nn.Module):
    """Token embeddings looked up in a GGUF block table (rows dequantized on demand: by
    the kernel for Q4_0 / Q4_1 / Q8_0, in torch for kept Q6_K)."""

    def __init__(self, blocks: torch.Tensor, qtype: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("blocks", blocks.contiguous(), persistent=False)
        self.qtype, self.dim, self.dtype = qtype, dim, dtype
        self.num_embeddings = blocks.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self.use_kernel and self.qtype in (Q4_0, Q4_1, Q8_0):
            rows = kernels.gguf_rows(self.blocks, flat, self.qtype, self.dim)
        else:
            rows = dequantize(self.blocks[flat], self.qtype, self.dim)
        return rows.to(self.dtype).reshape(*ids.shape, self.dim)
