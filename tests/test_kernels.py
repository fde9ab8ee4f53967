"""deepserve's C++ CPU kernels against the torch paths they replace, and the engine with
and without them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from prompts import PROMPTS

from deepserve import LLM, SamplingParams, kernels
from deepserve.layers.attention import AttentionMetadata, paged_attention
from deepserve.layers.kv_cache import LayerKV

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason=f"CPU kernels not built: {kernels.unavailable_reason()}")


@needs_kernels
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("k", [576, 100])  # 100: not a multiple of the 16/64-wide loops
def test_linear_small_matches_float_reference(wdtype, k, each_isa):
    torch.manual_seed(0)
    n = 203
    if wdtype == torch.int8:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale = torch.rand(n) / 50
        deq = w.float() * scale[:, None]
    else:
        w = torch.randn(n, k).to(wdtype)
        scale = None
        deq = w.float()
    bias = torch.randn(n)
    for rows in range(1, kernels.SMALL_ROWS + 1):
        x = torch.randn(rows, k)
        ref = x @ deq.t() + bias
        got = kernels.linear_small(x, w, scale, bias)
        assert got.dtype == torch.float32 and got.shape == (rows, n)
        # float32 accumulation in a different order: differences are rounding only
        assert torch.allclose(got, ref, atol=1e-4 * ref.abs().max().item()), rows
        got16 = kernels.linear_small(x.bfloat16(), w, scale, bias)
        assert got16.dtype == torch.bfloat16
        ref16 = x.bfloat16().float() @ deq.t() + bias
        assert torch.allclose(got16.float(), ref16, rtol=1e-2, atol=1e-2), rows


def _decode_case(kind, dtype, head_dim, seed=0, heads=6, ctx=None, bs=4, blocks=64):
    """A layer cache filled with random K/V, 5 sequences (or one per entry of ctx) with
    scattered block tables."""
    torch.manual_seed(seed)
    kv_heads = 2
    cache = LayerKV(kv_heads, blocks * bs, head_dim, dtype, kind, torch.device("cpu"))
    slots = torch.arange(blocks * bs)
    cache.write(torch.randn(len(slots), kv_heads, head_dim).to(dtype),
                torch.randn(len(slots), kv_heads, head_dim).to(dtype), slots)
    if ctx is None:
        ctx = torch.tensor([1, 4, 5, 17, 40])  # one token, a full block, block + 1, ...
    width = int(-(-ctx.max() // bs))
    table = (torch.randperm(blocks - 1)[:len(ctx) * width] + 1).view(len(ctx), width)
    q = torch.randn(len(ctx), heads, head_dim).to(dtype)
    return q, cache, table, ctx, bs


def _gather_reference(q, cache, table, ctx, bs, scale):
    """The decode rows' attention by the torch gather path (paged_attention)."""
    valid = torch.arange(table.shape[1] * bs).unsqueeze(0) < ctx.unsqueeze(1)
    bias = torch.zeros(valid.shape).masked_fill_(~valid, float("-inf"))
    meta = AttentionMetadata(slot_mapping=torch.empty(0), num_decode=len(ctx),
                             decode_blocks=table.flatten(), block_size=bs,
                             decode_bias=bias.unsqueeze(0).unsqueeze(2))
    kv = q[:, :cache.k.shape[0]]  # unused by the decode path (already in the cache)
    return paged_attention(q, kv, kv, cache, meta, scale)


@needs_kernels
def test_latent_decode_matches_float64(each_isa):
    """MLA's decode attention in one call (kernels.latent_decode): 16 heads against one
    shared latent head of 576 values (values: the first 512), contexts of 1 to 70 tokens
    scattered over cache blocks, against float64 on the same bf16 values."""
    torch.manual_seed(5)
    bs, d = 16, 576
    cache = torch.randn(40 * bs, d).to(torch.bfloat16)
    ctx = torch.tensor([1, 17, 70])
    table = torch.tensor([[3, 0, 0, 0, 0], [7, 2, 0, 0, 0], [9, 1, 30, 12, 5]])
    for h, v in ((16, 512), (6, 72)):  # and a part-filled group of heads, a value tail
        q = torch.randn(3, h, d).to(torch.bfloat16)
        got = kernels.latent_decode(q, cache, table, ctx, bs, 0.07, v)
        assert got.shape == (3, h, v) and got.dtype == torch.bfloat16
        for b in range(3):
            slots = torch.cat([torch.arange(blk * bs, blk * bs + bs) for blk in table[b]])
            kv = cache[slots[:ctx[b]]].double()
            p = torch.softmax(q[b].double() @ kv.t() * 0.07, dim=-1)
            ref = p @ kv[:, :v]
            err = (got[b].double() - ref).abs().max() / ref.abs().max()
            assert err < 1e-2, (h, b, err.item())  # bf16 output rounding: 2^-8
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.latent_decode(q, cache, table + 100, ctx, bs, 0.07, v)


