"""Offline throughput: deepserve vs HF transformers `generate` on the same prompts.

Both systems get the same random-token prompts (128 in, 128 out by default), the same
batch sizes and the same thread count, in one run of this script. transformers runs
bf16 with a static batch (batch = the concurrency) and min_new_tokens so every row
makes exactly the requested tokens; deepserve gets all prompts at once and batches them
itself up to --max-num-seqs = the batch size.

    python benchmarks/offline_vs_transformers.py --batch-sizes 1 8 32 64
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def make_prompts(tokenizer, n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(1000, 40000) if i not in special]
    return [[vocab[j] for j in torch.randint(len(vocab), (length,), generator=g).tolist()]
            for _ in range(n)]


def bench_deepserve(prompts, out_len: int, batch: int, dtype: str) -> dict:
    from deepserve import LLM, SamplingParams

    llm = LLM(dtype=dtype, show_progress=False, max_num_seqs=batch,
              max_num_batched_tokens=max(2048, batch * 16), kv_cache_memory="1GiB",
              enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    llm.generate(prompts[:batch][:2], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    steps0 = llm.engine.num_steps
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {"system": "deepserve", "batch": batch, "requests": len(prompts),
            "output_tokens": tokens, "seconds": elapsed, "output_tok_s": tokens / elapsed,
            "steps": llm.engine.num_steps - steps0}


def bench_transformers(model, prompts, out_len: int, batch: int) -> dict:
    start_all = time.perf_counter()
    tokens = 0
    with torch.inference_mode():
        # warm-up
        model.generate(torch.tensor([prompts[0][:8]]), max_new_tokens=2, do_sample=False)
        start_all = time.perf_counter()
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i:i + batch])
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=out_len, min_new_tokens=out_len,
                                 do_sample=False, pad_token_id=0)
            tokens += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    elapsed = time.perf_counter() - start_all
    return {"system": "transformers", "batch": batch, "requests": len(prompts),
            "output_tokens": tokens, "seconds": elapsed, "output_tok_s": tokens / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", default="results/offline_vs_transformers.json")
    args = ap.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepserve.loader.resolve import default_model_path

    transformers.logging.set_verbosity_error()
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = None
    if not args.skip_transformers:
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=getattr(torch, args.dtype)).eval()
    rows = []
    for batch in args.batch_sizes:
        prompts = make_prompts(tok, batch, args.input_len, seed=batch)
        rows.append(bench_deepserve(prompts, args.output_len, batch, args.dtype))
        print(json.dumps(rows[-1]), flush=True)
        if hf is not None:
            rows.append(bench_transformers(hf, prompts, args.output_len, batch))
            print(json.dumps(rows[-1]), flush=True)
    meta = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "input_len": args.input_len, "output_len": args.output_len, "dtype": args.dtype}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\n| batch | deepserve out tok/s | transformers out tok/s | speed-up |")
    print("|---:|---:|---:|---:|")
    for batch in args.batch_sizes:
        ds = next(r for r in rows if r["batch"] == batch and r["system"] == "deepserve")
        hf_row = next((r for r in rows if r["batch"] == batch
                       and r["system"] == "transformers"), None)
        hf_s = f"{hf_row['output_tok_s']:.0f}" if hf_row else "-"
        ratio = f"{ds['output_tok_s'] / hf_row['output_tok_s']:.1f}x" if hf_row else "-"
        print(f"| {batch} | {ds['output_tok_s']:.0f} | {hf_s} | {ratio} |")


if __name__ == "__main__":
    main()
