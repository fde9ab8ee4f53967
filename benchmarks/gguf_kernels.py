"""Speed of the GGUF block kernels alone: ``linear_gguf`` on random weights in each
format, at the default model's projection shapes, for every instruction-set build this
CPU runs, against torch's float32 (and bfloat16) matmul over the same dequantized weights.
Where the CPU has AMX, the avx512 build also runs bf16 rows on its VNNI kernel and on AMX
tiles (``avx512 bf16`` and ``AMX bf16``; interleaved types, widths a multiple of 32).

    .venv/bin/python benchmarks/gguf_kernels.py --rows 1 8 32 128 512

Prints GFLOP/s (2 x rows x in x out per call) per shape; nothing else should run.
"""

from __future__ import annotations

import argparse
import time

import gguf
import torch

from deepserve import kernels
from deepserve.layers import kquants
from deepserve.layers.gguf_linear import X8, interleave
from deepserve.layers.gguf_linear import quantize as quantize_blocks

# (name, in_features, out_features) of the default model's projections, and its head
SHAPES = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576),
          ("lm_head", 576, 49152)]
TYPES = {"Q4_1": 3, "Q8_0": 8, "Q4_1x8": 3 + X8,  # x8: interleaved eight rows at a time
         "Q4_0x8": 2 + X8,
         "Q5_0x8": kquants.Q5_0 + X8, "Q4_Kx8": kquants.Q4_K + X8}


def kept_blocks(qtype: int, n: int, k: int) -> torch.Tensor:
    """Random file blocks of a rewritten type (random codes, sane fp16 scales), as kept."""
    size, per = kquants.FILE_BYTES[qtype], kquants.FILE_BLOCK[qtype]
    raw = torch.randint(0, 256, (n, k // per, size), dtype=torch.uint8)
    raw[..., 0:4] = (torch.rand(n, k // per, 2) * 0.01 + 1e-4).half().view(torch.uint8)
    return kquants.keep(raw.reshape(n, -1), qtype, k)


def timed(fn, *args, min_s: float = 0.3) -> float:
    """Seconds per call of fn(*args), over at least min_s after one warm call."""
    fn(*args)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s:
        fn(*args)
        n += 1
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    ap.add_argument("--types", nargs="+", default=["Q4_1", "Q4_1x8", "Q8_0"],
                    choices=list(TYPES))
    ap.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES])
    ap.add_argument("--shape", action="append", default=[], metavar="NAME:IN:OUT",
                    help="another projection shape, e.g. gate_up_1b:2048:11264 (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isas", nargs="+", default=None,
                    help="instruction-set builds to time (default: every one this CPU runs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    isas = args.isas or kernels.supported_isas()
    for isa in isas:
        kernels.load(isa)
    torch.manual_seed(0)
    onednn = torch.backends.mkldnn.is_available() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    amx = "avx512" in isas and kernels.set_amx(True)
    print(f"ISA builds: {', '.join(isas)}; threads {args.threads}; AMX tiles: {amx}")
    header = ["shape", "type", "rows", *isas, *(["avx512 bf16", "AMX bf16"] if amx else []),
              "torch fp32", "torch bf16", *(["oneDNN bf16"] if onednn else [])]
    print("| " + " | ".join(header) + " |")
    print("|---|---|" + "---:|" * (len(header) - 2))
    extra = [(name, int(k), int(n)) for name, k, n in (s.split(":") for s in args.shape)]
    for name, k, n in SHAPES + extra:
        if name not in args.shapes and (name, k, n) not in extra:
            continue
        w = torch.randn(n, k) * 0.05
        wb = w.to(torch.bfloat16)
        # the engine's large-batch bf16 copy: oneDNN's packed weight (gguf_linear.keep_dense)
        packed = torch.ops.mkldnn._reorder_linear_weight(wb) if onednn else None
        for tname in args.types:
            qtype = TYPES[tname] % X8
            if qtype in kquants.REWRITTEN:
                if k % kquants.FILE_BLOCK[qtype]:
                    continue  # rows of this shape are not whole blocks of the type
                blocks = kept_blocks(qtype, n, k)
            elif qtype == 2:  # Q4_0: the gguf package's own quantizer
                blocks = torch.from_numpy(gguf.quants.quantize(
                    w.numpy(), gguf.GGMLQuantizationType.Q4_0)).reshape(n, -1)
            else:
                blocks = quantize_blocks(w, qtype)
            if TYPES[tname] > X8:
                blocks = interleave(blocks, TYPES[tname] - X8, k)
            for m in args.rows:
                x = torch.randn(m, k)
                xb = x.to(torch.bfloat16)
                flop = 2 * m * k * n
                cells = []
                for isa in isas:
                    op = kernels.ops(isa).linear_gguf
                    cells.append(flop / timed(op, x, blocks, TYPES[tname], None) / 1e9)
                if amx:  # bf16 rows on the VNNI kernel, then on tiles
                    op = kernels.ops("avx512").linear_gguf
                    for on in (False, True):
                        kernels.set_amx(on)
                        cells.append(flop / timed(op, xb, blocks, TYPES[tname], None) / 1e9)
                cells.append(flop / timed(torch.matmul, x, w.T) / 1e9)
                cells.append(flop / timed(torch.matmul, xb, wb.T) / 1e9)
                if onednn:
                    cells.append(flop / timed(torch.ops.mkldnn._linear_pointwise, xb, packed,
                                              None, "none", [], "") / 1e9)
                print(f"| {name} {k}x{n} | {tname} | {m} | " +
                      " | ".join(f"{c:.0f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