@needs_kernels
@pytest.mark.parametrize("kind", ["auto", "fp16", "int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 24])  # 24: AVX-512 takes the portable loop


@pytest.mark.parametrize("heads", [6, 14])  # 3 and 7 query heads per KV head
def test_paged_decode_attention_matches_gather_path(kind, dtype, head_dim, heads, each_isa):
    q, cache, table, ctx, bs = _decode_case(kind, dtype, head_dim, heads=heads)
    scale = head_dim ** -0.5
    ref = _gather_reference(q, cache, table, ctx, bs, scale)
    got = kernels.paged_decode_attention(q, cache.k, cache.v, getattr(cache, "k_scale", None),
                                         getattr(cache, "v_scale", None), table, ctx, bs, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the reference rounds to bf16
    assert got.dtype == dtype
    assert torch.allclose(got.float(), ref.float(), atol=tol), (got - ref).abs().max()
    # independent check in float64 for one sequence: softmax(q k^T) v over its own slots
    b, n = 3, int(ctx[3])
    slots = (table[b].repeat_interleave(bs) * bs + torch.arange(bs).repeat(table.shape[1]))[:n]
    k, v = cache.gather_slots(slots)  # [kv_heads, n, d], dequantized
    group = q.shape[1] // k.shape[0]
    k, v = k.double().repeat_interleave(group, 0), v.double().repeat_interleave(group, 0)
    p = torch.softmax((q[b].double().unsqueeze(1) @ k.transpose(1, 2)) * scale, dim=-1)
    want = (p @ v).squeeze(1)
    assert torch.allclose(got[b].double(), want, atol=tol)


@needs_kernels
@pytest.mark.parametrize("kind", ["auto", "int8", "fp8"])
@pytest.mark.parametrize("head_dim,heads", [(128, 6), (128, 16), (64, 16), (64, 10)])
def test_paged_decode_attention_bf16_head_groups(head_dim, heads, kind, each_isa):
    """The bf16 dot-product path's P.V runs 4 heads (head_dim 64) or 2 heads (128) of a
    query group at a time: groups of 3, 5 and 8 heads, odd and even contexts, on a bf16
    cache and on 8-bit ones (their rows widened to bf16 first), against the gather path."""
    q, cache, table, ctx, bs = _decode_case(kind, torch.bfloat16, head_dim, seed=1,
                                            heads=heads)
    ref = _gather_reference(q, cache, table, ctx, bs, head_dim ** -0.5)
    got = kernels.paged_decode_attention(q, cache.k, cache.v, getattr(cache, "k_scale", None),
                                         getattr(cache, "v_scale", None), table, ctx, bs,
                                         head_dim ** -0.5)
    assert torch.allclose(got.float(), ref.float(), atol=2e-2), (got - ref).abs().max()


@needs_kernels
def test_paged_decode_attention_computes_every_row_of_a_large_batch(each_isa):
    """Many rows (120 tasks of a sequence and KV head, handed out to the threads in pieces
    that shrink toward the end) with contexts of 1 to 64 tokens in 16-token blocks (the
    AMX tiles' layout where they run): every row as the gather path gives it, so no task
    is skipped or mixed up with another."""
    ctx = torch.tensor([1 + (7 * i) % 70 for i in range(60)])
    q, cache, table, ctx, bs = _decode_case("auto", torch.bfloat16, 64, seed=2, heads=6,
                                            ctx=ctx, bs=16, blocks=300)
    ref = _gather_reference(q, cache, table, ctx, bs, 0.125)
    got = kernels.paged_decode_attention(q, cache.k, cache.v, None, None, table, ctx, bs,
                                         0.125)
    assert torch.allclose(got.float(), ref.float(), atol=2e-2), (got - ref).abs().max()


@needs_kernels
def test_engine_tokens_equal_with_and_without_kernels():
    """float32 greedy decoding over dense weights: the kernel and torch paths pick the
    same tokens (the GGUF blocks' own check is in test_gguf_kernels.py)."""
    params = SamplingParams(max_tokens=16, temperature=0)
    outs = []
    for on in (True, False):
        llm = LLM(dtype="float32", quantization="none", max_num_seqs=8, cpu_kernels=on)
        assert llm.engine.use_kernels is on
        outs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS[:5], params)])
        del llm
    assert outs[0] == outs[1]


