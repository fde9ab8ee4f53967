"""Rotary position embeddings (NeoX half-rotation layout, as in HF Llama/Qwen2).

Checkpoints that rotate adjacent pairs instead (DeepSeek's) have their rotary rows
reordered at load (``loader/weights.py``), so one layout serves every model."""

from __future__ import annotations

import math
from typing import Any

import torch


def inverse_frequencies(head_dim: int, theta: float,
                        scaling: dict[str, Any] | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type")
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv / factor
    if kind == "yarn":
        return _yarn(inv, head_dim, theta, factor, scaling)
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend between.
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        blended = (1 - smooth) * inv / factor + smooth * inv
        return torch.where(mid, blended, scaled)
    from deepserve.errors import ModelLoadError

    raise ModelLoadError(f"rope_scaling type {kind!r} is not supported (supported: linear, "
                         "llama3, yarn)")


def _yarn(inv: torch.Tensor, dim: int, theta: float, factor: float,
          scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN: high frequencies kept, low ones divided by ``factor``, a linear ramp between
    the dimensions that turn ``beta_fast`` and ``beta_slow`` times over the original
    context (the YaRN paper's ``find_correction_range``, truncated to whole dims)."""
    old = float(scaling.get("original_max_position_embeddings") or 4096)
    fast = float(scaling.get("beta_fast") or 32)
    slow = float(scaling.get("beta_slow") or 1)

    def dim_for(rotations: float) -> float:
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for(fast), dim_for(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return inv / factor * (1 - keep) + inv * keep


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(scaling: dict[str, Any] | None) -> float:
    """What YaRN multiplies cos and sin by (1 for other kinds)."""
    if not scaling or scaling.get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling.get("factor", 1.0))
    mscale, all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and all_dim:
        return yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(all_dim))
    return yarn_mscale(factor)


def softmax_mscale(scaling: dict[str, Any] | None) -> float:
    """DeepSeek's extra factor on the attention scale under YaRN: mscale(factor,
    mscale_all_dim) squared (1 without it)."""
    if not scaling or scaling.get("rope_type") in (None, "default"):
        return 1.0
    all_dim = scaling.get("mscale_all_dim")
    if not all_dim:
        return 1.0
    m = yarn_mscale(float(scaling.get("factor", 1.0)), float(all_dim))
    return m * m


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables indexed by absolute position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None, dtype: torch.dtype) -> None:
        super().__init__()
        # Always computed on the CPU: under a meta-device context torch would trace these
        # ops through its compiler stack (1.5 s of the load for nothing).
        with torch.device("cpu"):
            inv = inverse_frequencies(head_dim, theta, scaling)
            t = torch.arange(max_positions, dtype=torch.float64)
            freqs = torch.outer(t, inv)
            emb = torch.cat([freqs, freqs], dim=-1)
            mul = attention_factor(scaling)
        self.register_buffer("cos", (emb.cos() * mul).to(dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * mul).to(dtype), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for these positions, shaped [T, 1, head_dim] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin
