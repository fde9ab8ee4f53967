"""Linear layer that sends small batches to deepserve's CPU kernel.

For a handful of rows (decode at low concurrency) a matmul is bound by reading the
weights, and torch's bf16 CPU matmul reads them at a fraction of memory speed there
(measured 4x slower than ``kernels.linear_small`` for the 576x49152 output layer at one
row). Above ``kernels.SMALL_ROWS`` rows torch's tuned GEMM wins and is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepserve import kernels


class Linear(nn.Linear):
    """``nn.Linear`` whose forward uses ``linear_small`` for a few rows when enabled."""

    use_kernel = False  # set per model by enable_kernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and x.dim() == 2 and x.shape[0] <= kernels.SMALL_ROWS:
            return kernels.linear_small(x, self.weight, None, self.bias)
        return F.linear(x, self.weight, self.bias)


def enable_kernels(model: nn.Module, on: bool) -> None:
    """Turn the small-batch kernel on or off for every layer of ``model`` that has one."""
    for module in model.modules():
        if hasattr(module, "use_kernel"):
            module.use_kernel = on
