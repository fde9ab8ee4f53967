"""Linear layer for CPU decode and prefill: small batches through deepserve's kernel,
larger ones through oneDNN with the weight packed once.

For a handful of rows (decode at low concurrency) a matmul is bound by reading the
weights, and torch's bf16 CPU matmul reads them at a fraction of memory speed there
(measured 4x slower than ``kernels.linear_small`` for the 576x49152 output layer at one
row). Above ``kernels.SMALL_ROWS`` rows a GEMM wins. ``F.linear`` re-lays-out the weight
for oneDNN on every call; packing it once at load (``mkldnn._reorder_linear_weight``)
made all of a step's matmuls 20-35% faster from 8 to 2048 rows (measured: 15.3 -> 12.0 ms
per decode step at 32 rows). The packed copy costs the weight's memory a second time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepserve import kernels


class KernelLayer:
    """A layer with a CPU-kernel path. ``use_kernel`` is the engine's one decision
    (``engine.setup.use_cpu_kernels``), handed to every such layer by enable_kernels."""

    use_kernel = False


class Linear(KernelLayer, nn.Linear):
    """``nn.Linear`` whose forward uses ``linear_small`` for a few rows when enabled."""
    packed: torch.Tensor | None = None  # oneDNN layout of weight, set by pack()

    def pack(self) -> None:
        """Keep a oneDNN-packed copy of the weight for GEMMs (CPU, bf16 or fp32)."""
        w = self.weight
        if (w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float32)
                and torch.backends.mkldnn.is_available()
                and (w.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())):
            with torch.no_grad():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            if self.use_kernel and x.shape[0] <= kernels.SMALL_ROWS:
                return kernels.linear_small(x, self.weight, None, self.bias)
            if self.packed is not None and x.dtype == self.weight.dtype:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [],
                                                          "")
        return F.linear(x, self.weight, self.bias)


def enable_kernels(model: nn.Module, on: bool) -> None:
    """Turn the small-batch kernel on or off for every layer of ``model`` that has one."""
    for module in model.modules():
        if isinstance(module, KernelLayer):
            module.use_kernel = on


def pack_weights(model: nn.Module) -> None:
    """Pack every plain ``Linear`` weight for oneDNN (see the module docstring)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.pack()
