"""Time of one decode step at a fixed batch, and where it goes.

Fills the batch with 128-token random prompts, runs prefill, then times decode steps
(each sequence has 128-160 tokens of context) and splits them into the engine's phases
(schedule, prepare, forward, sample, postprocess). ``--profile`` adds torch.profiler's
top ops. Sampling is temperature 1.0, as an OpenAI request's default (``--temperature``).

    .venv/bin/python benchmarks/decode_step.py --batch 1 32 64
    .venv/bin/python benchmarks/decode_step.py --batch 32 --no-cpu-kernels --profile
"""

from __future__ import annotations

import argparse
import random
import time

from deepserve.config import EngineConfig
from deepserve.engine.llm_engine import LLMEngine
from deepserve.sampling_params import SamplingParams


def measure(batch: int, steps: int, profile: bool, temperature: float = 1.0,
            head_picks: bool = True, **engine: object) -> None:
    eng = LLMEngine(EngineConfig(max_num_seqs=batch, enable_prefix_caching=False, **engine),
                    show_progress=False)
    if not head_picks:  # greedy rows through the float32 logits and argmax_rows
        eng.runner.model.greedy_tokens = lambda hidden: None
    rng = random.Random(0)
    params = SamplingParams(max_tokens=steps + 64, ignore_eos=True, temperature=temperature)
    for _ in range(batch):
        eng.add_request(None, [rng.randint(100, 40000) for _ in range(128)], params)
    while eng.scheduler.waiting or any(s.num_computed < 128 for s in eng.scheduler.running):
        eng.step()
    for _ in range(5):
        eng.step()
    before = dict(eng.runner.timings)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    per_step = (time.perf_counter() - t0) / steps
    phases = {k: (eng.runner.timings[k] - before[k]) / steps * 1e3 for k in before}
    split = ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
    print(f"batch {batch}: {per_step * 1e3:.2f} ms per decode step = {batch / per_step:.0f} "
          f"tok/s ({split} ms)", flush=True)
    if profile:
        from torch.profiler import profile as torch_profile

        with torch_profile() as prof:
            for _ in range(10):
                eng.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--cpu-kernels", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="0: greedy, as deepserve bench serve asks by default")
    ap.add_argument("--head-picks", action=argparse.BooleanOptionalAction, default=True,
                    help="greedy rows picked on the head's AMX tiles, the logits never "
                         "written (--no-head-picks: the logits and argmax_rows)")
    ap.add_argument("--model", default=None, help="a local model (default: the packaged one)")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the engine's pick)")
    args = ap.parse_args()
    extra = {"model": args.model} if args.model else {}
    if args.dtype:
        extra["dtype"] = args.dtype
    for b in args.batch:
        measure(b, args.steps, args.profile, args.temperature, args.head_picks,
                quantization=args.quantization,
                kv_cache_dtype=args.kv_cache_dtype, cpu_kernels=args.cpu_kernels, **extra)


if __name__ == "__main__":
    main()
