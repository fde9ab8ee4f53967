"""Sparse mixture-of-experts MLPs (Qwen3-MoE, DeepSeek-V2/V3): a router, top-k experts
per token, optional shared experts.

Experts are SwiGLU MLPs stored as two 3-D weights, ``gate_up`` ``[E, 2I, H]`` (gate rows
first) and ``down`` ``[E, H, I]``: dense tensors, or GGUF blocks as the file stores them
(``ffn_*_exps``) or as ``--quantization`` makes them, never a dense copy. One step's
tokens are grouped by expert (one argsort of the chosen ids), each expert that was
chosen runs once over its rows on the same per-ISA block kernels as every other
projection, and the weighted results are added back. With the CPU kernels all of that is
one C++ call per layer (``kernels.moe_gguf``: grouping, both projections, SwiGLU and the
weighted sum); without them, the same steps in torch ops. A single decode token reads
only its k experts' bytes. A large file's experts can run as mapped, gate and up apart,
while ``lay_out`` writes the kernels' order beside the serving (``engine.layout``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deepserve import kernels
from deepserve.layers.gguf_linear import (
    BLOCK_BYTES,
    HEADS,
    NAMES,
    QK,
    X8,
    X8_ONLY,
    dequantize,
    interleave,
    quantize,
)
from deepserve.layers.linear import KernelLayer, Linear
from deepserve.models.config import ModelConfig


def route(logits: torch.Tensor, cfg: ModelConfig, bias: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] (float32) -> (weights [T, k], expert ids [T, k]).

    softmax or sigmoid scores; with groups, only the ``topk_group`` best groups (by their
    best expert, or for V3 the sum of their best two) are eligible; a V3 correction bias
    moves the choice but not the weights; ``norm_topk_prob`` renormalises the chosen
    weights; ``routed_scaling_factor`` scales them."""
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
    choice = scores if bias is None else scores + bias
    if cfg.n_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, cfg.n_group, e // cfg.n_group)
        if cfg.group_score == "top2":
            group = grouped.topk(2, dim=-1)[0].sum(-1)
        else:
            group = grouped.amax(-1)
        keep = torch.zeros_like(group, dtype=torch.bool)
        keep.scatter_(1, group.topk(cfg.topk_group, dim=-1, sorted=False)[1], True)
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape(t, e)
        choice = choice.masked_fill(~keep, float("-inf"))
    ids = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return weights, ids


