"""Engine configuration: one frozen dataclass; CLI flags map onto it one to one."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

# Weight formats and KV-cache storage the engine implements (layers/quantized.py and
# layers/kv_cache.py); named here so the configuration is checked without torch.
# auto: a GGUF's own Q4_0/Q4_1/Q8_0 blocks as stored, else none; mixed: MLP int4, attention int8
QUANTIZATIONS = ("auto", "none", "int8", "int4", "mixed")
KV_DTYPES = ("auto", "fp16", "int8", "fp8")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes one engine replica. Defaults work on a laptop CPU.

    ``model=None`` means the packaged default (SmolLM2-135M-Instruct GGUF).
    ``kv_cache_memory`` is a byte budget for the KV pool ("512MiB", "2GB" or an int);
    when unset, ``kv_cache_memory_fraction`` of the free memory is used, capped at
    what ``max_num_seqs`` sequences of ``max_model_len`` tokens could ever need.
    """

    model: str | None = None
    tokenizer: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: str | int | None = None
    kv_cache_memory_fraction: float = 0.05
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    num_threads: int | None = None
    quantization: str = "auto"  # auto | none | int8 | int4 | mixed (FFN int4, attention int8)
    kv_cache_dtype: str = "auto"  # auto (compute dtype; see with_auto_kv) | fp16 | int8 | fp8
    cpu_kernels: bool = True  # deepserve's C++ kernels on CPU (built on first use)
    slo_ttft_ms: float | None = None  # targets: the scheduler adapts each step's budget
    slo_tpot_ms: float | None = None  # and batch size to them (engine/slo.py)
    tensor_parallel_size: int = 1  # processes that split each layer (engine/parallel.py)
    pipeline_parallel_size: int = 1  # processes that each hold a range of whole layers
    expert_parallel_size: int = 1  # processes that each hold a share of the MoE experts
    distributed_executor_backend: str = "mp"  # the other ranks: local processes, or "ray"
    expert_dispatch: str = "all-reduce"  # expert parallelism's exchange, or "all-to-all"

    def __post_init__(self) -> None:
        """Checks that need no model (those that do run when the engine loads)."""
        from deepserve.errors import DeepserveError

        def bad(name: str, fix: str) -> DeepserveError:
            return DeepserveError(f"{name}={getattr(self, name)!r} is invalid: {fix}",
                                  param=name)

        if self.quantization not in QUANTIZATIONS:
            raise bad("quantization", f"use one of {', '.join(QUANTIZATIONS)}")
        if self.distributed_executor_backend not in ("mp", "ray"):
            raise bad("distributed_executor_backend", "use mp (processes on this host) or "
                      "ray (Ray actors, on any node of the cluster)")
        if self.expert_dispatch not in ("all-reduce", "all-to-all"):
            raise bad("expert_dispatch", "use all-reduce (every rank routes every token, one "
                      "sum per MoE layer) or all-to-all (tokens sent to their experts' "
                      "ranks and back)")
        if self.expert_dispatch == "all-to-all" and self.expert_parallel_size == 1:
            raise bad("expert_dispatch", "the all-to-all exchanges tokens between "
                      "expert-parallel ranks: add --expert-parallel-size N (N > 1)")
        if self.expert_dispatch == "all-to-all" and self.tensor_parallel_size > 1:
            raise bad("expert_dispatch", "with tensor parallelism the experts' outputs are "
                      "summed by the all-reduce after each MLP: drop --expert-dispatch "
                      "all-to-all, or --tensor-parallel-size")
        if self.kv_cache_dtype not in KV_DTYPES:
            raise bad("kv_cache_dtype", f"use one of {', '.join(KV_DTYPES)}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size",
                     "tensor_parallel_size", "pipeline_parallel_size",
                     "expert_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "give a positive integer")
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or
                                      not isinstance(value, int | float) or value <= 0):
                raise bad(name, "give a target in milliseconds > 0")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise bad("kv_cache_memory_fraction", "give a share in (0, 1]")

    def with_auto_kv(self, dtype: Any) -> EngineConfig:
        """The config with ``kv_cache_dtype="auto"`` made concrete where it is not the
        compute dtype: where ``dtype="auto"`` gave float32 because the CPU runs bf16 only
        emulated (the AVX2 path), the cache is fp16, as llama.cpp's is by default: half
        the bytes a decode step's attention reads (the default model's AVX2 step 8-10%
        faster, BENCHMARKS.md) and finer than the bf16 cache AVX-512 CPUs get. An
        explicit float32 keeps a float32 cache."""
        if self.kv_cache_dtype == "auto" and self.dtype == "auto" and \
                str(dtype) == "torch.float32":
            return replace(self, kv_cache_dtype="fp16")
        return self

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> EngineConfig:
        """Build a config, rejecting unknown names with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            from deepserve.errors import DeepserveError

            raise DeepserveError(
                f"unknown engine argument(s) {unknown}; known: {sorted(known)}",
                param=unknown[0])
        return cls(**kwargs)  # type: ignore[arg-type]


def parse_bytes(value: str | int, param: str = "kv_cache_memory") -> int:
    """'512MiB', '2GB', '1.5g', '1000000' -> bytes."""
    if isinstance(value, int):
        return value
    text = value.strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "k": 2**10, "m": 2**20, "g": 2**30, "b": 1}
    number, mult = text, 1
    for suffix, factor in units.items():
        if text.endswith(suffix):
            number, mult = text[: -len(suffix)], factor
            break
    try:
        return int(float(number) * mult)
    except ValueError:
        from deepserve.errors import DeepserveError

        raise DeepserveError(
            f"{param}={value!r} is not a size; write e.g. '512MiB' or '2GB'",
            param=param) from None


def read_toml(path: str | Path, what: str, param: str) -> dict[str, Any]:
    """Parse a TOML settings file; a missing or malformed file is a DeepserveError naming
    ``what`` it was meant to be (e.g. "pricing file") and the parser's reason."""
    import tomllib

    from deepserve.errors import DeepserveError

    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DeepserveError(f"{what} {path}: {exc}", param=param) from exc
