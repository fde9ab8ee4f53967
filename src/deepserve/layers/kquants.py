"""GGUF types kept as blocks after a rewrite at load: the K-quants Q4_K and Q6_K, and
Q5_0 / Q5_1 (which Q4_K_M files of small models fall back to where a row is not a
multiple of 256). Each is rewritten once, exactly, into a layout of 32 weights that the
block kernels run.

A K-quant super-block holds 256 weights with one fp16 scale (and min) and small integer
scales per 32 (Q4_K) or 16 (Q6_K) weights. Their products are exact in float32 (an fp16
times a 6- or 8-bit integer), so each sub-block gets float32 scales of its own and its
codes move, unchanged, into the block order the kernels read:

* Q4_K -> per super-block of 256: fp32 d, fp32 -dmin, the 8 sub-block scales and 8 mins
  as bytes, then 8 x 16 bytes of nibbles (sub-block j's weight i in the low half of byte
  16j + i, weight i + 16 in the high half); w = (d sc_j) q - dmin m_j, each product
  exact in float32. 152 bytes; 4.75 bits per weight against the file's 4.5. Run through
  the 8-bit dot kernel, interleaved eight rows at a time (``gguf_linear.interleave``),
  like Q4_0 / Q4_1, with each sub-block's scales made in registers.
* Q6_K -> per 32 weights: two halves of (fp32 s, 16 int8 codes q - 32); w = s * code.
  40 bytes; 10 bits per weight against 6.56. Run against float activations, like Q8_0.
* Q5_0 / Q5_1 -> per 32 weights: fp16 d, fp16 m (Q5_0: -16 d, exact), the file's 16
  bytes of nibbles, and its 32 fifth bits reordered so that bit 2t + h of byte j belongs
  to weight 16h + 4t + j (the code in nibble h of byte 4t + j); w = d * q + m. 24 bytes; 6
  bits per weight against 5.5 / 6. Run through the 8-bit dot kernel, interleaved eight
  rows at a time like Q4_1, with the fifth bits shifted onto the codes in registers.

``dequantize_kept`` turns both back into floats; the tests check it equals the gguf
package's own dequantization bit for bit, so the rewrite loses nothing.
"""

from __future__ import annotations

import torch

Q5_0, Q5_1, Q4_K, Q6_K = 6, 7, 12, 14
REWRITTEN = (Q5_0, Q5_1, Q4_K, Q6_K)
QK_K = 256
FILE_BLOCK = {Q5_0: 32, Q5_1: 32, Q4_K: QK_K, Q6_K: QK_K}     # weights per file block
FILE_BYTES = {Q5_0: 22, Q5_1: 24, Q4_K: 144, Q6_K: 210}      # bytes per file block
_SHIFTS = torch.arange(8, dtype=torch.uint8)
KEPT_BYTES = {Q5_0: 24, Q5_1: 24, Q4_K: 19, Q6_K: 40}        # per 32 weights as kept


def _f32_bytes(v: torch.Tensor) -> torch.Tensor:
    """[..., n] float32 -> [..., n, 4] uint8, the values' own bytes."""
    return v.float().unsqueeze(-1).contiguous().view(torch.uint8)