class Experts(KernelLayer, nn.Module):
    """E SwiGLU experts, dense (``gate_up`` / ``down`` parameters) or in GGUF blocks
    (``to_blocks``; then the parameters are gone)."""

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden),
                                    requires_grad=False)
        self.down = nn.Parameter(torch.empty(num_experts, hidden, inter), requires_grad=False)
        self.qtypes: tuple[int, int] | None = None  # (gate_up, down) GGUF types in blocks
        self.kernel_qtypes: tuple[int, int] | None = None
        # experts run from the mapped file: ``gate_up`` holds the gate's rows alone, ``up``
        # the up projection's, until ``adopt`` puts the kernels' layout in their place
        self.register_buffer("up", None, persistent=False)
        self.release_mapped: Callable[[], None] | None = None

    def drop_dense(self) -> None:
        """Forget the dense parameters before any memory is given to them (the loader
        fills this layer with ``to_blocks``)."""
        for name in ("gate_up", "down"):
            delattr(self, name)
            self.register_buffer(name, None, persistent=False)

    def to_blocks(self, gate_up: torch.Tensor, gu_type: int, down: torch.Tensor,
                  down_type: int, interleaved: bool = False, up: torch.Tensor | None = None,
                  release: Callable[[], None] | None = None) -> None:
        """Keep GGUF blocks ``[E, rows, bytes]`` instead of dense weights (``interleaved``:
        already in ``interleave_blocks``' order, written so by the loader). With ``up``,
        ``gate_up`` is the gate's rows alone: the file's tensors, run as mapped until
        ``lay_out`` / ``adopt`` (then ``release`` drops the file's pages)."""
        parts = [("gate_up", gate_up, gu_type, self.hidden,
                  self.inter if up is not None else 2 * self.inter),
                 ("down", down, down_type, self.inter, self.hidden)]
        if up is not None:
            parts.append(("up", up, gu_type, self.hidden, self.inter))
        for name, blocks, qtype, k, rows in parts:
            if qtype not in BLOCK_BYTES:
                raise ValueError(f"expert GGUF type {qtype} is not one of "
                                 f"{', '.join(NAMES.values())}")
            want = (self.num_experts, rows, k // QK * BLOCK_BYTES[qtype])
            if blocks.dtype != torch.uint8 or tuple(blocks.shape) != want:
                raise ValueError(f"expert blocks {name} have shape {tuple(blocks.shape)}, "
                                 f"expected {want} for {NAMES[qtype]}")
            if hasattr(self, name) and isinstance(getattr(self, name), nn.Parameter):
                delattr(self, name)
            self.register_buffer(name, blocks.contiguous(), persistent=False)
        self.qtypes = (gu_type, down_type)
        self.kernel_qtypes = self.qtypes
        self.release_mapped = release
        if up is not None:
            return
        if interleaved:
            self.kernel_qtypes = self.interleaved_types()
        elif gu_type in X8_ONLY or down_type in X8_ONLY:
            # Q4_K and Q5_x are read only in the interleaved order (as GGUFLinear does)
            self.interleave_blocks()

    def quantize(self, gu_type: int, down_type: int) -> None:
        """Dense experts -> GGUF blocks (``--quantization``)."""
        e = self.num_experts
        gu = quantize(self.gate_up.data.reshape(e * 2 * self.inter, self.hidden), gu_type)
        dn = quantize(self.down.data.reshape(e * self.hidden, self.inter), down_type)
        self.to_blocks(gu.reshape(e, 2 * self.inter, -1), gu_type, dn.reshape(e, self.hidden, -1),
                       down_type)

    def interleave_blocks(self) -> None:
        """The 8-row interleaved layout the SIMD kernels read fastest (each expert's rows
        are a multiple of 8, so interleaving all rows at once interleaves each expert)."""
        if self.qtypes is None or self.kernel_qtypes != self.qtypes or self.up is not None:
            return  # (mapped experts: ``lay_out`` writes the order beside the serving)
        new = self.interleaved_types()
        for name, qtype, k, kernel_type in (("gate_up", self.qtypes[0], self.hidden, new[0]),
                                            ("down", self.qtypes[1], self.inter, new[1])):
            if kernel_type != qtype:
                blocks = getattr(self, name)
                flat = blocks.reshape(-1, blocks.shape[2])
                setattr(self, name, interleave(flat, qtype, k).reshape(blocks.shape))
        self.kernel_qtypes = new

    def lay_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mapped experts' (gate_up, down) in the kernels' interleaved order, in new memory
        (reads the mapped blocks only: safe beside a forward that runs them)."""
        from deepserve.layers.gguf_linear import interleave_into

        assert self.up is not None and self.qtypes is not None
        gu_type, down_type = self.qtypes
        gate_up = torch.empty(self.num_experts, 2 * self.inter, self.up.shape[2],
                              dtype=torch.uint8)
        interleave_into(self.gate_up, gate_up[:, :self.inter], gu_type, self.hidden)
        interleave_into(self.up, gate_up[:, self.inter:], gu_type, self.hidden)
        down = torch.empty(self.down.shape, dtype=torch.uint8)
        interleave_into(self.down, down, down_type, self.inter)
        return gate_up, down

    def adopt(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Run ``lay_out``'s blocks from now on (between forwards) and drop the file's."""
        self.gate_up, self.down, self.up = gate_up, down, None
        self.kernel_qtypes = self.interleaved_types()
        release, self.release_mapped = self.release_mapped, None
        if release is not None:
            release()

    def interleaved_types(self) -> tuple[int, int]:
        """The kernel types of (gate_up, down) once interleaved: 4-bit types whose rows
        per expert are a multiple of 8 take the layout, others keep the file's order."""
        assert self.qtypes is not None
        return ((self.qtypes[0] + X8 if self.qtypes[0] in HEADS and self.inter % 4 == 0
                 else self.qtypes[0]),
                self.qtypes[1] + X8 if self.qtypes[1] in HEADS and self.hidden % 8 == 0
                else self.qtypes[1])

    def _dense_of(self, name: str, e: int) -> torch.Tensor:
        """Expert ``e``'s weight as float32 (the torch path for blocks)."""
        from deepserve.layers.gguf_linear import deinterleave

        blocks, i = getattr(self, name)[e], 0 if name == "gate_up" else 1
        qtype, k = self.qtypes[i], self.hidden if i == 0 else self.inter
        if self.kernel_qtypes[i] != qtype:
            blocks = deinterleave(blocks, qtype, k)
        if i == 0 and self.up is not None:  # mapped: the gate's rows, then up's
            blocks = torch.cat([blocks, self.up[e]])
        return dequantize(blocks, qtype, k)

    def _mlp(self, x: torch.Tensor, e: int) -> torch.Tensor:
        if self.qtypes is None:
            h = F.linear(x, self.gate_up[e])
            gate, up = h.split(self.inter, dim=-1)
            return F.linear(F.silu(gate) * up, self.down[e])
        h = F.linear(x.float(), self._dense_of("gate_up", e))
        gate, up = h.split(self.inter, dim=-1)
        return F.linear(F.silu(gate) * up, self._dense_of("down", e)).to(x.dtype)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
                ) -> torch.Tensor:
        """x [T, H]; ids, weights [T, k] -> sum over k of weight * expert(x)."""
        if self.qtypes is not None and self.use_kernel:
            return kernels.moe_gguf(x, ids, weights, self.gate_up, self.kernel_qtypes[0],
                                    self.down, self.kernel_qtypes[1], self.up)
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // k
        xs = x.index_select(0, tokens)
        parts, at = [], 0
        for e, n in enumerate(counts):
            if n:
                parts.append(self._mlp(xs[at:at + n], e))
                at += n
        ys = torch.cat(parts) if len(parts) > 1 else parts[0]
        ys = ys.float() * weights.reshape(-1).index_select(0, order).unsqueeze(1)
        out = torch.zeros(x.shape[0], self.hidden, dtype=torch.float32, device=x.device)
        out.index_add_(0, tokens, ys)
        return out.to(x.dtype)


