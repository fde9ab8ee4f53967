"""The engine against transformers on the real default model, token for token."""

from __future__ import annotations

import pytest
import torch
from conftest import GREEDY_TOKENS
from prompts import PROMPTS

from deepserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True)


def test_greedy_batch_matches_transformers(llm_fp32, hf_greedy):
    outs = llm_fp32.generate(PROMPTS, GREEDY)
    for prompt, ref, out in zip(PROMPTS, hf_greedy, outs, strict=True):
        assert out.token_ids == ref, f"prompt {prompt[:30]!r}"
        assert out.finish_reason == "length"


def test_greedy_one_by_one_matches_transformers(llm_fp32, hf_greedy):
    for prompt, ref in zip(PROMPTS, hf_greedy, strict=True):
        assert llm_fp32.generate(prompt, GREEDY)[0].token_ids == ref


def test_last_token_logits_close_to_transformers(llm_fp32, hf_model):
    # Both run float32 on the same dequantized weights; they differ only in summation order
    # (fused QKV/gate-up matmuls, SDPA vs eager attention), so differences are ~1e-5 of the
    # logit scale (~20). 2e-3 absolute leaves room for that and still catches any real bug
    # (a wrong rotary, mask or cache slot moves logits by 0.1 or more).
    tok, model = hf_model
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        with torch.inference_mode():
            ref = model(torch.tensor([ids])).logits[0, -1]
        ours = llm_fp32.engine.prompt_logits(ids)
        assert torch.allclose(ours, ref, atol=2e-3, rtol=0), \
            f"{prompt[:30]!r}: max diff {(ours - ref).abs().max():.2e}"


@pytest.mark.parametrize("engine_args", [
    # so small that sequences preempt each other and are recomputed
    dict(kv_cache_memory=24 * 16 * 46080, max_num_seqs=8),
    # chunked prefill forced: the long prompt takes many steps of 32 tokens
    dict(max_num_batched_tokens=32),
    dict(enable_prefix_caching=False),
], ids=["preemption", "chunked-prefill", "no-prefix-cache"])
def test_same_outputs_under_pressure(engine_args, hf_greedy):
    llm = LLM(dtype="float32", quantization="none", show_progress=False,
              **{"kv_cache_memory": "64MiB", **engine_args})
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == hf_greedy
    stats = llm.engine.stats()
    if "max_num_seqs" in engine_args:
        assert stats["num_preemptions"] > 0, "the pool was meant to force preemption"
    assert stats["kv_blocks_used"] == 0


def test_prefix_cache_hit_reports_cached_tokens(llm_fp32):
    from prompts import LONG_CONTEXT

    params = SamplingParams(temperature=0, max_tokens=12)
    first = llm_fp32.generate(LONG_CONTEXT + " computers", params)[0]
    second = llm_fp32.generate(LONG_CONTEXT + " computers", params)[0]
    third = llm_fp32.generate(LONG_CONTEXT + " machines", params)[0]
    n = len(first.prompt_token_ids)
    assert second.num_cached_tokens > 0
    assert second.num_cached_tokens == (n - 1) // 16 * 16
    assert second.token_ids == first.token_ids
    assert third.num_cached_tokens >= 160
    fresh = LLM(dtype="float32", quantization="none", show_progress=False, kv_cache_memory="64MiB",
                enable_prefix_caching=False)
    assert fresh.generate(LONG_CONTEXT + " machines", params)[0].token_ids == third.token_ids


def test_seeded_sampling_repeats(llm_fp32):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=20, seed=1234)
    a = llm_fp32.generate(PROMPTS[:3], params)
    b = llm_fp32.generate(PROMPTS[:3], params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    other = llm_fp32.generate(PROMPTS[:3], SamplingParams(temperature=0.9, top_p=0.95,
                                                          top_k=50, max_tokens=20, seed=99))
    assert [o.token_ids for o in other] != [o.token_ids for o in a]


def test_chat_uses_the_checkpoint_template(llm_fp32):
    out = llm_fp32.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(temperature=0, max_tokens=20))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    text = llm_fp32.tokenizer.decode(out.prompt_token_ids)
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")


def test_bf16_default_runs_and_agrees_mostly(llm_bf16, hf_greedy):
    # bf16 rounds differently from the fp32 reference, so near-tied tokens can flip and the
    # texts part ways after that; the first tokens of most prompts still agree.
    outs = llm_bf16.generate(PROMPTS, GREEDY)
    agree = sum(o.token_ids[:4] == ref[:4] for o, ref in zip(outs, hf_greedy, strict=True))
    assert agree >= len(PROMPTS) - 2


def test_other_block_sizes_give_the_same_tokens():
    """--block-size 32 (bf16 blocks, the one-call layers, prompts attending through every
    row's block table) gives the default 16's greedy tokens, batch for batch: each prompt's
    keys are read through blocks of the size the cache was built with (a prompt-only step
    once passed 16 to the kernels, which then read other sequences' slots)."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    tokens = []
    for bs in (16, 32):
        llm = LLM(dtype="bfloat16", show_progress=False, kv_cache_memory="64MiB", block_size=bs)
        tokens.append([o.token_ids for o in llm.generate(PROMPTS, params)])
    assert tokens[1] == tokens[0]
