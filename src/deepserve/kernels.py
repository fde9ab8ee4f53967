"""deepserve's own CPU kernels (``csrc/*.cpp``), built on first use, one build per
instruction set and picked at run time by this CPU's features.

Instruction sets (``DEEPSERVE_ISA`` forces one; the default is the best this CPU has):

* ``avx512``: AVX-512 F/BW/DQ/VL with VNNI and BF16 (AMD Zen 4+, Intel Sapphire Rapids+),
  compiled for ``x86-64-v4 -mavx512vnni -mavx512bf16``.
* ``avx2``: AVX2 + FMA + F16C (Intel since Haswell, AMD Zen 1-3, most cloud VMs),
  compiled for ``x86-64-v3``.
* ``portable``: plain C++ that the compiler vectorizes as it can (any CPU, ARM included).

Each build is compiled by ``torch.utils.cpp_extension`` into
``~/.cache/deepserve/kernels/<torch>-<isa>`` (about 20 s on two cores, once; ``make setup``
runs ``deepserve kernels`` to do it ahead of time) and registers its ops under its own
namespace, ``torch.ops.deepserve_<isa>``, so several can be loaded side by side (the tests
check every path on one machine). When no compiler is present or the build fails,
deepserve logs why and uses its pure-torch paths, which give the same results, only
slower. ``DEEPSERVE_KERNELS=0`` turns the kernels off.

* ``linear_gguf``: x times a weight kept in GGUF blocks (Q4_0, Q4_1, Q8_0), any number of
  rows, with 8-bit integer dot products (``csrc/gguf_kernels.cpp``). On CPUs with AMX
  (Intel Xeon since Sapphire Rapids) the avx512 build runs 12 bf16 rows and more on AMX
  bf16 tiles, the blocks dequantized per 16 columns (``DEEPSERVE_AMX=0`` keeps the VNNI
  kernels; ``set_amx`` switches at run time); ``swiglu_gguf`` adds SwiGLU to the tiles.
* ``linear_small``: a few rows times a bf16 / fp32 / int8 weight at memory speed;
  ``paged_decode_attention``: decode attention read in place through block tables.
* ``rms_norm`` (with the residual add), ``rope_write_kv`` (rotary on q/k plus the KV
  cache write) and ``silu_mul``: a decoder layer's element-wise work in 3 calls instead
  of about 30 small torch ops, which at batch 1 cost more than the math they do.
* ``sample_rows``: one temperature-sampling draw per row, without [N, V] temporaries.
* ``argmax_rows``: greedy picks, as ``torch.argmax`` (9x faster at 64 x 49152);
  ``argmax_gguf`` picks from a GGUF head's tiles without writing the logits.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name  # the header: stamped, not compiled
           for name in ("cpu_kernels.cpp", "gguf_kernels.cpp", "parallel.h")]
# Rows at or below which linear_small beats oneDNN's packed bf16 GEMM (measured on a
# 2-core AVX-512 CPU over all of a decode step's layer weights: 1.3x faster at 1 row,
# 1.1x at 8, 0.85x at 16).
SMALL_ROWS = 8

_lock = threading.RLock()
_state: dict[str, object] = {}


ISAS = ("avx512", "avx2", "portable")
# /proc/cpuinfo flags each instruction set needs.
_NEEDS = {"avx512": ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni",
                      "avx512_bf16", "avx2", "fma", "f16c"),
          "avx2": ("avx2", "fma", "f16c"), "portable": ()}
_FLAGS = {"avx512": ["-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16"],
          "avx2": ["-march=x86-64-v3"], "portable": []}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def supported_isas() -> list[str]:
    """The instruction sets this CPU can run, best first (portable always)."""
    flags = cpu_flags()
    return [isa for isa in ISAS if all(f in flags for f in _NEEDS[isa])]


def isa_problem() -> str | None:
    """Why ``DEEPSERVE_ISA`` cannot be used as set, or None."""
    forced = os.environ.get("DEEPSERVE_ISA", "").strip().lower()
    if not forced or forced == "auto":
        return None
    if forced not in ISAS:
        return (f"DEEPSERVE_ISA={forced!r} is not one of auto, {', '.join(ISAS)}; unset it to "
                "use the best this CPU has")
    if forced not in supported_isas():
        missing = [f for f in _NEEDS[forced] if f not in cpu_flags()]
        return (f"DEEPSERVE_ISA={forced} needs CPU features this CPU lacks "
                f"({', '.join(missing)}); use one of {', '.join(supported_isas())}")
    return None


def isa() -> str:
    """The instruction set the kernels run with: ``DEEPSERVE_ISA`` when set and usable,
    else the best this CPU supports."""
    forced = os.environ.get("DEEPSERVE_ISA", "").strip().lower()
    if forced in ISAS and isa_problem() is None:
        return forced
    return supported_isas()[0]


def build_dir(which: str | None = None) -> Path:
    root = os.environ.get("DEEPSERVE_CACHE_DIR") or Path.home() / ".cache" / "deepserve"
    return Path(root) / "kernels" / f"{torch.__version__}-{which or isa()}"


def _x86() -> bool:
    return __import__("platform").machine().lower() in ("x86_64", "amd64", "i686", "x86")


def load(which: str) -> bool:
    """Build (once) and load the kernels for one instruction set; False with a logged
    reason when that fails."""
    key = f"ok:{which}"
    with _lock:
        if key in _state:
            return bool(_state[key])
        if which != "portable" and which not in supported_isas():
            _state[f"reason:{which}"] = f"this CPU cannot run {which}"
            _state[key] = False
            return False
        directory = build_dir(which)
        directory.mkdir(parents=True, exist_ok=True)
        name = f"deepserve_cpu_kernels_{which}"
        cflags = ["-O3", "-fopenmp", f"-DDS_NS=deepserve_{which}",
                  *(_FLAGS[which] if _x86() else [])]
        t0 = time.perf_counter()
        try:
            if not _load_built(directory, name, cflags):
                from torch.utils import cpp_extension

                clear_stale_lock(directory)
                cpp_extension.load(name=name, sources=[str(s) for s in SOURCES[:2]],
                                   extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                                   build_directory=str(directory), is_python_module=False,
                                   verbose=False)
                (directory / STAMP).write_text(_stamp(cflags))
        except Exception as exc:  # any build failure means: use the torch paths
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
            _state[f"reason:{which}"] = reason
            _state[key] = False
            logger.warning("deepserve CPU kernels (%s) unavailable (%s); using the torch paths",
                           which, reason)
            return False
        logger.info("deepserve CPU kernels (%s) ready (%.1f s)", which, time.perf_counter() - t0)
        _state[key] = True
        if which == "avx512":
            set_amx(amx_wanted(), which)
        return True


def amx_wanted() -> bool:
    """Whether the AMX tile kernels may run (``DEEPSERVE_AMX=0`` turns them off)."""
    return os.environ.get("DEEPSERVE_AMX", "1").strip().lower() not in ("0", "false", "off")


def set_amx(on: bool, which: str = "avx512") -> bool:
    """Run batches of blocks on AMX bf16 tiles (where the CPU has them and Linux grants
    them) or on the VNNI kernels; returns whether the tiles are in use. The tiles take
    bf16 rows as they are, the VNNI kernels round them to 8-bit codes: results agree to
    bf16's rounding, not bit for bit."""
    has = {"amx_tile", "amx_bf16", "avx512vbmi"} <= cpu_flags()
    active = has and load(which) and bool(ops(which).set_amx(on))
    _state[f"amx:{which}"] = active
    return active


