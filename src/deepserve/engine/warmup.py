"""Warm-up: run the shapes a server will see before it reports ready, so the first request
does not pay for first-call costs (allocator growth, oneDNN primitive creation, kernel
dispatch caches, the dense copies used for large batches).

The shapes: one long prefill (a full token budget's chunk, up to 256 tokens), then
decode steps at batch sizes 1, 8 and 32 (capped at ``max_num_seqs``) over 4-token
prompts, two generated tokens each: what the first requests meet, at the least cost to
load time (the longer 512 / 24-token version took 2.3 s on an AVX2 path). A model on
GGUF blocks alone (no bf16 copies; ``blocks_only``) gets one 4-token prompt and one
generated token (its kernels have no per-shape first-call cost). Prompts are
token ids that no chat request produces; afterwards the warm-up's prefix-cache entries
are dropped and the counters that ``/metrics`` reads are reset, so the server starts as
if nothing had run.
"""

from __future__ import annotations

import logging
import time

import torch

from deepserve.engine.llm_engine import LLMEngine
from deepserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

BATCHES = (1, 8, 32)


def measure(engine: LLMEngine) -> None:
    """Give the engine's utilization tracker this machine's peak (measured once per
    machine, then read from the cache)."""
    from deepserve.engine.utilization import measure_peak

    engine.runner.utilization.set_peak(*measure_peak(engine.dtype, engine.device))


def blocks_only(model) -> bool:
    """Whether every projection runs on GGUF blocks with no bf16 copy: deepserve's own
    kernels have no per-shape first-call cost, so one short request stands in for the
    shapes above (on a 1.1B model, a 200-token prompt then a batch of 8 took 1239 ms
    cold, 1150-1180 ms later; after one 4-token request the first took 1147-1174 ms,
    later ones 1113-1154; a 16-token one costs a DeepSeek-V2-Lite-half start 0.2 s)."""
    from deepserve.layers.gguf_linear import GGUFLinear

    blocks = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    return bool(blocks) and all(m.dense is None for m in blocks) and \
        not any(isinstance(m, torch.nn.Linear) for m in model.modules())


def warm_up(engine: LLMEngine) -> float:
    """Run the warm-up shapes on the engine (in the engine's own thread, before it
    serves); returns the seconds it took."""
    start = time.perf_counter()
    cfg = engine.config
    vocab = engine.model_config.vocab_size
    limit = max(16, min(256, cfg.max_num_batched_tokens, engine.max_model_len - 8))
    params = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0)

    def ids(n: int, seed: int) -> list[int]:
        return [(1000 + seed * 7919 + i * 31) % (vocab - 1) + 1 for i in range(n)]

    shapes = [(1, limit)] + [(b, 4) for b in BATCHES if b <= cfg.max_num_seqs]
    if blocks_only(engine.model):
        shapes = [(1, 4)]
    layout, engine.runner.layout = engine.runner.layout, None  # not beside the warm-up
    try:
        for n, (batch, length) in enumerate(shapes):
            for i in range(batch):
                engine.add_request(f"warmup-{n}-{i}", None, params,
                                   prompt_ids=ids(length, n * 100 + i))
            while engine.has_unfinished():
                engine.step()
    finally:
        engine.runner.layout = layout
    if layout is not None:
        layout.start()
    bm = engine.block_manager
    bm.reset_prefix_cache()
    u = engine.runner.utilization
    u.flops_total = u.bytes_total = 0.0
    u._window.clear()
    bm.queried_tokens = bm.hit_tokens = 0
    engine.num_steps = 0
    engine.publish_stats()
    took = time.perf_counter() - start
    logger.info("warm-up: %s in %.1f s", ", ".join(
        f"{b} x {n} tokens" for b, n in shapes), took)
    return took
