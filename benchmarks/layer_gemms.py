"""Time of a model's own GEMMs at a batch of rows: each decoder layer's fused gate_up with
SwiGLU (``GGUFLinear.swiglu`` where the tiles run it, else gate_up then silu_mul), qkv,
o and down projections, called on every layer in turn (weights read as a step reads them,
not from a warm cache), on random bf16 rows. Prints the best of ``--repeats`` passes, in
ms a layer and TFLOP/s (2 x rows x in x out).

    .venv/bin/python benchmarks/layer_gemms.py --rows 64 2048
    .venv/bin/python benchmarks/layer_gemms.py --rows 2048 \
        --model build/bench-models/llama-1.1b.Q4_0.gguf
"""

from __future__ import annotations

import argparse
import time

import torch

from deepserve import kernels
from deepserve.config import EngineConfig
from deepserve.engine.llm_engine import LLMEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 2048])
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers", type=int, default=8, help="layers timed per pass")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    eng = LLMEngine(EngineConfig(model=args.model, max_num_seqs=8), show_progress=False)
    cfg = eng.model.config
    layers = list(eng.model.layers)[:args.layers]
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    first = layers[0]
    qkv_out, o_in = first.qkv_proj.out_features, first.o_proj.in_features

    def swiglu(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        fused = getattr(layer.gate_up_proj, "swiglu", None)
        out = fused(x) if fused is not None else None
        return out if out is not None else kernels.silu_mul(layer.gate_up_proj(x))

    for rows in args.rows:
        x = torch.randn(rows, hidden).to(torch.bfloat16)
        xo = torch.randn(rows, o_in).to(torch.bfloat16)
        xd = torch.randn(rows, inter).to(torch.bfloat16)
        parts = [("gate_up+SwiGLU", lambda m, x=x: swiglu(m, x), hidden * 2 * inter),
                 ("qkv", lambda m, x=x: m.qkv_proj(x), hidden * qkv_out),
                 ("o", lambda m, xo=xo: m.o_proj(xo), o_in * hidden),
                 ("down", lambda m, xd=xd: m.down_proj(xd), inter * hidden)]
        cells = []
        for name, call, weights in parts:
            call(layers[0])
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for layer in layers:
                    call(layer)
                best = min(best, (time.perf_counter() - t0) / len(layers))
            cells.append(f"{name} {best * 1e3:.3f} ms {2 * rows * weights / best / 1e12:.2f} TF/s")
        print(f"{rows} rows: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
