"""One layer's paged KV cache, stored in the compute dtype, int8 or fp8.

Layout: ``[kv_heads, num_slots, head_dim]`` with slot = block * block_size + offset.
``int8`` keeps one scale per (head, slot): K/V vectors are quantized as they are
written and dequantized as they are gathered, halving a bf16 cache's bytes per
token. ``fp8`` stores e4m3 values (no scale: K/V of these models stay well inside its
range) and converts on gather.
"""

from __future__ import annotations

import math
import mmap

import torch

from deepserve.config import KV_DTYPES  # noqa: F401 (re-exported)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On the CPU it lies in a private anonymous memory map: the kernel
    hands out zero pages as they are first written, so a large pool costs nothing to
    create (writing 1.1 GiB of zeros took 0.2-0.3 s of every start) and is resident only
    as far as it is used. Private, not Python's default shared mapping: a shared one is
    backed by shmem, whose first write to a page cost 1.2-1.5 us against 0.9-1.0 us
    (BENCHMARKS.md, eleventh session), paid in the decode steps that fill the pool."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    # the tensor holds a reference to the map
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)


class LayerKV:
    """K and V storage of one layer, with write and gather in the compute dtype."""

    def __init__(self, kv_heads: int, slots: int, head_dim: int, dtype: torch.dtype,
                 kind: str, device: torch.device) -> None:
        self.kind = kind
        self.dtype = dtype
        # Zeroed, not empty: masked-out keys still pass through softmax(..) @ V, and
        # uninitialised memory could hold NaN, which survives multiplication by zero.
        store = {"auto": dtype, "fp16": torch.float16, "int8": torch.int8,
                 "fp8": torch.uint8}[kind]
        self.k = zeros((kv_heads, slots, head_dim), store, device)
        self.v = zeros((kv_heads, slots, head_dim), store, device)
        if kind == "int8":
            self.k_scale = zeros((kv_heads, slots, 1), dtype, device)
            self.v_scale = zeros((kv_heads, slots, 1), dtype, device)

    @staticmethod
    def bytes_per_token_per_layer(kv_heads: int, head_dim: int, dtype: torch.dtype,
                                  kind: str) -> int:
        if kind == "auto":
            return 2 * kv_heads * head_dim * dtype.itemsize
        if kind == "fp8":
            return 2 * kv_heads * head_dim
        if kind == "fp16":
            return 2 * kv_heads * head_dim * 2
        return 2 * kv_heads * (head_dim + dtype.itemsize)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kind == "auto":
            return x, None
        if self.kind == "fp8":
            return x.to(torch.float8_e4m3fn).view(torch.uint8), None
        if self.kind == "fp16":
            return x.to(torch.float16), None
        scale = (x.abs().amax(dim=-1, keepdim=True).float() / 127.0).clamp(min=1e-8)
        q = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
        return q, scale.to(self.dtype)

    def _decode(self, q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "auto":
            return q
        if self.kind == "fp8":
            return q.view(torch.float8_e4m3fn).to(self.dtype)
        if self.kind == "fp16":
            return q.to(self.dtype)
        return q.to(self.dtype) * scale

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v: [T, kv_heads, head_dim] -> the cache at ``slots``."""
        for x, store, scales in ((k, self.k, getattr(self, "k_scale", None)),
                                 (v, self.v, getattr(self, "v_scale", None))):
            q, s = self._encode(x.transpose(0, 1))
            store.index_copy_(1, slots, q)
            if scales is not None:
                scales.index_copy_(1, slots, s)

    def gather_blocks(self, blocks: torch.Tensor, block_size: int,
                      batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole blocks for a padded batch: [kv_heads, batch, blocks_each*block_size, d]."""
        h, _, d = self.k.shape
        out = []
        for store, scales in ((self.k, getattr(self, "k_scale", None)),
                              (self.v, getattr(self, "v_scale", None))):
            q = store.view(h, -1, block_size, d).index_select(1, blocks)
            s = None if scales is None else \
                scales.view(h, -1, block_size, 1).index_select(1, blocks)
            x = self._decode(q, s)
            out.append(x.reshape(h, batch, -1, d))
        return out[0], out[1]

    def gather_slots(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected slots: [kv_heads, n, d] each."""
        out = []
        for store, scales in ((self.k, getattr(self, "k_scale", None)),
                              (self.v, getattr(self, "v_scale", None))):
            s = None if scales is None else scales.index_select(1, slots)
            out.append(self._decode(store.index_select(1, slots), s))
        return out[0], out[1]


class LatentKV(LayerKV):
    """An MLA layer's cache (``models/deepseek.py``): one latent vector a token, ``[1,
    slots, kv_lora_rank + qk_rope_head_dim]``, that serves as both key and value (``v``
    is the same tensor as ``k``), so a token costs one vector, not K and V per head."""

    def __init__(self, slots: int, dim: int, dtype: torch.dtype, kind: str,
                 device: torch.device) -> None:
        self.kind = kind
        self.dtype = dtype
        store = {"auto": dtype, "fp16": torch.float16, "int8": torch.int8,
                 "fp8": torch.uint8}[kind]
        self.k = zeros((1, slots, dim), store, device)
        self.v = self.k
        if kind == "int8":
            self.k_scale = zeros((1, slots, 1), dtype, device)
            self.v_scale = self.k_scale

    @staticmethod
    def bytes_per_token_per_layer(kv_heads: int, head_dim: int, dtype: torch.dtype,
                                  kind: str) -> int:
        return LayerKV.bytes_per_token_per_layer(kv_heads, head_dim, dtype, kind) // 2

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k (= v): [T, 1, dim] -> the cache at ``slots``."""
        q, s = self._encode(k.transpose(0, 1))
        self.k.index_copy_(1, slots, q)
        if s is not None:
            self.k_scale.index_copy_(1, slots, s)


def cache_for(cfg, slots: int, dtype: torch.dtype, kind: str,
              device: torch.device) -> LayerKV:
    """One layer's cache for a model config: latent for MLA, else K and V per KV head."""
    if cfg.is_mla:
        return LatentKV(slots, cfg.cache_dim, dtype, kind, device)
    return LayerKV(cfg.num_kv_heads, slots, cfg.head_dim, dtype, kind, device)


def bytes_per_token(cfg, dtype: torch.dtype, kind: str) -> int:
    """Cache bytes a token takes over all layers."""
    cls = LatentKV if cfg.is_mla else LayerKV
    return cfg.num_layers * cls.bytes_per_token_per_layer(cfg.cache_heads, cfg.cache_dim,
                                                          dtype, kind)
