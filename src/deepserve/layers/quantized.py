"""Weight-only quantized linear layers: int8 per output channel, int4 group-wise.

Kernels were chosen by measurement on a 2-core AVX-512 CPU (torch 2.13): torch's
int8 (``_weight_int8pack_mm``) and packed-int4 (``_weight_int4pack_mm_for_cpu``)
kernels run 2-3x faster than a bf16 matmul for one or two rows, because they read
2-4x fewer weight bytes, but 2-4x slower from about 8 rows up, where bf16 matmuls
are compute-bound and well tuned. So each layer uses the quantized kernel for small
batches (decode at low concurrency) and, for larger ones, dequantizes its weight to
the compute dtype on the fly and runs the bf16 matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepserve import kernels
from deepserve.config import QUANTIZATIONS  # noqa: F401 (re-exported)
from deepserve.layers.linear import KernelLayer

SMALL_BATCH_ROWS = 4  # at or below this many rows the quantized kernel is faster


class Int8Linear(KernelLayer, nn.Module):
    """y = x W^T (+ b) with W stored as int8 and one scale per output channel.

    Up to ``kernels.SMALL_ROWS_INT8`` rows use deepserve's ``linear_small`` kernel when
    enabled (it streams the int8 rows at memory speed and multiplies them in bf16, never
    materializing a dequantized weight), else torch's ``_weight_int8pack_mm`` for a few
    rows; larger batches dequantize and run a GEMM, or use ``dense`` when one is kept.
    """


    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        super().__init__()
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scales", scale.to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.dtype = dtype
        self.out_features, self.in_features = q.shape
        # Full-precision layer for large batches, when one is kept (assigning a module
        # later registers it; a class-level None would shadow it).
        self.dense: nn.Module | None = None

    def dequantized(self) -> torch.Tensor:
        return self.qweight.to(self.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.dense is not None and x2.shape[0] > kernels.SMALL_ROWS:
            y = self.dense(x2)
        elif self.use_kernel and x2.shape[0] <= kernels.SMALL_ROWS_INT8:
            y = kernels.linear_small(x2, self.qweight, self.scales, self.bias)
        else:
            if x2.shape[0] <= SMALL_BATCH_ROWS and x2.device.type == "cpu":
                y = torch._weight_int8pack_mm(x2, self.qweight, self.scales)
            else:
                y = F.linear(x2, self.dequantized())
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class Int4Linear(KernelLayer, nn.Module):
    """y = x W^T (+ b) with W in 4 bits, asymmetric, one scale and zero per group.

    Up to ``SMALL_BATCH_ROWS`` rows use torch's packed int4 kernel (measured faster than
    deepserve's at 1 row: 5.3 vs 7.2 ms per decode step); from there up to
    ``kernels.SMALL_ROWS_INT8`` rows (bf16, group 32, AVX512-BF16) deepserve's
    ``linear_int4``, which unpacks each 16-row block to bf16 once and runs the bf16 dot
    kernel over it (batch-32 decode step 49 -> 30 ms); larger batches dequantize + GEMM.
    """


    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 group_size: int = 32) -> None:
        super().__init__()
        n, k = weight.shape
        if k % group_size:
            raise ValueError(f"in_features {k} is not a multiple of group size {group_size}")
        w = weight.float().reshape(-1, group_size)
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        scale = ((hi - lo) / 15.0).clamp(min=1e-8)
        q = torch.round((w - lo) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
        # The packed kernel's convention: w = (q - 8) * scale + zero, zero = lo + 8 * scale.
        zero = lo + 8 * scale
        sz = torch.cat([scale.reshape(n, -1, 1), zero.reshape(n, -1, 1)], dim=2)
        self.register_buffer("scales_and_zeros", sz.transpose(0, 1).contiguous().to(dtype))
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 2))
        self.register_buffer("q8", q.to(torch.uint8))  # unpacked, for the large-batch path
        self.register_buffer("scales", scale.reshape(n, -1).to(dtype))
        self.register_buffer("lows", lo.reshape(n, -1).to(dtype))
        if group_size == 32:  # deepserve's int4 kernel: nibbles plus float32 scale and low
            self.register_buffer("nibbles", kernels.pack_int4(q))
            self.register_buffer("scales32", scale.reshape(n, -1).float().contiguous())
            self.register_buffer("lows32", lo.reshape(n, -1).float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.dtype = dtype
        self.group_size = group_size
        self.out_features, self.in_features = n, k

    def dequantized(self) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        q = self.q8.to(self.dtype).reshape(n, k // g, g)
        return (q * self.scales[..., None] + self.lows[..., None]).reshape(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if (self.use_kernel and SMALL_BATCH_ROWS < x2.shape[0] <= kernels.SMALL_ROWS_INT8
                and self.group_size == 32 and x2.dtype == torch.bfloat16
                and kernels.has_bf16_dot()):
            return kernels.linear_int4(x2, self.nibbles, self.scales32, self.lows32,
                                       self.bias).reshape(*shape[:-1], self.out_features)
        if x2.shape[0] <= SMALL_BATCH_ROWS and x2.device.type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size,
                                                  self.scales_and_zeros)
        else:
            y = F.linear(x2, self.dequantized())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)




def quantize_model(model: nn.Module, method: str, dtype: torch.dtype,
                   group_size: int = 32) -> None:
    """Replace the decoder's linear layers in place, and the output projection by an
    int8 copy (in every method: at batch 1 it is a fifth of the bytes read per token).
    The embedding table stays in the compute dtype (one row is read per token).

    ``int8``: every projection int8; ``int4``: every projection int4; ``mixed``: the MLP
    (most of the weights) int4 and attention int8.
    """
    if method == "none":
        return
    for layer in model.layers:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            lin = getattr(layer, name)
            is_mlp = name in ("gate_up_proj", "down_proj")
            bits = 8 if method == "int8" or (method == "mixed" and not is_mlp) else 4
            w, b = lin.weight.data, None if lin.bias is None else lin.bias.data
            if bits == 4 and w.shape[1] % group_size == 0:
                new: nn.Module = Int4Linear(w, b, dtype, group_size)
            else:
                new = Int8Linear(w, b, dtype)
            setattr(layer, name, new)
    # Large batches keep using the full-precision head: its weight is the embedding
    # table's (tied) or already loaded, and dequantizing 49k rows per step would cost
    # more than the matmul.
    head = model.lm_head
    model.lm_head = Int8Linear(head.weight.data, None if head.bias is None else head.bias.data,
                               dtype)
    model.lm_head.dense = head


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a forward pass reads (the int4 layers' packed form)."""
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        if type(module).__name__ == "RotaryEmbedding":
            continue
        if isinstance(module, Int4Linear):
            total += module.packed.numel() + module.scales_and_zeros.numel() * 2
            seen.update(id(t) for t in module.buffers())
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(t) in seen or t.dtype not in (torch.int8, torch.bfloat16, torch.float16,
                                                 torch.float32):
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
