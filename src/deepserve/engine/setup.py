"""Building one engine replica, one named step at a time: where it runs and in which
dtype, its context length, tokenizer, model (loaded, quantized, packed for the
kernels), and the size of its KV pool. ``LLMEngine.__init__`` calls these in order."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from deepserve import kernels
from deepserve.config import EngineConfig, parse_bytes
from deepserve.engine.layout import expert_layout
from deepserve.errors import DeepserveError
from deepserve.layers.linear import enable_kernels, pack_weights
from deepserve.layers.quantized import quantize_model, weight_formats
from deepserve.loader.resolve import DEFAULT_MODEL_NAME
from deepserve.loader.tokenizer import load_tokenizer
from deepserve.loader.weights import load_model
from deepserve.models.config import ModelConfig

logger = logging.getLogger("deepserve.engine.llm_engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
           "float": torch.float32, "half": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeepserveError(f"device={name!r} but no CUDA GPU is visible; use --device cpu",
                             param="device")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # By what this CPU does fast, with the kernels' instruction set: bf16 matmuls run
        # 4-5x fp32 at batch >= 32 with AVX512-BF16, while CPUs without it emulate bf16
        # (slower than fp32; measured on AVX2 Zen 3). DEEPSERVE_ISA=avx2 takes fp32 too.
        native = kernels.cpu_has_bf16() and (kernels.isa() == "avx512"
                                              or "amx_bf16" in kernels.cpu_flags())
        return torch.bfloat16 if native else torch.float32
    if name not in _DTYPES:
        raise DeepserveError(f"dtype={name!r} is not one of auto, float32, bfloat16, float16",
                             param="dtype")
    return _DTYPES[name]


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def served_name(config: EngineConfig, path: Path, kind: str) -> str:
    if config.served_model_name:
        return config.served_model_name
    if config.model in (None, "", DEFAULT_MODEL_NAME):
        return DEFAULT_MODEL_NAME
    return path.stem if kind == "gguf" else path.name


def context_length(config: EngineConfig, mcfg: ModelConfig) -> int:
    """max_model_len, checked against the model and the scheduler's budget."""
    length = config.max_model_len or mcfg.max_position_embeddings
    if not 2 <= length <= mcfg.max_position_embeddings:
        raise DeepserveError(
            f"max_model_len={length} must be between 2 and the model's context of "
            f"{mcfg.max_position_embeddings} tokens", param="max_model_len")
    if not config.enable_chunked_prefill and config.max_num_batched_tokens < length:
        raise DeepserveError(
            f"max_num_batched_tokens={config.max_num_batched_tokens} is below "
            f"max_model_len={length} with chunked prefill off: long prompts could never "
            "be scheduled; raise it or enable chunked prefill",
            param="max_num_batched_tokens")
    return length


def tokenizer_for(config: EngineConfig, path: Path, kind: str) -> Any:
    if not config.tokenizer:
        return load_tokenizer(path, kind)
    folder = Path(config.tokenizer)
    if not folder.is_dir():
        raise DeepserveError(f"tokenizer={config.tokenizer!r} is not a folder; give a folder "
                             "with tokenizer.json (or leave it unset to use the model's own)",
                             param="tokenizer")
    return load_tokenizer(folder, "hf")


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token can stand for (its vocabulary string bounds it)."""
    try:
        return max(8, max(len(t) for t in tokenizer.get_vocab()))
    except Exception:  # a tokenizer without get_vocab: a generous fixed bound
        return 64


def use_cpu_kernels(config: EngineConfig, device: torch.device) -> bool:
    """Whether this replica runs deepserve's C++ kernels: asked for, on a CPU, and built."""
    problem = kernels.isa_problem()
    if problem and config.cpu_kernels and device.type == "cpu":
        raise DeepserveError(problem)
    if config.quantization not in ("none", "auto") and device.type != "cpu":
        raise DeepserveError("weight quantization uses CPU kernels; run with --device cpu "
                             "or --quantization none", param="quantization")
    return config.cpu_kernels and device.type == "cpu" and kernels.available()


