"""Offline throughput of the engine on a workload, with peak memory and step-time shares."""

from __future__ import annotations

import resource
import time
from typing import Any

from deepserve.bench.workloads import BenchRequest
from deepserve.config import EngineConfig


def run_offline(config: EngineConfig, requests: list[BenchRequest],
                ignore_eos: bool = True, temperature: float = 0.0) -> dict[str, Any]:
    """Give the engine every request at once and measure until all finish."""
    from deepserve.engine.llm_engine import LLMEngine
    from deepserve.sampling_params import SamplingParams

    engine = LLMEngine(config, show_progress=False)
    warm = SamplingParams(max_tokens=2)
    engine.add_request(None, "warm-up", warm)
    while engine.has_unfinished():
        engine.step()
    for key in engine.runner.timings:
        engine.runner.timings[key] = 0.0
    prepared = []
    for r in requests:
        _, ids = engine.tokenize_prompt(r.prompt, r.messages)
        prepared.append((ids, SamplingParams(max_tokens=r.max_tokens, temperature=temperature,
                                             ignore_eos=ignore_eos)))
    steps0 = engine.num_steps
    start = time.perf_counter()
    for ids, params in prepared:
        engine.add_request(None, None, params, prompt_ids=ids)
    out_tokens = 0
    in_tokens = sum(len(ids) for ids, _ in prepared)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                out_tokens += out.num_output_tokens
    elapsed = time.perf_counter() - start
    t = dict(engine.runner.timings)
    total = sum(t.values()) or 1.0
    return {
        "requests": len(prepared), "prompt_tokens": in_tokens, "output_tokens": out_tokens,
        "duration_s": elapsed, "output_throughput": out_tokens / elapsed,
        "total_token_throughput": (in_tokens + out_tokens) / elapsed,
        "steps": engine.num_steps - steps0,
        "step_time_shares": {k: v / total for k, v in t.items()},
        "overhead_share": 1.0 - t["forward"] / total,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "engine": {"dtype": str(engine.dtype).replace("torch.", ""),
                   "max_num_seqs": config.max_num_seqs,
                   "max_num_batched_tokens": config.max_num_batched_tokens,
                   "kv_cache_tokens": engine.kv_tokens, "model": engine.model_name},
        "prefix_cache_hit_rate": engine.block_manager.hit_rate,
    }
