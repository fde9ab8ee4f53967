"""Quality and speed of each weight format and KV-cache dtype against the fp32 model.

For every format: teacher-forced top-1 agreement and mean KL divergence of the
next-token distributions against float32 (same prompts, same contexts: the fp32
greedy continuation), the free-running greedy prefix shared with fp32, weight memory,
KV bytes per token, and offline output tok/s at batch 1 and batch 32.

    .venv/bin/python benchmarks/quality.py --prompts 32 --tokens 64
    .venv/bin/python benchmarks/quality.py --formats bfloat16:auto:auto --skip-speed
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

from deepserve import LLM, SamplingParams
from deepserve.bench.offline import run_offline
from deepserve.bench.workloads import chat_prompts, random_workload
from deepserve.config import EngineConfig

FORMATS = [("float32", "none", "auto"), ("bfloat16", "none", "auto"),
           ("bfloat16", "int8", "auto"), ("bfloat16", "int4", "auto"),
           ("bfloat16", "mixed", "auto"), ("bfloat16", "none", "int8"),
           ("bfloat16", "none", "fp8"), ("bfloat16", "mixed", "int8")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--formats", nargs="+", metavar="DTYPE:WEIGHTS:KV",
                    help="only these rows, e.g. bfloat16:auto:auto (the default engine: "
                         "the file's own blocks)")
    ap.add_argument("--out", default="results/quality.json")
    args = ap.parse_args()

    texts = [p["prompt"] for p in chat_prompts()[:args.prompts]]
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    ref = LLM(dtype="float32", show_progress=False, kv_cache_memory="256MiB")
    ref_outs = ref.generate(texts, greedy)
    contexts = [o.prompt_token_ids + o.token_ids for o in ref_outs]
    ref_logp = [torch.log_softmax(ref.engine.prompt_logits(c, args.tokens), -1)
                for c in contexts]
    tok = ref.tokenizer
    del ref
    gc.collect()
    rows = []
    formats = [tuple(f.split(":")) for f in args.formats] if args.formats else FORMATS
    for dtype, quant, kv in formats:
        llm = LLM(dtype=dtype, quantization=quant, kv_cache_dtype=kv, show_progress=False,
                  kv_cache_memory="256MiB")
        outs = llm.generate(texts, greedy)
        prefix = []
        for o, r in zip(outs, ref_outs, strict=True):
            n = 0
            while n < len(r.token_ids) and o.token_ids[n] == r.token_ids[n]:
                n += 1
            prefix.append(n)
        kls, agree = [], []
        for c, lp_ref in zip(contexts, ref_logp, strict=True):
            # Teacher-forced: the same context, the last `tokens` positions. The engine
            # caches KV in its own dtype, so a KV format affects these logits too.
            lp = torch.log_softmax(llm.engine.prompt_logits(c, args.tokens).float(), -1)
            kls.append((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean().item())
            agree.append((lp.argmax(-1) == lp_ref.argmax(-1)).float().mean().item())
        row = {"dtype": dtype, "weights": quant, "kv": kv,
               "top1_agreement": sum(agree) / len(agree),
               "mean_kl": sum(kls) / len(kls),
               "greedy_prefix_tokens": sum(prefix) / len(prefix),
               "weight_mib": llm.engine.weight_bytes / 2**20,
               "kv_bytes_per_token": llm.engine.kv_bytes_per_token}
        del llm
        gc.collect()
        if not args.skip_speed:
            for batch in (1, 32):
                cfg = EngineConfig(dtype=dtype, quantization=quant, kv_cache_dtype=kv,
                                   max_num_seqs=batch, kv_cache_memory="512MiB",
                                   enable_prefix_caching=False)
                res = run_offline(cfg, random_workload(tok, batch, 128, 64, seed=batch))
                row[f"tok_s_batch{batch}"] = res["output_throughput"]
                gc.collect()
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"\n{args.prompts} prompts x {args.tokens} tokens, against float32\n")
    print("| compute | weights | KV cache | top-1 agreement | mean KL (nats) | greedy prefix "
          "kept | weight MiB | KV bytes/token | tok/s batch 1 | tok/s batch 32 |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['weights']} | {r['kv']} | {r['top1_agreement']:.1%} | "
              f"{r['mean_kl']:.4f} | {r['greedy_prefix_tokens']:.1f}/{args.tokens} | "
              f"{r['weight_mib']:.0f} | {r['kv_bytes_per_token']} | "
              f"{r.get('tok_s_batch1', float('nan')):.0f} | "
              f"{r.get('tok_s_batch32', float('nan')):.0f} |")


if __name__ == "__main__":
    main()
