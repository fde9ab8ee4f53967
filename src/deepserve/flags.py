"""Command-line flags generated from configuration dataclasses: one flag per field
(``--max-num-seqs`` -> ``max_num_seqs``), so a setting cannot exist in one place and
be missing in the other. Used by ``deepserve serve``, ``generate``, ``chat`` and
``bench offline``."""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

from deepserve.config import EngineConfig

ENGINE_HELP = {
    "model": "local .gguf file or Hugging Face folder (default: packaged SmolLM2-135M-Instruct)",
    "tokenizer": "tokenizer folder, if not the model's own",
    "served_model_name": "model name clients use (default: derived from the model)",
    "dtype": "auto | float32 | bfloat16 | float16 (auto: bf16 where the hardware has it)",
    "device": "auto | cpu | cuda",
    "max_model_len": "context length (default: the model's)",
    "max_num_seqs": "most sequences in one batch",
    "max_num_batched_tokens": "token budget of one engine step (with --slo-*: its ceiling)",
    "slo_ttft_ms": "time-to-first-token target: with it (or --slo-tpot-ms) the scheduler "
                   "picks each step's token budget and batch size from the queue and "
                   "measured step times",
    "slo_tpot_ms": "time-per-output-token target: steps are kept under it while sequences "
                   "decode (prefill chunks shrink to fit)",
    "block_size": "tokens per KV-cache block",
    "kv_cache_memory": "KV-cache pool size, e.g. 512MiB or 2GB",
    "kv_cache_memory_fraction": "share of free memory for the KV cache when no size is given",
    "enable_prefix_caching": "reuse KV blocks of shared prompt prefixes",
    "enable_chunked_prefill": "split long prompts across steps",
    "seed": "seed of the generator that requests without their own seed draw from",
    "num_threads": "torch CPU threads (default: torch's choice; with tensor parallelism, "
                   "per rank: the cores shared out)",
    "tensor_parallel_size": "ranks that split every layer's heads and MLP, and the "
                            "embedding and head by vocabulary "
                            "(torch.distributed, gloo), started by deepserve itself as "
                            "processes on this host (or Ray actors, see "
                            "--distributed-executor-backend); the scheduler and sampler "
                            "stay on rank 0",
    "pipeline_parallel_size": "ranks that each hold a contiguous range of "
                              "whole layers (and their KV cache); hidden states pass from "
                              "stage to stage (gloo), each step in micro-batches so the "
                              "stages overlap; with --tensor-parallel-size, each stage is "
                              "split that many ways",
    "expert_parallel_size": "ranks that each hold a share of every MoE "
                            "layer's routed experts (attention replicated); their outputs "
                            "are summed with one all-reduce per MoE layer; equal to "
                            "--tensor-parallel-size, the experts spread over the tensor "
                            "ranks themselves (attention split by heads)",
    "expert_dispatch": "with --expert-parallel-size: all-reduce (every rank routes every "
                       "token and runs its experts' picks, one sum per MoE layer) or "
                       "all-to-all (each rank routes its share of the tokens and sends "
                       "them to their experts' ranks and back, shared experts split too)",
    "distributed_executor_backend": "where the other ranks of a split model run: mp "
                                    "(processes on this host) or ray (Ray actors on any "
                                    "node of the cluster: a replica spans machines)",
    "quantization": "weights: auto (a GGUF's own Q4_0/Q4_1/Q8_0 blocks as stored, else "
                    "none) | none | int8 (Q8_0) | int4 (Q4_1) | mixed (MLP Q4_1, "
                    "attention Q8_0)",
    "kv_cache_dtype": "KV cache storage: auto (compute dtype; fp16 where dtype auto fell "
                      "back to float32) | fp16 | int8 (with scales) | fp8",
    "cpu_kernels": "use deepserve's C++ CPU kernels (small-batch matmul, paged decode "
                   "attention; compiled once on first use); --no-cpu-kernels: torch ops only",
}


def _scalar(hint: Any) -> type:
    """int / float / str for a field's type hint (``int | None`` -> int; a hint that
    admits str, such as ``str | int``, stays str for the field to parse)."""
    if hint is str or str in typing.get_args(hint):
        return str
    for kind in (bool, int, float):
        if hint is kind or kind in typing.get_args(hint):
            return kind
    return str


def add_dataclass_args(parser: argparse.ArgumentParser | Any, cls: type,
                       helps: dict[str, str], skip: tuple[str, ...] = (),
                       choices: dict[str, list[str]] | None = None,
                       types: dict[str, Callable[[str], Any]] | None = None) -> None:
    """One flag per field of ``cls``; booleans get ``--x/--no-x``."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        kind = _scalar(hints[f.name])
        if kind is bool:
            parser.add_argument(flag, dest=f.name, default=default,
                                action=argparse.BooleanOptionalAction,
                                help=helps.get(f.name))
            continue
        parser.add_argument(flag, dest=f.name, default=default,
                            type=(types or {}).get(f.name, kind),
                            choices=(choices or {}).get(f.name), help=helps.get(f.name))


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The dataclass built from the parsed flags of its fields."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**(values | overrides))


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field: --max-num-seqs -> max_num_seqs."""
    add_dataclass_args(parser.add_argument_group("engine"), EngineConfig, ENGINE_HELP)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return from_args(EngineConfig, args)