@needs_kernels
def test_a_decode_layer_in_one_call_equals_its_kernels_one_by_one(monkeypatch):
    """Decode steps on GGUF blocks run every decoder layer in one C++ call
    (kernels.decode_layers), or each layer as one (kernels.decode_layer, as a model with
    an MoE layer does); the same kernels called one by one from Python give bit-identical
    logprobs, in bf16 and float32, with the Qwen2 layout's QKV bias too, and over int8
    and fp8 caches (their K/V encoded by the fused rotary as they are written)."""
    from deepserve.models import llama

    monkeypatch.setenv("DEEPSERVE_DENSE_COPY", "0")  # every batch on the blocks
    calls: dict[str, int] = {}
    for name in ("decode_layer", "decode_layers"):
        real = getattr(kernels, name)

        def counted(*a, name=name, real=real):
            calls[name] = calls.get(name, 0) + 1
            return real(*a)

        monkeypatch.setattr(kernels, name, counted)
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=2)
    for dtype, kv in (("bfloat16", "auto"), ("float32", "auto"), ("bfloat16", "int8"),
                      ("float32", "fp8")):
        llm = LLM(dtype=dtype, show_progress=False, kv_cache_memory="64MiB",
                  enable_prefix_caching=False, kv_cache_dtype=kv)
        model = llm.engine.model
        assert all(layer.decode_weights() is not None for layer in model.layers)
        if dtype == "float32" and kv == "auto":  # a QKV bias (Qwen2): the same call
            qkv = model.layers[0].qkv_proj
            qkv.bias = torch.nn.Parameter(torch.randn(qkv.out_features) * 0.1,
                                          requires_grad=False)
            for layer in model.layers:
                layer.__dict__.pop("_decode_plan", None)
        runs = []
        for mode in ("decode_layers", "decode_layer", "unfused"):
            monkeypatch.setattr(llama, "FUSED_DECODE", mode != "unfused")
            model.__dict__.pop("_plans", None)
            if mode == "decode_layer":
                model._plans = None  # no whole-step plan: one call a layer
            calls.clear()
            outs = llm.generate(PROMPTS[:3], params)
            assert set(calls) == ({mode} if mode != "unfused" else set()), (mode, calls)
            runs.append([[(x.token_id, x.top) for x in o.outputs[0].logprobs] for o in outs])
        assert runs[0] == runs[1] == runs[2]
        del llm