def keep(raw: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """A tensor's file rows ``[n, k / FILE_BLOCK * FILE_BYTES]`` -> the kept layout
    ``[n, k / 32 * KEPT_BYTES]``."""
    n, s = raw.shape[0], k // FILE_BLOCK[qtype]
    if qtype in (Q4_K, Q6_K) and raw.dim() == 2:
        from deepserve import kernels

        if kernels.loaded():  # the same bytes in one C++ pass (``keep_kquant``)
            return kernels.ops().keep_kquant(raw, qtype, k)
    b = raw.reshape(n, s, FILE_BYTES[qtype])
    if qtype in (Q5_0, Q5_1):
        d = b[..., 0:2].contiguous().view(torch.float16)                   # [n, s, 1]
        m = b[..., 2:4].contiguous().view(torch.float16) if qtype == Q5_1 else -16 * d
        if not torch.isfinite(m).all():  # -16 d is exact in fp16 up to |d| = 4094
            raise ValueError("a Q5_0 block's scale is too large to keep (|d| > 4094)")
        at = 4 if qtype == Q5_1 else 2
        # bit i of the file's 4 bytes is weight i's (byte i // 8, bit i % 8)
        bits = (b[..., at:at + 4].unsqueeze(-1) >> _SHIFTS) & 1             # [n, s, 4, 8]
        # weight 16h + 4t + j -> bit 2t + h of byte j
        spread = bits.reshape(n, s, 2, 4, 4).permute(0, 1, 4, 3, 2).reshape(n, s, 4, 8)
        fifth = (spread << _SHIFTS).sum(-1, dtype=torch.uint8)
        out = torch.cat([d.view(torch.uint8), m.view(torch.uint8), b[..., at + 4:at + 20],
                         fifth], dim=-1)
    elif qtype == Q4_K:
        d = b[..., 0:2].contiguous().view(torch.float16).float()        # [n, s, 1]
        dmin = b[..., 2:4].contiguous().view(torch.float16).float()
        sc = b[..., 4:16].reshape(n, s, 3, 4)
        lo, mn, hi = sc[..., 0, :], sc[..., 1, :], sc[..., 2, :]
        scale = torch.cat([lo & 63, (hi & 15) | ((lo >> 2) & 48)], dim=-1)   # [n, s, 8]
        mins = torch.cat([mn & 63, (hi >> 4) | ((mn >> 2) & 48)], dim=-1)
        qs = b[..., 16:].reshape(n, s, 4, 1, 32)
        q = torch.cat([qs & 15, qs >> 4], dim=3).reshape(n, s, 8, 32)  # sub-block 2j + half
        codes = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, s, 128)
        out = torch.cat([_f32_bytes(d).reshape(n, s, 4), _f32_bytes(-dmin).reshape(n, s, 4),
                         scale, mins, codes], dim=-1)
    elif qtype == Q6_K:
        ql = b[..., :128].reshape(n, s, 2, 1, 64)
        ql = torch.cat([ql & 15, ql >> 4], dim=3).reshape(n, s, 256)
        qh = b[..., 128:192].reshape(n, s, 2, 1, 32)
        qh = torch.cat([(qh >> sh) & 3 for sh in (0, 2, 4, 6)], dim=3).reshape(n, s, 256)
        q = ((ql | (qh << 4)).to(torch.int16) - 32).to(torch.int8).reshape(n, s, 16, 16)
        scales = b[..., 192:208].contiguous().view(torch.int8).float()   # [n, s, 16]
        d = b[..., 208:210].contiguous().view(torch.float16).float()
        out = torch.cat([_f32_bytes(d * scales), q.view(torch.uint8)], dim=-1)
    else:
        raise ValueError(f"GGUF type {qtype} is not Q5_0, Q5_1, Q4_K or Q6_K")
    return out.reshape(n, k // 32 * KEPT_BYTES[qtype])


def dequantize_kept(blocks: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """The kept layout (file row order) -> [n, k] float32."""
    n = blocks.shape[0]
    if qtype in (Q5_0, Q5_1):
        b = blocks.reshape(n, k // 32, 24)
        d = b[..., 0:2].contiguous().view(torch.float16).float()
        m = b[..., 2:4].contiguous().view(torch.float16).float()
        codes = b[..., 4:20]
        bits = (b[..., 20:24].unsqueeze(-1) >> _SHIFTS) & 1                  # [n, s, j, 2t+h]
        fifth = bits.reshape(n, k // 32, 4, 4, 2).permute(0, 1, 4, 3, 2).reshape(n, -1, 32)
        q = torch.cat([codes & 15, codes >> 4], dim=-1) | (fifth << 4)
        return (d * q.float() + m).reshape(n, k)
    if qtype == Q4_K:
        b = blocks.reshape(n, k // QK_K, 152)
        d = b[..., 0:4].contiguous().view(torch.float32)                 # [n, s, 1]
        m = b[..., 4:8].contiguous().view(torch.float32)                 # -dmin
        codes = b[..., 24:].reshape(n, k // QK_K, 8, 16)
        q = torch.cat([codes & 15, codes >> 4], dim=-1).float()         # [n, s, 8, 32]
        scale = (d * b[..., 8:16].float()).unsqueeze(-1)
        low = (m * b[..., 16:24].float()).unsqueeze(-1)
        return (scale * q + low).reshape(n, k)
    b = blocks.reshape(n, k // 16, 20)
    s = b[..., 0:4].contiguous().view(torch.float32)
    return (s * b[..., 4:].contiguous().view(torch.int8).float()).reshape(n, k)
