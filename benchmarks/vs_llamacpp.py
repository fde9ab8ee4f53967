"""deepserve against llama.cpp on the same GGUF, same prompts, same threads, one run.

Measures, for both engines, with greedy decoding and token ids fed directly (no
tokenizer differences):

* prompt processing (prefill): tok/s over the batch's prompts, 1, 32 or 64 of them;
* single-stream decode: tok/s after the prompt;
* batched generation: N sequences of 128 prompt tokens and 64 new tokens each, all
  decoded together; output tok/s with prefill included, and decode alone.

llama.cpp runs through llama-cpp-python's low-level API (``llama_batch`` with one
sequence id per request, as ``llama-batched-bench`` does). Install it with
``make bench-deps``. The engines run one after the other, never at the same time,
each on fresh prompts per repeat (deepserve's prefix cache off); medians of the repeats.

    .venv/bin/python benchmarks/vs_llamacpp.py --threads 2 --batch 32 64
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from deepserve import LLM, SamplingParams
from deepserve.loader.resolve import default_model_path

PROMPT_LEN, NEW_TOKENS = 128, 64


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, 40000, PROMPT_LEN).tolist() for _ in range(n)]


# -- llama.cpp ---------------------------------------------------------------------------
class LlamaCpp:
    def __init__(self, path: Path, threads: int, n_seq: int) -> None:
        import llama_cpp as lc

        self.lc = lc
        # llama.cpp logs every tensor it loads: keep its log quiet.
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)
        lc.llama_log_set(self._quiet, ctypes.c_void_p(0))
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_seq * (PROMPT_LEN + NEW_TOKENS + 16)
        cparams.n_batch = max(2048, n_seq * PROMPT_LEN)
        cparams.n_ubatch = 512
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(cparams.n_batch, 0, n_seq)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, wants logits)."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                    shape=(self.n_vocab,))
        return int(row.argmax())

    def reset(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def run(self, seqs: list[list[int]], new_tokens: int) -> tuple[float, float]:
        """Prefill every sequence, then decode them together. Returns (prefill s, decode s)."""
        self.reset()
        t0 = time.perf_counter()
        entries = [(tok, pos, s, pos == len(p) - 1)
                   for s, p in enumerate(seqs) for pos, tok in enumerate(p)]
        step = 2048  # tokens per llama_decode call (it splits them into ubatches)
        last_rows: dict[int, int] = {}
        for start in range(0, len(entries), step):
            chunk = entries[start:start + step]
            self._decode(chunk)
            for i, (_, _, s, want) in enumerate(chunk):
                if want:
                    last_rows[s] = i
        nxt = {s: self._argmax(i) for s, i in last_rows.items()}
        t1 = time.perf_counter()
        for k in range(new_tokens - 1):
            order = sorted(nxt)
            self._decode([(nxt[s], PROMPT_LEN + k, s, True) for s in order])
            nxt = {s: self._argmax(i) for i, s in enumerate(order)}
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


# -- deepserve ---------------------------------------------------------------------------
def deepserve_run(llm: LLM, seqs: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(prefill s, decode s) for the batch, from the engine's own step loop."""
    eng = llm.engine
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for p in seqs:
        eng.add_request(None, p, params)
    t0 = time.perf_counter()
    t1 = None
    while eng.has_unfinished():
        eng.step()
        if t1 is None and all(s.num_computed >= PROMPT_LEN for s in eng.scheduler.running) \
                and not eng.scheduler.waiting:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def summarize(name: str, runs: list[tuple[float, float]], n: int) -> dict[str, float]:
    pre = statistics.median(r[0] for r in runs)
    dec = statistics.median(r[1] for r in runs)
    return {"engine": name, "sequences": n, "prefill_tok_s": n * PROMPT_LEN / pre,
            "decode_tok_s": n * (NEW_TOKENS - 1) / dec,
            "output_tok_s_with_prefill": n * NEW_TOKENS / (pre + dec)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantization", nargs="+", default=["none", "int8"])
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--out", default="results/vs_llamacpp.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [1, *args.batch]
    rows = []
    if not args.skip_llamacpp:
        cpp = LlamaCpp(default_model_path(), args.threads, max(sizes))
        for n in sizes:
            cpp.run(prompts(n), 4)  # warm-up
            rows.append(summarize("llama.cpp Q4_1", [cpp.run(prompts(n, seed), NEW_TOKENS)
                                                      for seed in range(1, args.repeats + 1)],
                                  n))
            print(rows[-1], flush=True)
        del cpp
    for quant in args.quantization:
        # Prefix caching off: every repeat must compute its prompts (new ones anyway).
        llm = LLM(quantization=quant, max_num_seqs=max(sizes), max_num_batched_tokens=2048,
                  enable_prefix_caching=False, show_progress=False, num_threads=args.threads)
        name = "deepserve bf16" + ("" if quant == "none" else f" + {quant} weights")
        for n in sizes:
            deepserve_run(llm, prompts(n), 4)  # warm-up
            rows.append(summarize(name, [deepserve_run(llm, prompts(n, seed), NEW_TOKENS)
                                         for seed in range(1, args.repeats + 1)], n))
            print(rows[-1], flush=True)
        del llm
    print()
    print("| engine | sequences | prefill tok/s | decode tok/s | output tok/s (prefill incl.) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['sequences']} | {r['prefill_tok_s']:.0f} | "
              f"{r['decode_tok_s']:.0f} | {r['output_tok_s_with_prefill']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
