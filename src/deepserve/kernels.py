"""deepserve's own CPU kernels (``csrc/cpu_kernels.cpp``), built on first use.

The C++ source is compiled with the machine's own instruction set (``-march=native``)
by ``torch.utils.cpp_extension`` into ``~/.cache/deepserve/kernels/<torch>-<cpu flags>``
(about 15 s on two cores, once; ``make setup`` runs ``deepserve kernels`` to do it ahead
of time). The ops register as ``torch.ops.deepserve.*``. When no compiler is present or
the build fails, deepserve logs why and uses its pure-torch paths, which give the same
results, only slower. ``DEEPSERVE_KERNELS=0`` turns the kernels off;
``DEEPSERVE_KERNELS_MARCH`` compiles for another target than ``native`` (e.g.
``x86-64-v3`` for AVX2 machines, which take the portable loops).

* ``linear_small``: a few rows times a bf16 / fp32 / int8 weight at memory speed.
* ``linear_int4``: the same for int4 weights in groups of 32 (5-64 rows).
* ``paged_decode_attention``: decode attention read in place through block tables.
* ``rms_norm`` (with the residual add), ``rope_write_kv`` (rotary on q/k plus the KV
  cache write) and ``silu_mul``: a decoder layer's element-wise work in 3 calls instead
  of about 30 small torch ops, which at batch 1 cost more than the math they do.
* ``sample_rows``: one temperature-sampling draw per row, without [N, V] temporaries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
# Rows at or below which linear_small beats oneDNN's packed bf16 GEMM (measured on a
# 2-core AVX-512 CPU over all of a decode step's layer weights: 1.3x faster at 1 row,
# 1.1x at 8, 0.85x at 16).
SMALL_ROWS = 8
# For int8/int4 weights the alternative is dequantize + GEMM, so the kernels win longer:
# int8 5x at 1 row, 1.2x at 32, even at 64; int4 1.7x at 64 (batch-64 decode step
# 85 -> 50 ms).
SMALL_ROWS_INT8 = 64

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_tag() -> str:
    """Short hash of the CPU's feature flags: a build made with -march=native on one CPU
    must not be loaded on another (a shared home directory, a moved container)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        import platform

        flags = platform.machine() + platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def build_dir() -> Path:
    root = os.environ.get("DEEPSERVE_CACHE_DIR") or Path.home() / ".cache" / "deepserve"
    return Path(root) / "kernels" / f"{torch.__version__}-{_march()}-{_cpu_tag()}"


def _march() -> str:
    return os.environ.get("DEEPSERVE_KERNELS_MARCH", "native")


def _build() -> bool:
    if os.environ.get("DEEPSERVE_KERNELS", "1") in ("0", "false", "off"):
        _state["reason"] = "disabled by DEEPSERVE_KERNELS=0"
        return False
    from torch.utils import cpp_extension

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        cpp_extension.load(
            name="deepserve_cpu_kernels",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", f"-march={_march()}", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # any build failure means: use the torch paths
        _state["reason"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
        logger.warning("deepserve CPU kernels unavailable (%s); using the torch paths",
                       _state["reason"])
        return False
    logger.info("deepserve CPU kernels ready (%.1f s)", time.perf_counter() - t0)
    return True


def cpu_has_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), so bf16 pays."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def available() -> bool:
    """Whether the C++ kernels are loaded (builds them on the first call)."""
    ok = _state.get("ok")
    if ok is None:
        with _lock:
            ok = _state.get("ok")
            if ok is None:
                ok = _build()
                _state["ok"] = ok
    return bool(ok)


def unavailable_reason() -> str | None:
    return None if available() else str(_state.get("reason"))


def linear_small(x: torch.Tensor, weight: torch.Tensor, row_scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.deepserve.linear_small(x, weight, row_scale, bias)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                           block_table: torch.Tensor, ctx_lens: torch.Tensor, block_size: int,
                           scale: float) -> torch.Tensor:
    return torch.ops.deepserve.paged_decode_attention(q, k_cache, v_cache, k_scale, v_scale,
                                                      block_table, ctx_lens, block_size, scale)


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> list[torch.Tensor]:
    """[normed] or, with a residual, [normed, x + residual]."""
    return torch.ops.deepserve.rms_norm(x, residual, weight, eps)


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  heads: int, kv_heads: int) -> list[torch.Tensor]:
    """Rotated [q, k]; k and v are written to the caches at ``slots``."""
    return torch.ops.deepserve.rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, heads,
                                             kv_heads)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return torch.ops.deepserve.silu_mul(gate_up)


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (bf16) times int4 weights in groups of 32 (layout: ``pack_int4``)."""
    return torch.ops.deepserve.linear_int4(x, packed, scales, lows, bias)


def has_bf16_dot() -> bool:
    """Whether the kernels were built with AVX512-BF16 (needed by ``linear_int4``)."""
    found = _state.get("bf16_dot")
    if found is None:
        found = _state["bf16_dot"] = available() and bool(torch.ops.deepserve.has_avx512_bf16())
    return bool(found)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K/2] uint8: per group of 32, byte i = q[i] | q[i+16] << 4."""
    n, k = q.shape
    g = q.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def sample_rows(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One draw per row of softmax(logits) (float32), given a uniform number per row."""
    return torch.ops.deepserve.sample_rows(logits, uniform)
