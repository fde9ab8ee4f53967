"""What a model needs to run split across tensor-parallel ranks (``engine/parallel.py``
starts the ranks): its shard of the configuration and weights, and the all-reduce after
each row-parallel projection."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from deepserve.models.config import ModelConfig


@dataclass(frozen=True)
class Shard:
    """This process's part of a model split ``size`` ways by heads and MLP rows."""

    rank: int
    size: int
    full: ModelConfig

    @property
    def local(self) -> ModelConfig:
        f = self.full
        return dataclasses.replace(f, num_heads=f.num_heads // self.size,
                                   num_kv_heads=f.num_kv_heads // self.size,
                                   intermediate_size=f.intermediate_size // self.size)

    def rows(self, t: torch.Tensor, local: int) -> torch.Tensor:
        """This rank's ``local`` rows of a column-parallel weight (or bias)."""
        return t[self.rank * local:(self.rank + 1) * local]

    def cols(self, t: torch.Tensor, local: int, per_col: int = 1) -> torch.Tensor:
        """This rank's ``local`` input columns of a row-parallel weight; ``per_col``
        bytes per column for GGUF blocks (``local`` a whole number of blocks)."""
        lo = self.rank * local * per_col
        return t[:, lo:lo + local * per_col].contiguous()


def all_reduce(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``t`` over the tensor-parallel group (a gloo process group), in place (no
    group: ``t``). Half-precision partial sums are added in float32, rounded once."""
    if group is None:
        return t
    wide = t if t.dtype == torch.float32 else t.float()
    group.allreduce([wide]).wait()
    return t if wide is t else t.copy_(wide)


def set_group(model: torch.nn.Module, group: Any) -> None:
    for layer in model.layers:
        layer.tp_group = group
