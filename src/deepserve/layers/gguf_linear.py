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
from deepserve.layers.linear import KernelLayer

Q4_0, Q4_1, Q8_0 = 2, 3, 8
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}
NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0"}
QK = 32
# Rows above which a layer with a dense bf16 copy uses it. Measured on a 2-core AVX-512
# BF16 CPU over a whole decode step (benchmarks/decode_step.py, Q4_1 model): the
# 8-bit dot kernel wins at 1-8 rows, oneDNN's bf16 GEMM from about 16 up.
DENSE_ROWS = 8


def dequantize(blocks: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """[N, bytes] uint8 blocks -> [N, k] float32 (torch ops only)."""
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
    """y = x W^T (+ b), W as GGUF blocks ``[out_features, in_features / 32 * bytes]``."""

    def __init__(self, blocks: torch.Tensor, qtype: int, in_features: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if qtype not in BLOCK_BYTES:
            raise ValueError(f"GGUF type {qtype} is not one of Q4_0, Q4_1, Q8_0")
        if blocks.dtype != torch.uint8 or blocks.shape[1] != in_features // QK * BLOCK_BYTES[qtype]:
            raise ValueError(f"blocks {tuple(blocks.shape)} do not hold rows of {in_features} "
                             f"{NAMES[qtype]} weights")
        self.register_buffer("blocks", blocks.contiguous(), persistent=False)
        self.qtype = qtype
        self.in_features = in_features
        self.out_features = blocks.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.register_buffer("dense", None, persistent=False)  # oneDNN copy, large batches
        self.dense_bias: torch.Tensor | None = None

    def keep_dense(self, dtype: torch.dtype) -> None:
        """Keep a oneDNN-packed ``dtype`` copy of the dequantized weight: batches above
        ``DENSE_ROWS`` rows use it (where bf16 GEMMs run natively they beat the 8-bit
        dot kernel there; see ``DENSE_ROWS``)."""
        with torch.no_grad():
            if self.use_kernel:
                rows = torch.arange(self.out_features)
                w = kernels.gguf_rows(self.blocks, rows, self.qtype, self.in_features).to(dtype)
            else:
                w = self.dequantized().to(dtype)
            self.dense = torch.ops.mkldnn._reorder_linear_weight(w)
            self.dense_bias = None if self.bias is None else self.bias.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {NAMES[self.qtype]}"

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.blocks, self.qtype, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.dense is not None and x2.shape[0] > DENSE_ROWS and x2.dtype == torch.bfloat16:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.dense, self.dense_bias, "none",
                                                   [], "")
        elif self.use_kernel:
            y = kernels.linear_gguf(x2, self.blocks, self.qtype, self.bias)
        else:
            y = F.linear(x2.float(), self.dequantized(), self.bias).to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


class GGUFEmbedding(KernelLayer, nn.Module):
    """Token embeddings looked up in a GGUF block table (rows dequantized on demand)."""

    def __init__(self, blocks: torch.Tensor, qtype: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("blocks", blocks.contiguous(), persistent=False)
        self.qtype, self.dim, self.dtype = qtype, dim, dtype
        self.num_embeddings = blocks.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self.use_kernel:
            rows = kernels.gguf_rows(self.blocks, flat, self.qtype, self.dim)
        else:
            rows = dequantize(self.blocks[flat], self.qtype, self.dim)
        return rows.to(self.dtype).reshape(*ids.shape, self.dim)