def build_model(ckpt: Any, mcfg: ModelConfig, config: EngineConfig, max_model_len: int,
                dtype: torch.dtype, device: torch.device, use_kernels: bool,
                show_progress: bool, shard: Any = None, settle: Any = None) -> torch.nn.Module:
    """Load the weights (with ``shard``, one tensor-parallel rank's part of them: ``mcfg``
    is then its local configuration), quantize them, and prepare them for the kernel
    decision; ``settle()`` returns once other work on the cores is done (a first tokenizer
    build beside ``copies_pay``'s timing made it keep 2.7 GB of copies for nothing)."""
    keep_blocks = config.quantization == "auto" and device.type == "cpu"
    interleave = use_kernels and kernels.isa() != "portable"
    model = load_model(ckpt, mcfg, max_model_len, dtype, device, show_progress=show_progress,
                       keep_blocks=keep_blocks, shard=shard, interleave=interleave,
                       expert_layout=expert_layout())
    from deepserve.models.parallel import Shard, split_vocab

    if isinstance(shard, Shard):  # tensor parallelism: this rank's share of the vocabulary
        split_vocab(model, shard)
    quantize_model(model, config.quantization, dtype)
    enable_kernels(model, use_kernels)
    if interleave:  # a head's rows in two 8-bit parts where float32 was asked for, else one
        interleave_blocks(model, one_part_head=dtype != torch.float32 or config.dtype == "auto")
    if use_kernels:
        latent_blocks(model)
    if use_kernels and dtype == torch.bfloat16 and dense_for_batches():
        if mcfg.num_experts:
            # experts never get copies, and the attention's alone measured slower than
            # the block kernels at 32 streams (benchmarks/decode_step.py, BENCHMARKS.md)
            logger.info("mixture-of-experts model: every layer runs on its blocks, no bf16 "
                        "copies for large batches")
        elif dense_mode() == "on" or copies_pay(model, dtype, settle):
            keep_dense_copies(model, dtype)
    if config.cpu_kernels:
        pack_weights(model)
    return model


def dense_mode() -> str:
    """DEEPSERVE_DENSE_COPY: "auto" (the default: measured at load, ``copies_pay``), "on"
    (always, within the memory budget) or "off" (never; the file's blocks serve every
    batch)."""
    value = os.environ.get("DEEPSERVE_DENSE_COPY", "auto").strip().lower()
    for mode, spellings in (("auto", ("", "auto")), ("on", ("1", "on", "true", "yes")),
                            ("off", ("0", "off", "false", "no"))):
        if value in spellings:
            return mode
    raise DeepserveError(f"DEEPSERVE_DENSE_COPY={value!r} is not a setting: use auto "
                         "(measure at load), 1 (always keep bf16 copies for large batches, "
                         "within the memory budget) or 0 (never)", param="DEEPSERVE_DENSE_COPY")


def dense_for_batches() -> bool:
    """Whether GGUF-block layers may also keep a bf16 copy for large batches: where bf16
    GEMMs run natively (oneDNN) and the kernels run AVX-512, unless
    DEEPSERVE_DENSE_COPY=0."""
    if dense_mode() == "off":
        return False
    # Only with the avx512 kernels (a forced avx2 path runs blocks, as an AVX2 CPU does)
    native = kernels.isa() == "avx512" or "amx_bf16" in kernels.cpu_flags()
    return native and torch.backends.mkldnn.is_available() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()


# A bf16 copy must run a 32-row batch this many times faster than the blocks to be kept:
# it costs four times the blocks' memory (Q4) and every byte of it is read per step.
COPY_MARGIN = 1.25
CALIBRATION_ROWS = 32


def copies_pay(model: torch.nn.Module, dtype: torch.dtype, settle: Any = None) -> bool:
    """Whether oneDNN's bf16 GEMM beats the block kernels on this CPU: one decoder layer's
    largest block projection timed both ways at 32 rows (best of three, about 0.1 s, once
    ``settle()`` returns), never where the blocks run on AMX tiles (copies won that GEMM
    by 1.1-1.6x, but cost the one-call layer, half the speed at one stream served)."""
    if kernels.amx():
        logger.info("bf16 copies for large batches: none, the blocks run on AMX tiles")
        return False
    import time

    from deepserve.layers.gguf_linear import GGUFLinear

    layers = [m for m in model.modules() if isinstance(m, GGUFLinear) and m.use_kernel]
    if not layers:
        return False
    settle is None or settle()  # the tokenizer's first build shares the cores till then
    layer = max(layers[:8], key=lambda m: m.in_features * m.out_features)
    x = torch.randn(CALIBRATION_ROWS, layer.in_features, dtype=dtype)
    layer.keep_dense(dtype)
    copy, copy_bias = layer.dense, layer.dense_bias
    layer.dense = layer.dense_bias = None

    def best(fn: Any) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    blocks = best(lambda: kernels.linear_gguf(x, layer.blocks, layer.kernel_qtype, layer.bias))
    dense = best(lambda: torch.ops.mkldnn._linear_pointwise(x, copy, copy_bias, "none", [], ""))
    flop = 2 * CALIBRATION_ROWS * layer.in_features * layer.out_features
    pays = blocks > COPY_MARGIN * dense
    logger.info("bf16 copies for large batches: %s (%d rows through a %dx%d layer: blocks "
                "%.0f GFLOP/s, bf16 copy %.0f GFLOP/s; DEEPSERVE_DENSE_COPY=1 or 0 decides "
                "instead)", "kept, faster on this CPU" if pays else "none, the blocks are as fast",
                CALIBRATION_ROWS, layer.in_features, layer.out_features, flop / blocks / 1e9,
                flop / dense / 1e9)
    return pays


