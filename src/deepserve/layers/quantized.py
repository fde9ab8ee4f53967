"""Weight quantization of a full-precision checkpoint at load: ``int8`` (Q8_0 blocks),
``int4`` (Q4_1 blocks) or ``mixed`` (MLP Q4_1, attention Q8_0), all computed by
``layers.gguf_linear.GGUFLinear``. A GGUF checkpoint's own Q4_0 / Q4_1 / Q8_0 tensors
need none of this: ``--quantization auto`` keeps them as they are (loader/weights.py).

Blocks of 32 weights with their own scale (and, for Q4_1, offset) keep more precision
than one scale per output channel, and one kernel family serves every format on every
instruction set (kernels.py).
"""

from __future__ import annotations

import torch
from torch import nn

from deepserve.config import QUANTIZATIONS  # noqa: F401 (re-exported)
from deepserve.layers.gguf_linear import Q4_1, Q8_0, GGUFLinear, quantize


def quantize_model(model: nn.Module, method: str, dtype: torch.dtype,
                   group_size: int = 32) -> None:
    """Replace the decoder's linear layers in place, and the output projection by a Q8_0
    copy (in every method: at batch 1 it is a fifth of the bytes read per token). The
    embedding table stays as loaded (one row is read per token).

    ``int8``: every projection Q8_0; ``int4``: every projection Q4_1; ``mixed``: the MLP
    (most of the weights) Q4_1 and attention Q8_0. ``none`` and ``auto`` change nothing.
    """
    if method in ("none", "auto"):
        return
    if group_size != 32:
        raise ValueError("weight quantization uses blocks of 32")
    from deepserve.layers.linear import Linear
    from deepserve.layers.moe import Experts

    mlp_type = Q8_0 if method == "int8" else Q4_1
    for layer in model.layers:
        # every projection: q/k/v (or MLA's), o, gate/up, down, shared experts; the
        # experts themselves; not norms, routers or MLA's per-head kv_b
        for path, lin in list(layer.named_modules()):
            if isinstance(lin, Experts) and lin.qtypes is None:
                lin.quantize(mlp_type, mlp_type)
                continue
            if type(lin) is not Linear or lin.weight.shape[1] % 32:
                continue  # rows not in whole blocks of 32 stay dense
            is_mlp = path.rpartition(".")[2] in ("gate_up_proj", "down_proj")
            qtype = Q8_0 if method == "int8" or (method == "mixed" and not is_mlp) else Q4_1
            w, b = lin.weight.data, None if lin.bias is None else lin.bias.data
            parent, _, name = path.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, name,
                    GGUFLinear(quantize(w, qtype), qtype, w.shape[1], b))
    head = model.lm_head
    if not isinstance(head, GGUFLinear):
        model.lm_head = GGUFLinear(quantize(head.weight.data, Q8_0), Q8_0,
                                   head.weight.shape[1],
                                   None if head.bias is None else head.bias.data)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a forward pass reads (GGUF layers: their blocks)."""
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        if type(module).__name__ == "RotaryEmbedding":
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(t) in seen or t.dtype not in (torch.uint8, torch.int8, torch.bfloat16,
                                                 torch.float16, torch.float32):
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def weight_formats(model: nn.Module) -> str:
    """What the projections compute with, e.g. ``Q4_1 x 120 + Q8_0 x 1``, ``Q4_K x 60 +
    dense x 30`` (a file's tensors of other types, dequantized), or ``dense``."""
    from collections import Counter

    from deepserve.layers.gguf_linear import NAMES
    from deepserve.layers.moe import Experts

    count = Counter(NAMES[m.qtype] for m in model.modules() if isinstance(m, GGUFLinear))
    for m in model.modules():
        if isinstance(m, Experts):
            count[f"experts {NAMES[m.qtypes[0]]}" if m.qtypes else "experts dense"] += 1
    dense = sum(isinstance(m, nn.Linear) for m in model.modules())
    if not count:
        return "dense"
    return " + ".join([f"{k} x {v}" for k, v in sorted(count.items())]
                      + ([f"dense x {dense}"] if dense else []))