def test_kernels_can_be_switched_off_and_say_why():
    env = dict(os.environ, DEEPSERVE_KERNELS="0")
    code = ("from deepserve import kernels; print(kernels.available(), "
            "kernels.unavailable_reason())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "False disabled by DEEPSERVE_KERNELS=0"
    cli = subprocess.run([sys.executable, "-m", "deepserve.cli", "kernels"], env=env,
                         capture_output=True, text=True)
    assert cli.returncode == 1 and "DEEPSERVE_KERNELS=0" in cli.stdout


def _ulps_bf16(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between two bf16 tensors in units in the last place."""
    ia = a.view(torch.int16).int()
    ib = b.view(torch.int16).int()
    return int((ia - ib).abs().max())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_layer_ops_match_the_torch_layer_code(dtype, each_isa):
    from deepserve.layers.rotary import RotaryEmbedding, apply_rotary
    from deepserve.models.llama import RMSNorm

    torch.manual_seed(0)
    t, heads, kv_heads, d, inter = 7, 6, 2, 64, 203
    close = (lambda a, b: _ulps_bf16(a, b) <= 1) if dtype == torch.bfloat16 else \
        (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5))
    # rms_norm, with and without the residual add
    norm = RMSNorm(96, 1e-5).to(dtype)
    norm.weight.data = torch.randn(96).to(dtype)
    x, r = torch.randn(t, 96).to(dtype) * 3, torch.randn(t, 96).to(dtype)
    assert close(kernels.rms_norm(x, None, norm.weight, 1e-5)[0], norm(x))
    normed, summed = kernels.rms_norm(x, r, norm.weight, 1e-5)
    assert torch.equal(summed, x + r) and close(normed, norm(x + r))
    # rotary on q and k, k and v written to the cache at the slots
    rope = RotaryEmbedding(d, 128, 10000.0, None, dtype)
    pos = torch.tensor([0, 1, 2, 50, 51, 100, 127])
    cos, sin = rope.tables(pos)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d).to(dtype)
    cache = LayerKV(kv_heads, 64, d, dtype, "auto", torch.device("cpu"))
    slots = torch.tensor([3, 9, 10, 11, 40, 41, 63])
    q, k = kernels.rope_write_kv(qkv, cos, sin, cache.k, cache.v, slots, heads, kv_heads)
    q_ref, k_ref, v_ref = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q_ref = apply_rotary(q_ref.view(t, heads, d), cos, sin)
    k_ref = apply_rotary(k_ref.view(t, kv_heads, d), cos, sin)
    assert close(q, q_ref) and close(k, k_ref)
    assert torch.equal(cache.k[:, slots].transpose(0, 1), k)
    assert torch.equal(cache.v[:, slots].transpose(0, 1), v_ref.view(t, kv_heads, d))
    # a float16 cache (--kv-cache-dtype fp16): the same q and k, K/V rounded as written
    half = LayerKV(kv_heads, 64, d, dtype, "fp16", torch.device("cpu"))
    q16, k16 = kernels.rope_write_kv(qkv, cos, sin, half.k, half.v, slots, heads, kv_heads)
    assert torch.equal(q16, q) and torch.equal(k16, k)
    assert torch.equal(half.k[:, slots].transpose(0, 1), k.half())
    assert torch.equal(half.v[:, slots].transpose(0, 1), v_ref.view(t, kv_heads, d).half())
    # int8 (per-slot scales) and fp8 caches: the bytes LayerKV.write encodes
    v_rows = v_ref.reshape(t, kv_heads, d).clone()
    v_rows[2, 1] = 0  # an all-zero row: its scale is the floor, 1e-8
    qkv[:, (heads + kv_heads) * d:] = v_rows.reshape(t, -1)
    for kind in ("int8", "fp8"):
        fused, ref = (LayerKV(kv_heads, 64, d, dtype, kind, torch.device("cpu"))
                      for _ in range(2))
        scales = (fused.k_scale, fused.v_scale) if kind == "int8" else (None, None)
        q8, k8 = kernels.rope_write_kv(qkv, cos, sin, fused.k, fused.v, slots, heads,
                                       kv_heads, *scales)
        assert torch.equal(q8, q) and torch.equal(k8, k)
        ref.write(k, v_rows, slots)
        assert fused.k.abs().sum() > 0 and torch.equal(fused.k, ref.k), kind
        assert torch.equal(fused.v, ref.v), kind
        if kind == "int8":
            assert torch.equal(fused.k_scale, ref.k_scale)
            assert torch.equal(fused.v_scale, ref.v_scale)
            assert fused.v_scale[1, slots[2], 0].float() == pytest.approx(1e-8, rel=1e-2)
    with pytest.raises(RuntimeError, match="int8 cache takes k_scale and v_scale"):
        kernels.rope_write_kv(qkv, cos, sin, fused.k.view(torch.int8), fused.v.view(torch.int8),
                              slots, heads, kv_heads)
    # SwiGLU (an odd width exercises the scalar tail)
    gu = torch.randn(t, 2 * inter).to(dtype) * 4
    gate, up = gu.split(inter, dim=-1)
    assert close(kernels.silu_mul(gu), torch.nn.functional.silu(gate) * up)


def test_a_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path, caplog):
    """torch's build lock has no owner: one left by a killed build made every later start
    wait forever. An old one goes (with a warning); a fresh one is kept, and the wait is
    explained."""
    lock = tmp_path / "lock"
    lock.touch()
    kernels.clear_stale_lock(tmp_path)
    assert lock.exists() and "waiting for another kernel build" in caplog.text
    old = lock.stat().st_mtime - kernels.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    kernels.clear_stale_lock(tmp_path)
    assert not lock.exists() and "did not finish" in caplog.text
    kernels.clear_stale_lock(tmp_path)  # no lock: nothing to do


@needs_kernels
def test_short_prompts_attend_on_the_paged_kernel_as_sdpa_does(monkeypatch):
    """Prompt chunks of at most PAGED_PREFILL tokens of context run on the paged kernel
    (on its AVX-512 bf16 path), every prompt token a row (context = its position + 1),
    in one call with the decode rows; longer ones on SDPA. On float32 weights (the 8-bit
    activations of block layers would turn 1e-7 into flipped codes) both give every
    position's logits within 1e-4 of their scale, and a batch whose steps mix decodes
    with prompts (one of which reuses another's cached prefix, so its chunk starts past
    0) the same greedy tokens and logprobs. On the default model's blocks such a mixed
    step is one fused call over all its rows and layers, where the policy picks it."""
    from deepserve.engine import model_runner

    calls = []
    row_tables = model_runner.ModelRunner._row_tables
    monkeypatch.setattr(model_runner.ModelRunner, "_row_tables",
                        lambda self, *a: calls.append(a[-1]) or row_tables(self, *a))
    llm = LLM(dtype="float32", quantization="none", show_progress=False,
              kv_cache_memory="64MiB")
    # picked for bf16 caches on AVX-512 (faster than SDPA only there); the kernel's
    # float32 arithmetic is the same, and exact enough to compare
    llm.engine.runner.paged_prefill = True

    def paged(on: bool) -> None:
        monkeypatch.setattr(model_runner, "PAGED_PREFILL", 512 if on else 0)
        monkeypatch.setattr(model_runner, "PAGED_PREFILL_TILES", 512 if on else 0)

    tok = llm.engine.tokenizer
    for ids in (tok.encode(PROMPTS[0] * 3), tok.encode(PROMPTS[1])):
        paged(True)
        a = llm.engine.prompt_logits(ids, last_n=len(ids))
        paged(False)
        b = llm.engine.prompt_logits(ids, last_n=len(ids))
        assert (a - b).abs().max() < 1e-4 * b.abs().max()
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    prompts = [PROMPTS[5] * 2, *PROMPTS[:5], PROMPTS[5] * 2 + " " + PROMPTS[0]]

    def run(llm: LLM) -> list[list[tuple[int, float]]]:
        eng, outs = llm.engine, {}
        eng.scheduler.bm.reset_prefix_cache()
        for i, p in enumerate(prompts):  # a prompt joins every two steps
            eng.add_request(str(i), p, greedy)
            for _ in range(2):
                for o in eng.step():
                    outs[o.request_id] = o
        while eng.has_unfinished():
            for o in eng.step():
                outs[o.request_id] = o
        return [[(x.token_id, x.logprob) for x in outs[str(i)].outputs[0].logprobs]
                for i in range(len(prompts))]

    paged(True)
    calls.clear()
    got = run(llm)
    assert any(m.num_decode for m in calls)  # decodes and prompt rows in one step
    assert any(c.context_len > c.num_tokens for m in calls for c in m.prefills)
    paged(False)
    want = run(llm)
    for g, w in zip(got, want, strict=True):
        assert [t for t, _ in g] == [t for t, _ in w]
        assert max(abs(a - b) for (_, a), (_, b) in zip(g, w, strict=True)) < 1e-3
    paged(True)
    rows = []
    decode_layers = kernels.decode_layers
    monkeypatch.setattr(kernels, "decode_layers",
                        lambda x, *a: rows.append(x.shape[0]) or decode_layers(x, *a))
    eng = LLM(show_progress=False, kv_cache_memory="64MiB").engine
    paged = kernels.isa() == "avx512" and eng.dtype == torch.bfloat16
    assert eng.runner.paged_prefill == paged
    eng.add_request("a", PROMPTS[0], greedy)
    eng.step()  # its prompt
    eng.add_request("b", PROMPTS[1], greedy)
    rows.clear()
    eng.step()  # a's decode row and b's prompt rows: one call for every layer (else op by op)
    n = len(eng.tokenizer.encode(PROMPTS[1]))
    assert rows == ([1 + n] if paged else [])


@needs_kernels
def test_8bit_cache_prompts_read_their_own_keys_as_stored(monkeypatch):
    """Over an int8 or fp8 cache, short prompts run on the paged kernel as over a bf16
    one (picked on AVX-512 bf16), their tokens attending to the K/V as stored, as every
    later decode step does: over int8, a prompt's last logits are the same (float32;
    1.5-2e-6 of their scale measured, 1e-3 allowed for a code the last bit of a GEMM
    flips) whether the prompt is one pass or its last token comes in a second one. On
    SDPA, which attends to a prompt's own unquantized K/V, they differ by the cache's
    rounding (2.8%). (fp8's three mantissa bits turn such last-bit flips into steps of
    6%: its two passes are not compared.)"""
    from deepserve.engine import model_runner

    eng = LLM(dtype="float32", quantization="none", show_progress=False,
              kv_cache_memory="64MiB", kv_cache_dtype="int8").engine
    eng.runner.paged_prefill = True  # picked for bf16 engines on AVX-512; float32 compares
    ids = eng.tokenizer.encode(PROMPTS[0] * 3)
    gaps = []
    for limit in (512, 0):  # the paged kernel's rows, then SDPA
        monkeypatch.setattr(model_runner, "PAGED_PREFILL", limit)
        monkeypatch.setattr(model_runner, "PAGED_PREFILL_TILES", limit)
        whole = eng.prompt_logits(ids, last_n=len(ids))[-1]
        split = eng.prompt_logits(ids, last_n=1)
        gaps.append(float((whole - split).abs().max() / split.abs().max()))
    assert gaps[0] < 1e-3 < 1e-2 < gaps[1], gaps
    for kind in ("int8", "fp8"):
        bf16 = LLM(show_progress=False, kv_cache_memory="64MiB", kv_cache_dtype=kind).engine
        assert bf16.runner.paged_prefill == (kernels.isa() == "avx512"
                                             and bf16.dtype == torch.bfloat16), kind


@needs_kernels
def test_argmax_rows_picks_as_torch_argmax(each_isa):
    """Greedy picks (kernels.argmax_rows) against torch.argmax: random rows, ties (the
    first maximum wins), -inf masks, a row of only -inf, NaN (torch counts it largest),
    and widths that leave a tail past the vector loops."""
    torch.manual_seed(3)
    for v in (1, 7, 37, 49152, 49155):
        x = torch.randn(9, v)
        x[1] = x[1].round()  # ties
        x[2, ::2] = float("-inf")
        x[3] = float("-inf")
        x[4, v // 2] = float("nan")
        x[5, -1] = 1e30
        x[6] = torch.full((v,), 2.0)
        assert torch.equal(kernels.argmax_rows(x), x.argmax(dim=-1)), v
    x = torch.randn(64, 1000)[:, ::2]  # a strided view
    assert torch.equal(kernels.argmax_rows(x), x.argmax(dim=-1))


@needs_kernels
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (64, 8, 8), (128, 16, 4),
                                                     (128, 16, 2)])
@pytest.mark.parametrize("bs", [16, 32])
def test_decode_scores_on_tiles_match_float64(head_dim, heads, kv_heads, bs, amx_tiles):
    """Decode rows' scores on AMX tiles (block sizes that are multiples of 16; query groups
    of 3, 1, 4 and 8 heads): every 16 keys loaded in place as one tile, contexts with
    every tail length, against float64 attention on the same bf16 values and as close as
    the same call with the tiles off (the dot-instruction path). The two often agree bit
    for bit after the bf16 roundings; a tile kernel that dropped half the dimensions
    failed all 8 cases, one that read every head's scores from the first failed the 6
    with groups of more than one head."""
    from deepserve import kernels

    torch.manual_seed(3)
    blocks = 96
    k = torch.randn(kv_heads, blocks * bs, head_dim).bfloat16()
    v = torch.randn(kv_heads, blocks * bs, head_dim).bfloat16()
    ctx = torch.tensor([1, 15, 16, 17, 33, 200])
    width = int(-(-ctx.max() // bs))
    table = torch.randperm(blocks)[:len(ctx) * width].view(len(ctx), width)
    q = torch.randn(len(ctx), heads, head_dim).bfloat16() * 2
    scale = head_dim ** -0.5
    got = kernels.paged_decode_attention(q, k, v, None, None, table, ctx, bs, scale)
    kernels.set_amx(False)
    dots = kernels.paged_decode_attention(q, k, v, None, None, table, ctx, bs, scale)
    kernels.set_amx(True)
    group = heads // kv_heads
    for b in range(len(ctx)):
        n = int(ctx[b])
        slots = (table[b].repeat_interleave(bs) * bs + torch.arange(bs).repeat(width))[:n]
        kb = k[:, slots].double().repeat_interleave(group, 0)
        vb = v[:, slots].double().repeat_interleave(group, 0)
        p = torch.softmax((q[b].double().unsqueeze(1) @ kb.transpose(1, 2)) * scale, dim=-1)
        want = (p @ vb).squeeze(1)
        # bf16 output and bf16 probabilities: within a few bf16 steps of float64
        assert torch.allclose(got[b].double(), want, atol=2e-2), (b, (got[b] - want).abs().max())
        err_tiles = (got[b].double() - want).abs().mean()
        err_dots = (dots[b].double() - want).abs().mean()
        assert err_tiles <= 1.5 * err_dots + 1e-4, (b, err_tiles, err_dots)