def amx() -> bool:
    """Whether the kernels in use run batches on AMX tiles."""
    return bool(available() and _state.get(f"amx:{isa()}"))


STAMP = "deepserve.stamp"


def _stamp(cflags: list[str]) -> str:
    """What a build was made from: torch's version, the flags and the sources' bytes."""
    h = hashlib.sha1(f"{torch.__version__}|{' '.join(cflags)}".encode())
    for source in SOURCES:
        h.update(Path(source).read_bytes())
    return h.hexdigest()


def _load_built(directory: Path, name: str, cflags: list[str]) -> bool:
    """Load a build made from exactly these sources and flags without asking torch's
    extension builder (importing it and its up-to-date check took 0.2 s of a start)."""
    so = directory / f"{name}.so"
    try:
        if not so.is_file() or (directory / STAMP).read_text() != _stamp(cflags):
            return False
        torch.ops.load_library(str(so))
    except (OSError, RuntimeError):
        return False
    return True


# A build takes well under this; torch's build lock has no owner to ask, so a lock file
# this old was left by a build that was killed, and would make every start wait forever.
STALE_LOCK_S = 600


def clear_stale_lock(directory: Path) -> None:
    """Remove a build lock left behind by a killed build (older than STALE_LOCK_S); say
    what a start is waiting for when a younger one is there."""
    lock = directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > STALE_LOCK_S:
        logger.warning("removing %s, left %.0f s ago by a kernel build that did not finish",
                       lock, age)
        lock.unlink(missing_ok=True)
    else:
        logger.warning("waiting for another kernel build to finish (lock %s, %.0f s old; if "
                       "no build is running, delete it)", lock, age)


