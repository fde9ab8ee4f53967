"""Where one decoder layer's time goes at a small batch: the fused one-call layer
(``kernels.decode_layer``) against each of its ops called alone, on the default model's
real weights and KV cache, and the GEMVs of every layer in turn (weights streamed from
L3 or memory, as in a real step, rather than from L2).

Fills the batch with 128-token random prompts, decodes a few tokens, captures one
layer's ``decode_layer`` arguments, then times in a loop (microseconds a call; each
op alone includes about 2.7 us of Python dispatch, printed as ``dispatch``).

    .venv/bin/python benchmarks/decode_layer_parts.py [--batch 1] [--model FILE]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch

from deepserve import kernels
from deepserve.config import EngineConfig
from deepserve.engine.llm_engine import LLMEngine
from deepserve.sampling_params import SamplingParams


def timed(f: Callable[[], object], n: int = 2000) -> float:
    for _ in range(50):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the engine's pick)")
    args = ap.parse_args()
    extra = {"model": args.model} if args.model else {}
    if args.dtype:
        extra["dtype"] = args.dtype
    eng = LLMEngine(EngineConfig(max_num_seqs=args.batch, enable_prefix_caching=False,
                                 **extra), show_progress=False)
    rng = random.Random(0)
    for _ in range(args.batch):
        eng.add_request(None, [rng.randint(100, 20000) for _ in range(128)],
                        SamplingParams(max_tokens=64, ignore_eos=True))
    while eng.scheduler.waiting or any(s.num_computed < 128 for s in eng.scheduler.running):
        eng.step()  # every prompt in: the next step is decode rows only
    eng.step()
    captured: list[tuple] = []
    eng.model._plans = None  # one call a layer (not decode_layers), to capture a layer's
    fused = kernels.decode_layer
    kernels.decode_layer = lambda x, *a: captured.append((x, a)) or fused(x, *a)
    eng.step()
    kernels.decode_layer = fused
    if not captured:
        raise SystemExit("this model's layers do not run as one call (decode_layer)")
    x, a = captured[0]
    ops = kernels.ops()
    (in_norm, post_norm, eps, _, _, qkv_w, qkv_t, _, o_w, o_t, gu_w, gu_t, d_w, d_t, cos, sin,
     kc, vc, slots, heads, kv_heads, table, ctx, bs, scale) = a
    h = ops.rms_norm(x, None, in_norm, eps)[0]
    qkv = ops.linear_gguf(h, qkv_w, qkv_t, None)
    q = ops.rope_write_kv(qkv, cos, sin, kc, vc, slots, heads, kv_heads)[0]
    att = ops.paged_decode_attention(q, kc, vc, None, None, table, ctx, bs, scale)
    att = att.reshape(x.shape[0], -1)
    o = ops.linear_gguf(att, o_w, o_t, None)
    up = ops.linear_gguf(h, gu_w, gu_t, None)
    act = ops.silu_mul(up)
    tiny = torch.randn(1, 16, dtype=x.dtype)
    parts = {
        "decode_layer (the whole layer, one call)": lambda: ops.decode_layer(x, *a),
        "dispatch (an op on 16 numbers)": lambda: ops.rms_norm(tiny, None, tiny[0], eps),
        "rms_norm": lambda: ops.rms_norm(x, None, in_norm, eps),
        "qkv GEMV": lambda: ops.linear_gguf(h, qkv_w, qkv_t, None),
        "rotary + KV write": lambda: ops.rope_write_kv(qkv, cos, sin, kc, vc, slots, heads,
                                                       kv_heads),
        f"attention ({int(ctx.max())} tokens)": lambda: ops.paged_decode_attention(
            q, kc, vc, None, None, table, ctx, bs, scale),
        "o GEMV": lambda: ops.linear_gguf(att, o_w, o_t, None),
        "rms_norm + residual": lambda: ops.rms_norm(x, o, post_norm, eps),
        "gate_up GEMV": lambda: ops.linear_gguf(h, gu_w, gu_t, None),
        "SwiGLU": lambda: ops.silu_mul(up),
        "down GEMV": lambda: ops.linear_gguf(act, d_w, d_t, None),
    }
    print(f"{x.shape[0]} decode rows, {torch.get_num_threads()} threads, one layer's ops "
          "alone (at one row its weights stay in L2):")
    for name, f in parts.items():
        print(f"  {name:42s} {timed(f):7.1f} us")
    layers = eng.runner.model.layers
    print("every layer's GEMV in turn (weights from L3 / memory, as in a step):")
    for name, attr, rows in (("gate_up", "gate_up_proj", h), ("down", "down_proj", act)):
        ws = [(getattr(m, attr).blocks, getattr(m, attr).kernel_qtype) for m in layers]
        us = timed(lambda ws=ws, rows=rows: [ops.linear_gguf(rows, w, t, None)
                                             for w, t in ws], 200)
        size = sum(w.numel() for w, _ in ws)
        print(f"  {name:8s} x{len(ws)}: {us / len(ws):6.1f} us a layer, "
              f"{size / us / 1e3:5.1f} GB/s")


if __name__ == "__main__":
    main()
