"""How a model is split: which kind of parallelism a configuration asks for, whether
the model divides that many ways (a clear error naming the sizes that work if not),
each rank's part and its threads (``engine/parallel.py`` starts the ranks)."""

from __future__ import annotations

import os
from typing import Any

from deepserve.errors import DeepserveError
from deepserve.models.config import ModelConfig
from deepserve.models.parallel import ExpertShard, Shard, Stage, StageShard


def check_sizes(cfg: ModelConfig, tp: int, experts: bool = False) -> None:
    """A clear error for a model this many ranks cannot split evenly. ``experts``: the
    MoE experts are spread whole over the same ranks (``--expert-parallel-size``)."""
    if cfg.is_mla or (cfg.num_experts and not experts):
        raise DeepserveError(f"--tensor-parallel-size {tp}: tensor parallelism splits "
                             "Llama-family attention (Llama, Qwen2, Qwen3, Qwen3-MoE); "
                             + ("this model has latent attention: serve it with "
                                "--expert-parallel-size alone (attention replicated)"
                                if cfg.is_mla else
                                f"this model's experts go whole to the same ranks: add "
                                f"--expert-parallel-size {tp}"),
                             param="tensor_parallel_size")
    dense = any(not cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    works = [n for n in range(1, cfg.num_kv_heads + 1)
             if cfg.num_heads % n == 0 and cfg.num_kv_heads % n == 0
             and (not dense or cfg.intermediate_size % (n * 32) == 0)
             and (cfg.num_heads // n * cfg.head_dim) % 32 == 0
             and (not experts or cfg.num_experts % n == 0)]
    if tp not in works:
        raise DeepserveError(
            f"--tensor-parallel-size {tp} does not split this model evenly: it has "
            f"{cfg.num_heads} attention heads, {cfg.num_kv_heads} KV heads"
            + (f", an MLP of {cfg.intermediate_size}" if dense else "")
            + (f" and {cfg.num_experts} experts" if experts else "")
            + " (each rank needs whole heads and whole 32-wide blocks); sizes that work: "
            f"{', '.join(map(str, works))}", param="tensor_parallel_size")


def threads_per_rank(config: Any, size: int) -> int:
    """Each rank's torch threads: the configured number, else the cores shared out."""
    return config.num_threads or max(1, (os.cpu_count() or 1) // size)


def plan(config: Any, full: ModelConfig) -> tuple[str, int]:
    """("tensor", "pipeline", "tensor+pipeline" or "expert", ranks) for the
    configuration, or a clear error."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    ep = config.expert_parallel_size
    if ep > 1 and (not full.num_experts or full.num_experts % ep):
        raise DeepserveError(
            f"--expert-parallel-size {ep} needs a mixture-of-experts model whose expert "
            f"count it divides; this model has {full.num_experts or 'no'} experts",
            param="expert_parallel_size")
    if ep > 1 and tp * pp > 1:
        if pp > 1:
            raise DeepserveError(
                f"--expert-parallel-size {ep} cannot be combined with --pipeline-parallel-size "
                f"{pp}: expert parallelism runs alone (attention replicated) or over the "
                f"tensor-parallel ranks themselves (--tensor-parallel-size {ep}); drop "
                "--pipeline-parallel-size", param="expert_parallel_size")
        if ep != tp:
            raise DeepserveError(
                f"--expert-parallel-size {ep} with --tensor-parallel-size {tp}: with tensor "
                "parallelism the experts are spread whole over the tensor-parallel ranks "
                f"themselves: give --expert-parallel-size {tp}", param="expert_parallel_size")
        check_sizes(full, tp, experts=True)
        return "tensor", tp
    if ep > 1:
        return "expert", ep
    if pp > full.num_layers:
        raise DeepserveError(f"--pipeline-parallel-size {pp} is more than this model's "
                             f"{full.num_layers} layers; give at most {full.num_layers}",
                             param="pipeline_parallel_size")
    if tp > 1:
        check_sizes(full, tp)
        return ("tensor", tp) if pp == 1 else ("tensor+pipeline", tp * pp)
    return "pipeline", pp


def part(mode: str, rank: int, size: int, full: ModelConfig, tp: int = 1
         ) -> Shard | Stage | ExpertShard:
    """Rank ``rank``'s part; with tensor and pipeline parallelism together, ranks
    ``s * tp`` .. ``s * tp + tp - 1`` are stage s's tensor ranks. A tensor-parallel
    MoE model (checked by ``plan``) spreads its experts over the same ranks."""
    if mode == "tensor+pipeline":
        return StageShard(rank % tp, tp, full, stage=rank // tp, stages=size // tp)
    if mode == "tensor" and full.num_experts:
        return Shard(rank, size, full, experts=True)
    kind = {"tensor": Shard, "pipeline": Stage, "expert": ExpertShard}[mode]
    return kind(rank, size, full)


def stage_group_size(mode: str, config: Any) -> int:
    """Ranks that split each layer: the tensor-parallel size within a stage."""
    return config.tensor_parallel_size if mode in ("tensor", "tensor+pipeline") else 1