def ops(which: str | None = None):
    """The ops namespace of one build (default: the one in use, looked up once)."""
    if which is not None:
        return getattr(torch.ops, f"deepserve_{which}")
    found = _state.get("ops")
    if found is None:
        found = _state["ops"] = getattr(torch.ops, f"deepserve_{isa()}")
    return found


def _build() -> bool:
    if os.environ.get("DEEPSERVE_KERNELS", "1") in ("0", "false", "off"):
        _state["reason"] = "disabled by DEEPSERVE_KERNELS=0"
        return False
    problem = isa_problem()
    if problem:
        _state["reason"] = problem
        logger.warning("deepserve CPU kernels unavailable: %s", problem)
        return False
    ok = load(isa())
    if not ok:
        _state["reason"] = _state.get(f"reason:{isa()}")
    return ok


def cpu_has_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), so bf16 pays."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def loaded() -> bool:
    """Whether the C++ kernels are loaded already (never builds them)."""
    return bool(_state.get("ok"))


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
    return ops().linear_small(x, weight, row_scale, bias)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                           block_table: torch.Tensor, ctx_lens: torch.Tensor, block_size: int,
                           scale: float) -> torch.Tensor:
    return ops().paged_decode_attention(q, k_cache, v_cache, k_scale, v_scale,
                                                      block_table, ctx_lens, block_size, scale)


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> list[torch.Tensor]:
    """[normed] or, with a residual, [normed, x + residual]."""
    return ops().rms_norm(x, residual, weight, eps)


def latent_decode(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                  ctx_lens: torch.Tensor, block_size: int, scale: float,
                  value_dim: int) -> torch.Tensor:
    """MLA decode attention: q [B, H, D] (bf16) against one shared latent head, the cache
    [slots, D] read through the block table; values are each row's first ``value_dim``
    entries. Returns [B, H, value_dim]."""
    return ops().latent_decode(q, cache, block_table, ctx_lens, block_size, scale, value_dim)


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  heads: int, kv_heads: int, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Rotated [q, k]; k, v written at ``slots`` as ``LayerKV.write`` writes them."""
    return ops().rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads,
                               k_scale, v_scale)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return ops().silu_mul(gate_up)


def decode_layer(x: torch.Tensor, *args) -> torch.Tensor:
    """One decoder layer of a decode step on GGUF blocks in one call (norm, QKV, rotary +
    KV write, paged attention, output projection, residual, norm, gate/up, SwiGLU, down,
    residual); arguments as ``DecoderLayer.decode_weights`` and ``forward_fused`` give
    them."""
    return ops().decode_layer(x, *args)


def decode_layers(x: torch.Tensor, *args) -> torch.Tensor:
    """Every layer of a dense model's decode step in one call: ``decode_layer`` per layer,
    each argument that differs by layer given as a list (``LlamaModel.decode_plans``)."""
    return ops().decode_layers(x, *args)


def linear_gguf(x: torch.Tensor, blocks: torch.Tensor, qtype: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] times a weight stored as GGUF blocks ([N, K / 32 * block bytes] uint8)."""
    return ops().linear_gguf(x, blocks, qtype, bias)