# The most memory the bf16 copies may take: a quarter of what is free, and at most this
# (an 8B model's copies would be 16 GB; the block kernels run every batch size).
DENSE_COPY_MAX = 2 * 2**30


def keep_dense_copies(model: torch.nn.Module, dtype: torch.dtype,
                      free: int | None = None) -> bool:
    """Give every GGUF-block layer its bf16 copy when they all fit the budget above;
    False (and a log line saying why) when they do not."""
    from deepserve.layers.gguf_linear import GGUFLinear

    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    need = sum(m.in_features * m.out_features for m in layers) * 2
    budget = min(DENSE_COPY_MAX, (available_memory(torch.device("cpu")) if free is None
                                  else free) // 4)
    if need > budget:
        logger.info("GGUF-block layers run every batch on the block kernels: their bf16 "
                    "copies for large batches would take %.1f GiB, over the %.1f GiB allowed",
                    need / 2**30, budget / 2**30)
        return False
    for module in layers:
        module.keep_dense(dtype)
    return True


def interleave_blocks(model: torch.nn.Module, one_part_head: bool = True) -> None:
    """Reorder 4-bit GGUF-block layers eight rows at a time for the SIMD kernels
    (``gguf_linear.interleave``; the portable build keeps the file's order; blocks an
    embedding shares stay); a Q8_0 head's rows go in one 8-bit part (``Q8_0_HEAD``) with
    ``one_part_head``: all but an asked-for float32 (two parts, 15 bits)."""
    from deepserve.layers.gguf_linear import Q8_0, Q8_0_HEAD, X8, GGUFEmbedding, GGUFLinear
    from deepserve.layers.moe import Experts

    shared = {m.blocks.data_ptr() for m in model.modules() if isinstance(m, GGUFEmbedding)}
    for module in model.modules():
        if (isinstance(module, GGUFLinear) and module.blocks.data_ptr() not in shared) or \
                isinstance(module, Experts):
            module.interleave_blocks()
    head = getattr(model, "lm_head", None)  # an untied one was interleaved above
    if isinstance(head, GGUFLinear) and head.kernel_qtype == Q8_0 + X8 and one_part_head:
        head.kernel_qtype = Q8_0_HEAD
    if isinstance(head, GGUFLinear) and head.blocks.data_ptr() in shared and \
            head.keep_batch_blocks(shared=True, one_part=one_part_head):
        logger.info("output head: its Q8_0 blocks also interleaved for the 8-bit kernel (%.0f "
                    "MiB: the embedding reads the file's order)", head.batch_blocks.numel() / 2**20)


def latent_blocks(model: torch.nn.Module) -> None:
    """MLA layers whose projections run on GGUF blocks keep W_UK / W_UV as Q8_0 blocks
    too (``MLADecoderLayer.keep_blocks``)."""
    from deepserve.layers.gguf_linear import GGUFLinear
    from deepserve.models.deepseek import MLADecoderLayer

    for module in model.modules():
        if isinstance(module, MLADecoderLayer) and isinstance(module.o_proj, GGUFLinear):
            module.keep_blocks(kernels.isa() in ("avx512", "avx2"))


def parallel(config: EngineConfig, path: Path, kind: str, mcfg: ModelConfig,
             max_model_len: int) -> tuple[Any, ModelConfig, Any]:
    """With a tensor-, pipeline- or expert-parallel size > 1: start the
    other ranks (engine/parallel.py); (the group, this rank's model configuration, its
    part). Else (None, mcfg, None)."""
    if config.tensor_parallel_size == config.pipeline_parallel_size == \
            config.expert_parallel_size == 1:
        if config.distributed_executor_backend == "ray":
            logger.warning("--distributed-executor-backend ray has no other ranks to place: "
                           "every parallel size is 1, so the model runs in this process")
        return None, mcfg, None
    if config.device not in ("auto", "cpu"):
        raise DeepserveError("tensor and pipeline parallelism run on CPUs (gloo) in this "
                             "version; use --device cpu or sizes of 1",
                             param="tensor_parallel_size")
    from deepserve.engine.parallel import Parallel

    group = Parallel(config, path, kind, mcfg, max_model_len)
    return group, group.shard.local, group.shard


def start_parallel(engine: Any) -> None:
    """Rank 0's model hands every step to the other ranks, which now build their KV pool
    (the same blocks; their own KV heads or layers); tensor-parallel layers sum over the
    group."""
    tp = engine.parallel
    if tp is None:
        return
    from deepserve.models.parallel import set_group

    if tp.layer_group is not None:  # tensor ranks (of stage 0), or expert ranks
        set_group(engine.model, tp.layer_group, tp.layer_mode, engine.config.expert_dispatch)
    tp.start(engine.num_blocks, engine.dtype, engine.config.kv_cache_dtype)
    tp.wrap(engine.model)


def kv_blocks(config: EngineConfig, bytes_per_token: int, max_model_len: int,
              device: torch.device) -> int:
    """KV blocks in the pool: the byte budget given, or a share of free memory capped at
    what every sequence at full length could use."""
    per_block = bytes_per_token * config.block_size
    if config.kv_cache_memory is not None:
        blocks = parse_bytes(config.kv_cache_memory) // per_block
        if blocks < 2:
            raise DeepserveError(
                f"kv_cache_memory={config.kv_cache_memory!r} holds {blocks} blocks of "
                f"{config.block_size} tokens ({per_block} bytes each); give at least "
                f"{2 * per_block} bytes", param="kv_cache_memory")
        return int(blocks)
    budget = int(available_memory(device) * config.kv_cache_memory_fraction)
    ceiling = config.max_num_seqs * -(-max_model_len // config.block_size) + 1
    return int(max(2, min(budget // per_block, ceiling)))


def log_loaded(engine: Any, seconds: float) -> None:
    config, mcfg = engine.config, engine.model_config
    if engine.use_kernels:
        status = f"on ({kernels.isa()}{', AMX tiles for batches' if kernels.amx() else ''})"
    elif not config.cpu_kernels or engine.device.type != "cpu":
        status = "off"
    else:
        status = f"unavailable ({kernels.unavailable_reason()})"
    logger.info(
        "loaded %s (%s, %d layers) in %.1fs on %s as %s, weights %s: %s (%.0f MiB); KV cache "
        "%s: %d blocks x %d = %d tokens (%.0f MiB, %d bytes/token); max_model_len=%d; "
        "CPU kernels: %s; resident memory %s",
        engine.model_name, mcfg.architecture, mcfg.num_layers, seconds, engine.device,
        str(engine.dtype).replace("torch.", ""), config.quantization, weight_formats(engine.model),
        engine.weight_bytes / 2**20, config.kv_cache_dtype, engine.num_blocks,
        config.block_size, engine.kv_tokens,
        engine.kv_tokens * engine.kv_bytes_per_token / 2**20, engine.kv_bytes_per_token,
        engine.max_model_len, status, resident())
    if mcfg.is_mla:
        full = mcfg.num_layers * mcfg.full_kv_values * engine.kv_bytes_per_token // max(
            1, mcfg.num_layers * mcfg.cache_dim)
        logger.info("MLA latent KV cache: %d bytes/token (%d latent + %d rotary values a "
                    "layer) against %d for full K and V of every head: %.1fx smaller",
                    engine.kv_bytes_per_token, mcfg.kv_lora_rank, mcfg.qk_rope_head_dim, full,
                    full / engine.kv_bytes_per_token)


def resident() -> str:
    """This process's resident memory now (VmRSS), for the start-up log."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return f"{int(line.split()[1]) / 1024:.0f} MiB"
    except OSError:
        pass
    return "unknown"


def attach_slo(engine: Any) -> None:
    """With SLO targets, the scheduler asks an SLOController for each step's budget and
    batch cap, and the controller learns step times from the model runner."""
    cfg = engine.config
    if cfg.slo_ttft_ms is None and cfg.slo_tpot_ms is None:
        return
    from deepserve.engine.slo import SLOController

    ctrl = SLOController(cfg.slo_ttft_ms, cfg.slo_tpot_ms, cfg.max_num_batched_tokens,
                         cfg.max_num_seqs)
    engine.scheduler.slo = ctrl
    engine.runner.step_observers.append(ctrl.observe)
    logger.info("adaptive batching for TTFT %s ms, TPOT %s ms (budget up to %d tokens, "
                "up to %d sequences)", cfg.slo_ttft_ms, cfg.slo_tpot_ms,
                cfg.max_num_batched_tokens, cfg.max_num_seqs)
