"""Prompt rows' attention on AMX tiles (``prompt_attention_amx`` inside
``kernels.paged_decode_attention``) against float64 attention over each row's own context,
and the default model's logits on a long prompt and a chunk past its cached prefix against
transformers."""

from __future__ import annotations

import pytest
import torch
from prompts import LONG_CONTEXT

from deepserve import kernels

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason=f"CPU kernels not built: {kernels.unavailable_reason()}")

BS = 16


def _rows() -> tuple[list[tuple[list[int], int]], torch.Tensor]:
    """(blocks, context) of every row, and which rows are runs the tiles take: a decode; a
    whole prompt of 70 tokens; a short prompt (5 rows: row by row); a chunk of 8 rows past
    a cached prefix (row by row); a whole prompt of exactly 16; a whole prompt of 600 (two
    key chunks of the kernel); a chunk of 40 rows after 700 cached tokens."""
    def blocks(first: int, n: int) -> list[int]:
        return list(range(first, first + -(-n // BS)))

    rows = [(blocks(0, 37), 37)]
    rows += [(blocks(10, 70), c) for c in range(1, 71)]
    rows += [(blocks(20, 5), c) for c in range(1, 6)]
    rows += [(blocks(30, 24), c) for c in range(17, 25)]
    rows += [(blocks(40, 16), c) for c in range(1, 17)]
    rows += [(blocks(50, 600), c) for c in range(1, 601)]
    rows += [(blocks(100, 740), c) for c in range(701, 741)]
    run = torch.zeros(len(rows), dtype=torch.bool)
    run[1:71] = run[84:100] = run[100:700] = run[700:740] = True
    return rows, run


def _reference(q, k_cache, v_cache, rows, scale) -> torch.Tensor:
    """float64 softmax(q k^T) v of each row over its own slots."""
    heads, kv_heads = q.shape[1], k_cache.shape[0]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, (blocks, n) in enumerate(rows):
        slots = (torch.tensor(blocks).repeat_interleave(BS) * BS +
                 torch.arange(BS).repeat(len(blocks)))[:n]
        k = k_cache[:, slots].double().repeat_interleave(heads // kv_heads, 0)
        v = v_cache[:, slots].double().repeat_interleave(heads // kv_heads, 0)
        p = torch.softmax((q[i].double().unsqueeze(1) @ k.transpose(1, 2)) * scale, dim=-1)
        out[i] = (p @ v).squeeze(1)
    return out


@needs_kernels
@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (8, 8, 64), (16, 2, 128),
                                              (4, 4, 128)])
def test_prompt_runs_on_tiles_match_float64_attention(heads, kv_heads, d, amx_tiles):
    """Runs of 16 rows or more (whole prompts, and chunks past a cached prefix) take the
    tiles: every row within bf16 rounding of float64 attention over its own context, on
    average as close as the row-by-row kernel, which still gives the other rows (bit for
    bit what each gets alone), and not the runs (the tiles ran). Head sizes 64 and 128,
    query groups of 1, 3 and 8, and a context past the kernel's 512-key chunks (the
    running softmax rescales the earlier outputs)."""
    torch.manual_seed(heads * d)
    rows, run = _rows()
    width = max(len(b) for b, _ in rows)
    table = torch.tensor([b + [0] * (width - len(b)) for b, _ in rows])
    ctx = torch.tensor([c for _, c in rows])
    k_cache = torch.randn(kv_heads, 160 * BS, d).to(torch.bfloat16)
    v_cache = torch.randn(kv_heads, 160 * BS, d).to(torch.bfloat16)
    q = (torch.randn(len(rows), heads, d) * 2).to(torch.bfloat16)  # peaked softmaxes too
    scale = d ** -0.5
    got = kernels.paged_decode_attention(q, k_cache, v_cache, None, None, table, ctx, BS, scale)
    alone = torch.cat([kernels.paged_decode_attention(q[i:i + 1], k_cache, v_cache, None, None,
                                                      table[i:i + 1], ctx[i:i + 1], BS, scale)
                       for i in range(len(rows))])
    want = _reference(q, k_cache, v_cache, rows, scale)
    assert torch.equal(got[~run], alone[~run])
    assert not torch.equal(got[run], alone[run])
    err = (got.double() - want).abs()
    assert err.max() < 2e-2, err.max()  # a bf16 output's rounding at |x| <= 4
    row_err = (alone.double() - want).abs()
    assert err[run].mean() < 1.25 * row_err[run].mean() + 1e-5, \
        (err[run].mean(), row_err[run].mean())


@needs_kernels
def test_runs_without_tiles_take_sdpa_for_whole_prompts_only(monkeypatch):
    """With the tiles off, a whole bf16 prompt of 1024 tokens or more is one causal SDPA
    call and everything else (shorter whole prompts, a chunk past a cached prefix) runs
    row by row; every row still within bf16 rounding of float64."""
    before = kernels.amx()
    kernels.set_amx(False)
    try:
        torch.manual_seed(1)
        rows, _ = _rows()
        rows += [(list(range(160, 224)), c) for c in range(1, 1025)]  # 1024 tokens: SDPA
        width = max(len(b) for b, _ in rows)
        table = torch.tensor([b + [0] * (width - len(b)) for b, _ in rows])
        ctx = torch.tensor([c for _, c in rows])
        k_cache = torch.randn(3, 224 * BS, 64).to(torch.bfloat16)
        v_cache = torch.randn(3, 224 * BS, 64).to(torch.bfloat16)
        q = torch.randn(len(rows), 9, 64).to(torch.bfloat16)
        got = kernels.paged_decode_attention(q, k_cache, v_cache, None, None, table, ctx, BS,
                                             0.125)
        alone = torch.cat([kernels.paged_decode_attention(
            q[i:i + 1], k_cache, v_cache, None, None, table[i:i + 1], ctx[i:i + 1], BS, 0.125)
            for i in range(len(rows))])
        sdpa = torch.zeros(len(rows), dtype=torch.bool)
        sdpa[740:] = True  # the one whole prompt of 1024 tokens or more
        assert torch.equal(got[~sdpa], alone[~sdpa])
        assert not torch.equal(got[sdpa], alone[sdpa])
        err = (got.double() - _reference(q, k_cache, v_cache, rows, 0.125)).abs()
        assert err.max() < 2e-2
    finally:
        kernels.set_amx(before)


@needs_kernels
def test_long_prompt_and_cached_prefix_on_tiles_agree_with_transformers(llm_bf16, hf_model,
                                                                        amx_tiles):
    """The default model in bf16 on a prompt of about 900 tokens: the first pass takes its
    first 700 as one run (two key chunks), the second its last 200 as a chunk past those
    700 cached tokens (each a run on the tiles, with every layer in one call). Their
    next-token predictions agree with transformers' float32 ones wherever transformers'
    top two are apart by more than bf16's noise."""
    tok, model = hf_model
    ids = tok(LONG_CONTEXT * 6).input_ids[:900]
    assert len(ids) == 900
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0, -200:]
    ours = llm_bf16.engine.prompt_logits(ids, last_n=200).float()
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1.0
    assert clear.sum() > 100
    agree = (ours.argmax(-1) == ref.argmax(-1))[clear].float().mean()
    assert agree > 0.97, agree
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()