class SwiGLU(nn.Module):
    """A dense gate/up/down MLP (DeepSeek's shared experts)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.intermediate_size = inter
        self.gate_up_proj = Linear(hidden, 2 * inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        if getattr(self.down_proj, "use_kernel", False) and h.dim() == 2 and \
                h.is_contiguous() and h.dtype in (torch.float32, torch.bfloat16):
            return self.down_proj(kernels.silu_mul(h))
        gate, up = h.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _pick_rows(ids: torch.Tensor, lo: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat (token, slot) picks of experts ``lo`` .. ``lo + n - 1``: their indices
    into ``ids.reshape(-1)``, and each one's expert id counted from ``lo``."""
    local = ids.reshape(-1) - lo
    picks = ((local >= 0) & (local < n)).nonzero().squeeze(1)
    return picks, local.index_select(0, picks)


class SparseMoE(KernelLayer, nn.Module):
    """Router + routed experts (+ shared experts): the MLP of an MoE layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size),
                                 requires_grad=False)  # kept in float32, as the references do
        self.correction_bias = (nn.Parameter(torch.empty(cfg.num_experts), requires_grad=False)
                                if cfg.scoring_func == "sigmoid" else None)
        # expert parallelism: this rank's routed experts [lo, hi); the others' outputs
        # arrive through the all-reduce over ``ep_group``
        self.lo, self.hi = cfg.local_experts or (0, cfg.num_experts)
        self.ep_group = None
        self.ep_dispatch = "all-reduce"  # or "all-to-all" (``_all_to_all``)
        self.experts = Experts(self.hi - self.lo, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared = (SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                       if cfg.n_shared_experts else None)

    def _local_picks(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
                     ) -> torch.Tensor:
        """Expert parallelism: only the picks of this rank's experts, each as its own row
        (so every expert sees the rows it would see unsplit), added back per token."""
        picks, local = _pick_rows(ids, self.lo, self.hi - self.lo)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        if picks.numel():
            tokens = picks // ids.shape[1]
            part = self.experts(x.index_select(0, tokens).contiguous(),
                                local.unsqueeze(1).contiguous(),
                                weights.reshape(-1).index_select(0, picks).unsqueeze(1)
                                .contiguous())
            out.index_add_(0, tokens, part.float())
        return out.to(x.dtype)

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.gate)
        bias = None if self.correction_bias is None else self.correction_bias.float()
        c = self.cfg
        if self.use_kernel:  # the same choice in one call
            return kernels.moe_route(logits, bias, c.num_experts_per_tok,
                                     c.scoring_func == "sigmoid", c.n_group, c.topk_group,
                                     c.group_score == "top2", c.norm_topk_prob,
                                     c.routed_scaling_factor)
        return route(logits, c, bias)

    def _all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Expert parallelism by dispatch and combine: this rank routes its share of the
        step's tokens, sends each pick's row to the rank holding its expert (one gloo
        all-to-all, the expert id riding as an extra column), runs the rows it received
        on its experts, sends the outputs back (a second all-to-all), weights and adds
        them per token with its shared experts, and an all-gather gives every rank every
        token's output (attention, replicated, needs them all)."""
        import torch.distributed as dist

        group, opts = self.ep_group, dist.AllToAllOptions()
        n, rank = group.size(), group.rank()
        t, h, k = x.shape[0], x.shape[1], self.cfg.num_experts_per_tok
        per_t, per_e = -(-t // n), self.hi - self.lo
        a, b = min(rank * per_t, t), min((rank + 1) * per_t, t)
        mine = x[a:b]
        weights, ids = self._route(mine) if b > a else (
            torch.empty(0, k), torch.empty(0, k, dtype=torch.long))
        dest = (ids // per_e).reshape(-1)
        order = dest.argsort(stable=True)
        tokens = order // k
        send = torch.bincount(dest, minlength=n)
        local = ids.reshape(-1).index_select(0, order) - dest.index_select(0, order) * per_e
        rows = torch.cat([mine.index_select(0, tokens).float(), local.float().unsqueeze(1)], 1)
        recv = torch.empty(n, dtype=torch.long)
        group.alltoall_base(recv, send, [1] * n, [1] * n, opts).wait()
        sc, rc = send.tolist(), recv.tolist()
        got = torch.empty(sum(rc), h + 1)
        group.alltoall_base(got, rows, rc, sc, opts).wait()
        y = torch.empty(0, h)
        if got.shape[0]:
            y = self.experts(got[:, :h].to(x.dtype).contiguous(),
                             got[:, h].long().unsqueeze(1).contiguous(),
                             torch.ones(got.shape[0], 1)).float().contiguous()
        back = torch.empty(rows.shape[0], h)
        group.alltoall_base(back, y, sc, rc, opts).wait()
        out = torch.zeros(per_t, h)
        out[:b - a].index_add_(0, tokens, back * weights.reshape(-1).index_select(0, order)
                               .float().unsqueeze(1))
        if self.shared is not None and b > a:
            out[:b - a] += self.shared(mine).float()
        parts = [torch.empty(per_t, h) for _ in range(n)]
        group.allgather([parts], [out]).wait()
        return torch.cat(parts)[:t].to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ep_group is not None and self.ep_dispatch == "all-to-all":
            return self._all_to_all(x)
        weights, ids = self._route(x)
        c = self.cfg
        if self.hi - self.lo != c.num_experts:
            y = self._local_picks(x, ids, weights)
        else:
            y = self.experts(x, ids, weights)
        if self.shared is not None and self.lo == 0:  # shared experts: rank 0 adds them
            y = y + self.shared(x)
        if self.ep_group is not None:
            from deepserve.models.parallel import all_reduce

            y = all_reduce(y, self.ep_group)
        return y