def swiglu_gguf(x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> torch.Tensor | None:
    """``silu_mul(linear_gguf(x, blocks, qtype))`` bit for bit, in one pass on AMX tiles;
    None where the tiles do not take it (no AMX, float32 rows, under 12 rows, ...)."""
    return out if (out := ops().swiglu_gguf(x, blocks, qtype)).numel() else None


def bmm_gguf(x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """``linear_gguf`` per head in one call: x [H, M, K] times blocks [H, N, bytes]^T ->
    [H, M, N] in x's dtype."""
    return ops().bmm_gguf(x, blocks, qtype)


def moe_gguf(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
             gu_type: int, down: torch.Tensor, down_type: int,
             up: torch.Tensor | None = None) -> torch.Tensor:
    """A mixture-of-experts SwiGLU in one call: x [T, H], the chosen experts ``ids`` and
    their ``weights`` [T, k], expert blocks gate_up [E, 2I, bytes] and down [E, H, bytes]
    of kernel types ``gu_type`` / ``down_type``; each chosen expert runs once over its
    rows. Returns [T, H] in x's dtype. With ``up`` [E, I, bytes], ``gate_up`` is the
    gate's rows alone [E, I, bytes] (a file's tensors as mapped)."""
    return ops().moe_gguf(x, ids, weights, gate_up, gu_type, down, down_type, up)


def interleave_blocks(blocks: torch.Tensor, fields: list[int], units: int,
                      unit_bytes: int) -> torch.Tensor:
    """``layers.gguf_linear.interleave`` in one C++ pass (``fields``: the header fields'
    (count, size) pairs, flattened)."""
    return ops().interleave_blocks(blocks, fields, units, unit_bytes)


def interleave_blocks_into(blocks: torch.Tensor, out: torch.Tensor, fields: list[int],
                           units: int, unit_bytes: int) -> None:
    """``interleave_blocks`` of [A, R, bytes] blocks written into ``out`` (same shape)."""
    ops().interleave_blocks_into(blocks, out, fields, units, unit_bytes)


def moe_route(logits: torch.Tensor, bias: torch.Tensor | None, k: int, sigmoid: bool,
              n_group: int, topk_group: int, top2: bool, norm: bool,
              scale: float) -> list[torch.Tensor]:
    """A router's top-k in one call (``layers.moe.route`` in torch ops): [weights, ids]."""
    return ops().moe_route(logits, bias, k, sigmoid, n_group, topk_group, top2, norm, scale)


def gguf_rows(blocks: torch.Tensor, ids: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """Rows ``ids`` of a GGUF block matrix as float32 (an embedding lookup)."""
    return ops().gguf_rows(blocks, ids, qtype, k)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first index of its largest value, as ``torch.argmax`` (float32 [N, V])."""
    return ops().argmax_rows(logits)


def argmax_gguf(x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> torch.Tensor | None:
    """``argmax_rows(linear_gguf(x, blocks, qtype))``, the outputs never written, on AMX
    tiles; None where the tiles do not take it (as ``swiglu_gguf``)."""
    return out if (out := ops().argmax_gguf(x, blocks, qtype)).numel() else None


def sample_rows(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One draw per row of softmax(logits) (float32), given a uniform number per row."""
    return ops().sample_rows(logits, uniform)
