"""Qwen3, Qwen3-MoE, DeepSeek-V2 and DeepSeek-V3 (MLA + DeepSeekMoE) against
transformers' own implementation: tiny random float32 models saved by transformers, read
by deepserve from the HF folder and from GGUF files of the same weights."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny_models import greedy, write_gguf, write_tiny

from deepserve import LLM, SamplingParams
from deepserve.errors import ModelLoadError
from deepserve.layers.quantized import weight_formats

PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
N = 12
ARCHS = ["qwen3", "qwen3_moe", "deepseek_v2", "deepseek_v3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_gguf):
    """arch -> (folder, transformers model, tokenizer, its greedy tokens per prompt)."""
    from transformers import AutoTokenizer

    made = {}

    def get(arch: str):
        if arch not in made:
            path = tmp_path_factory.mktemp(arch)
            model = write_tiny(path, arch, default_gguf)
            tok = AutoTokenizer.from_pretrained(str(path))
            made[arch] = (path, model, tok, [greedy(model, tok, p, N) for p in PROMPTS])
        return made[arch]
    return get


def run(model: str, **kw) -> tuple[LLM, list[list[int]]]:
    llm = LLM(model=model, dtype="float32", show_progress=False, kv_cache_memory="16MiB", **kw)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True))
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_folder_matches_transformers(arch, tiny):
    path, _, _, ref = tiny(arch)
    llm, got = run(str(path), quantization="none")
    assert llm.engine.model_config.architecture == arch
    assert got == ref


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "deepseek_v3"])
def test_gguf_of_the_same_weights_matches_transformers(arch, tiny, tmp_path, default_gguf):
    _, model, _, ref = tiny(arch)
    gguf = write_gguf(model, arch, tmp_path / f"{arch}.gguf", default_gguf, qtype=0)
    llm, got = run(str(gguf))
    assert llm.engine.model_config.architecture == arch
    assert got == ref


def mean_kl(llm: LLM, ref: LLM, contexts: list[list[int]]) -> float:
    kls = []
    for c in contexts:
        lp_ref = torch.log_softmax(ref.engine.prompt_logits(c, 8).float(), -1)
        lp = torch.log_softmax(llm.engine.prompt_logits(c, 8).float(), -1)
        kls.append((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean().item())
    return sum(kls) / len(kls)


@pytest.mark.parametrize("arch, qtype", [("qwen3_moe", 2), ("deepseek_v3", 8)])
def test_experts_stay_in_gguf_blocks(arch, qtype, tiny, tmp_path, default_gguf):
    """Expert tensors computed on their blocks (no dense copy) give the distributions
    of the same file's weights dequantized once to float32."""
    _, model, tok, _ = tiny(arch)
    gguf = write_gguf(model, arch, tmp_path / f"{arch}-{qtype}.gguf", default_gguf, qtype)
    blocks = LLM(model=str(gguf), dtype="float32", show_progress=False,
                 kv_cache_memory="16MiB")
    name = {2: "Q4_0", 8: "Q8_0"}[qtype]
    assert f"experts {name} x 2" in weight_formats(blocks.engine.model)
    experts = blocks.engine.model.layers[2].moe.experts
    assert experts.gate_up.dtype == torch.uint8 and experts.down.dtype == torch.uint8
    if arch.startswith("deepseek") and blocks.engine.use_kernels:
        # MLA's W_UK / W_UV per head on Q8_0 blocks too (kernels.bmm_gguf)
        assert all(layer.latent_blocks is not None for layer in blocks.engine.model.layers)
    dense = LLM(model=str(gguf), dtype="float32", quantization="none", show_progress=False,
                kv_cache_memory="16MiB")
    assert "experts dense" in weight_formats(dense.engine.model)
    contexts = [tok(p).input_ids + list(range(100, 108)) for p in PROMPTS]
    kl = mean_kl(blocks, dense, contexts)
    print(f"{arch} {name} blocks vs dequantized: mean KL {kl:.6f}")
    # the kernels round activations to 8 bits; a wrong layout or scale gives KL > 0.5
    assert kl < 0.02, kl


def with_and_without(llm, monkeypatch, kernel: str, module, flag: str, max_tokens: int):
    """Greedy outputs (top-2 logprobs) of PROMPTS with ``module.flag`` on, then off,
    checking that the kernel ``kernel`` ran exactly when it was on."""
    from deepserve import kernels

    calls = []
    real = getattr(kernels, kernel)
    monkeypatch.setattr(kernels, kernel, lambda *a: calls.append(1) or real(*a))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    runs = []
    for on in (True, False):
        monkeypatch.setattr(module, flag, on)
        del calls[:]
        runs.append(llm.generate(PROMPTS, params))
        assert bool(calls) is on
    return runs


@pytest.mark.parametrize(("arch", "call"), [("qwen3", "decode_layers"),
                                            ("qwen3_moe", "decode_layer")])
def test_one_call_decode_layers_equal_their_kernels_one_by_one(arch, call, tiny, tmp_path,
                                                               default_gguf, monkeypatch):
    """Qwen3's q/k norms run inside one call for every layer (kernels.decode_layers) and
    an MoE layer's attention half inside kernels.decode_layer, on Q4_0 blocks:
    bit-identical logprobs to the same kernels called one by one."""
    from deepserve import kernels
    from deepserve.models import llama

    if not kernels.available():
        pytest.skip("no CPU kernels here")
    _, model, _, _ = tiny(arch)
    gguf = write_gguf(model, arch, tmp_path / f"{arch}-q4.gguf", default_gguf, 2)
    llm = LLM(model=str(gguf), dtype="float32", show_progress=False, kv_cache_memory="16MiB",
              enable_prefix_caching=False)
    layers = llm.engine.model.layers
    assert all(layer.decode_weights() is not None for layer in layers)
    runs = [[[(x.token_id, x.top) for x in o.outputs[0].logprobs] for o in outs]
            for outs in with_and_without(llm, monkeypatch, call, llama,
                                         "FUSED_DECODE", max_tokens=6)]
    assert runs[0] == runs[1]


def test_mla_decode_kernel_agrees_with_the_torch_path(tiny, tmp_path, default_gguf,
                                                      monkeypatch):
    """bf16 MLA decode attention in one C++ call (kernels.latent_decode) against the
    torch ops it replaces, in the engine on the tiny DeepSeek-V3 file: the same greedy
    tokens up to genuine near-ties (top-2 within 0.1 nats where they part), chosen
    tokens' logprobs within 0.05 before that."""
    from deepserve import kernels
    from deepserve.models import deepseek

    if not kernels.available() or kernels.isa() != "avx512":
        pytest.skip("the latent decode kernel runs on the AVX-512 build")
    _, model, _, _ = tiny("deepseek_v3")
    gguf = write_gguf(model, "deepseek_v3", tmp_path / "v3-q8.gguf", default_gguf, 8)
    llm = LLM(model=str(gguf), dtype="bfloat16", show_progress=False, kv_cache_memory="16MiB",
              enable_prefix_caching=False)
    runs = with_and_without(llm, monkeypatch, "latent_decode", deepseek, "LATENT_KERNEL",
                            max_tokens=8)
    for kernel, torch_path in zip(*runs, strict=True):
        for a, b in zip(kernel.outputs[0].logprobs, torch_path.outputs[0].logprobs,
                        strict=True):
            if a.token_id != b.token_id:
                top = sorted((lp for _, lp in a.top), reverse=True)
                assert top[0] - top[1] < 0.1, (a, b)
                break
            assert abs(a.logprob - b.logprob) < 0.05, (a, b)


def test_quantization_puts_experts_into_blocks(tiny):
    path, _, tok, _ = tiny("qwen3_moe")
    ref = LLM(model=str(path), dtype="float32", quantization="none", show_progress=False,
              kv_cache_memory="16MiB")
    q = LLM(model=str(path), dtype="float32", quantization="int8", show_progress=False,
            kv_cache_memory="16MiB")
    assert "experts Q8_0 x 2" in weight_formats(q.engine.model)
    contexts = [tok(p).input_ids + list(range(100, 108)) for p in PROMPTS]
    kl = mean_kl(q, ref, contexts)
    print(f"qwen3_moe int8 vs float32: mean KL {kl:.6f}")
    assert kl < 0.05, kl


def test_mla_cache_holds_the_latent_and_prefix_hits_agree(tiny):
    path, model, _, _ = tiny("deepseek_v3")
    cfg = model.config
    llm = LLM(model=str(path), dtype="float32", quantization="none", show_progress=False,
              kv_cache_memory="16MiB", enable_prefix_caching=True)
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    assert llm.engine.kv_bytes_per_token == per_token
    cache = llm.engine.runner.kv_caches[0]
    assert cache.k.shape[0] == 1 and cache.k.shape[2] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert cache.v is cache.k
    prompt = "A long shared system prompt that spans more than one block of sixteen " * 3
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    cold = llm.generate([prompt + "first"], params)[0]
    warm = llm.generate([prompt + "first"], params)[0]
    assert warm.num_cached_tokens > 0
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids


def test_fused_expert_layout_and_mtp_layers(tiny, tmp_path, caplog):
    """transformers 5's fused experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]) load
    like the per-expert layout; a multi-token-prediction layer past num_hidden_layers is
    skipped and named in the log."""
    import shutil

    from safetensors.torch import load_file, save_file

    path, model, _, ref = tiny("deepseek_v3")
    out = tmp_path / "fused"
    shutil.copytree(path, out)
    sd = load_file(str(path / "model.safetensors"))
    e = model.config.n_routed_experts
    for i in range(1, model.config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        gate_up = torch.stack([torch.cat([sd.pop(f"{p}{j}.gate_proj.weight"),
                                          sd.pop(f"{p}{j}.up_proj.weight")]) for j in range(e)])
        sd[p + "gate_up_proj"] = gate_up
        sd[p + "down_proj"] = torch.stack([sd.pop(f"{p}{j}.down_proj.weight") for j in range(e)])
    sd["model.layers.3.eh_proj.weight"] = torch.zeros(4, 4)  # an MTP layer's tensor
    save_file(sd, str(out / "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="deepserve"):
        _, got = run(str(out), quantization="none")
    assert got == ref
    assert "skipped 1 multi-token-prediction layer(s) (model.layers.3)" in caplog.text


def test_wrong_expert_shape_names_file_tensor_and_shape(tiny, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    path, _, _, _ = tiny("qwen3_moe")
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    sd = load_file(str(path / "model.safetensors"))
    sd["model.layers.0.mlp.experts.3.up_proj.weight"] = torch.zeros(16, 64)
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"experts\.3\.up_proj\.weight.*\(16, 64\).*"
                                             r"expected \(32, 64\)"):
        LLM(model=str(bad), show_progress=False, kv_cache_memory="16MiB")
    missing = tmp_path / "missing"
    shutil.copytree(path, missing)
    del sd["model.layers.0.mlp.experts.3.up_proj.weight"]
    save_file(sd, str(missing / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"lacks 1 tensor.*layers\.0\.moe\.experts"):
        LLM(model=str(missing), show_progress=False, kv_cache_memory="16MiB")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["moe_intermediate_size"]
    (missing / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="moe_intermediate_size"):
        LLM(model=str(missing), show_progress=False)


ROUTERS = {  # (scoring, n_group, topk_group, group score, norm, scale, bias)
    "qwen3_moe": ("softmax", 1, 1, "max", True, 1.0, False),
    "deepseek_v2": ("softmax", 4, 2, "max", False, 1.0, False),
    "deepseek_v3": ("sigmoid", 4, 2, "top2", True, 2.5, True),
}


@pytest.mark.parametrize("kind", list(ROUTERS))
def test_router_kernel_chooses_as_the_torch_ops(kind, each_isa):
    from deepserve import kernels
    from deepserve.layers.moe import route
    from deepserve.models.config import ModelConfig

    scoring, groups, top_groups, gscore, norm, scale, with_bias = ROUTERS[kind]
    cfg = ModelConfig(architecture=kind, vocab_size=8, hidden_size=8, intermediate_size=8,
                      num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, num_experts=16,
                      num_experts_per_tok=3, scoring_func=scoring, n_group=groups,
                      topk_group=top_groups, group_score=gscore, norm_topk_prob=norm,
                      routed_scaling_factor=scale)
    torch.manual_seed(0)
    logits = torch.randn(37, 16) * 3
    bias = torch.rand(16) if with_bias else None
    w_ref, ids_ref = route(logits, cfg, bias)
    w, ids = kernels.moe_route(logits, bias, 3, scoring == "sigmoid", groups, top_groups,
                               gscore == "top2", norm, scale)
    ref = torch.zeros(37, 16).scatter_(1, ids_ref, w_ref)
    got = torch.zeros(37, 16).scatter_(1, ids, w)
    assert torch.equal(ids.sort(1).values, ids_ref.sort(1).values)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qtype", [2, 3, 8])
def test_fused_experts_kernel_matches_the_torch_path(qtype, each_isa):
    """kernels.moe_gguf (grouping, both projections, SwiGLU, weighted sum in one call)
    against the same experts run expert by expert in torch, on each ISA's build."""
    from deepserve.layers.moe import Experts

    torch.manual_seed(0)
    e, h, inter, t, k = 6, 64, 32, 9, 2
    experts = Experts(e, h, inter)
    experts.gate_up.data = torch.randn(e, 2 * inter, h) * 0.2
    experts.down.data = torch.randn(e, h, inter) * 0.2
    if qtype == 2:  # Q4_0, as GGUF files store it (the gguf package's own quantizer)
        import gguf

        def q4_0(w: torch.Tensor) -> torch.Tensor:
            flat = w.reshape(-1, w.shape[-1]).numpy()
            blocks = gguf.quants.quantize(flat, gguf.GGMLQuantizationType.Q4_0)
            return torch.from_numpy(blocks).reshape(w.shape[0], w.shape[1], -1)
        experts.to_blocks(q4_0(experts.gate_up.data), 2, q4_0(experts.down.data), 2)
    else:
        experts.quantize(qtype, qtype)
    x = torch.randn(t, h)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    w = torch.rand(t, k)
    experts.use_kernel = False
    ref = experts(x, ids, w)
    experts.interleave_blocks()
    experts.use_kernel = True
    got = experts(x, ids, w)
    # the kernels round activations to 8 bits for the 4-bit types
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2"])
def test_torch_path_without_cpu_kernels_matches_transformers(arch, tiny):
    """The same models with the C++ kernels off (router, experts, MLA decode in torch)."""
    path, _, _, ref = tiny(arch)
    _, got = run(str(path), quantization="none", cpu_kernels=False)
    assert got == ref


def test_k_quant_experts_kernel_matches_the_torch_path(each_isa):
    """Experts as Q4_K_M files store them (gate/up Q4_K, down Q6_K), kept in the
    rewritten layout, through kernels.moe_gguf and through torch."""
    from kquant_files import quantize_q4_k, quantize_q6_k

    from deepserve.layers import kquants
    from deepserve.layers.moe import Experts

    torch.manual_seed(0)
    e, h, inter, t, k = 4, 256, 256, 5, 2
    experts = Experts(e, h, inter)
    gate_up = torch.randn(e, 2 * inter, h) * 0.1
    down = torch.randn(e, h, inter) * 0.1

    def kept(w: torch.Tensor, quant, qtype: int) -> torch.Tensor:
        raw = quant(w.reshape(-1, w.shape[-1]))
        return kquants.keep(raw, qtype, w.shape[-1]).reshape(w.shape[0], w.shape[1], -1)

    experts.to_blocks(kept(gate_up, quantize_q4_k, 12), 12, kept(down, quantize_q6_k, 14), 14)
    x = torch.randn(t, h)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    w = torch.rand(t, k)
    experts.use_kernel = False
    ref = experts(x, ids, w)
    experts.interleave_blocks()  # Q4_K: already interleaved at load by its kernel's rule
    experts.use_kernel = True
    got = experts(x, ids, w)
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_mapped_experts_kernel_then_laid_out(each_isa):
    """Experts run as a file maps them (gate and up apart, the file's order) through
    kernels.moe_gguf, against the torch path; then ``lay_out`` / ``adopt`` moves them to
    the kernels' interleaved order, the outputs stay the same and the file's pages are
    released once."""
    import gguf

    from deepserve.layers.moe import Experts

    torch.manual_seed(0)
    e, h, inter, t, k = 6, 64, 32, 9, 2

    def q4_0(w: torch.Tensor) -> torch.Tensor:
        blocks = gguf.quants.quantize(w.reshape(-1, w.shape[-1]).numpy(),
                                      gguf.GGMLQuantizationType.Q4_0)
        return torch.from_numpy(blocks).reshape(w.shape[0], w.shape[1], -1)

    gate, up = q4_0(torch.randn(e, inter, h) * 0.2), q4_0(torch.randn(e, inter, h) * 0.2)
    down = q4_0(torch.randn(e, h, inter) * 0.2)
    released = []
    experts = Experts(e, h, inter)
    experts.to_blocks(gate, 2, down, 2, up=up, release=lambda: released.append(1))
    experts.interleave_blocks()  # a no-op on mapped experts: the layout comes later
    assert experts.up is not None and experts.kernel_qtypes == (2, 2)
    x = torch.randn(t, h)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    w = torch.rand(t, k)
    experts.use_kernel = False
    ref = experts(x, ids, w)
    fused = Experts(e, h, inter)  # the same weights as one gate_up tensor
    fused.to_blocks(torch.cat([gate, up], dim=1), 2, down.clone(), 2)
    fused.use_kernel = False
    torch.testing.assert_close(fused(x, ids, w), ref)
    experts.use_kernel = True
    mapped = experts(x, ids, w)
    torch.testing.assert_close(mapped, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    experts.adopt(*experts.lay_out())
    assert experts.up is None and released == [1]
    assert experts.kernel_qtypes == experts.interleaved_types() != (2, 2)
    torch.testing.assert_close(experts(x, ids, w), mapped, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_experts_laid_out_beside_the_serving(arch, tiny, tmp_path, default_gguf, monkeypatch):
    """DEEPSERVE_EXPERT_LAYOUT=background: a Q4_0 file's experts serve as mapped, a
    thread writes the kernels' order, the engine adopts it between steps; the greedy
    tokens and logprobs before, after, and with the layout written at load agree."""
    from deepserve import kernels
    from deepserve.engine.layout import expert_layout

    if not kernels.available() or kernels.isa() == "portable":
        pytest.skip("the interleaved layout is the SIMD kernels'")
    _, model, _, _ = tiny(arch)
    gguf = write_gguf(model, arch, tmp_path / f"{arch}-q4.gguf", default_gguf, 2)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)

    def outputs(llm: LLM) -> list:
        return [[(x.token_id, dict(x.top)) for x in o.outputs[0].logprobs]
                for o in llm.generate(PROMPTS, params)]

    monkeypatch.setenv("DEEPSERVE_EXPERT_LAYOUT", "background")
    llm = LLM(model=str(gguf), dtype="float32", show_progress=False, kv_cache_memory="16MiB",
              enable_prefix_caching=False)
    experts = [layer.moe.experts for layer in llm.engine.model.layers
               if getattr(layer, "moe", None) is not None]
    assert experts and all(x.up is not None for x in experts)
    layout, llm.engine.runner.layout = llm.engine.runner.layout, None  # held back
    mapped = outputs(llm)
    layout.finish()
    assert all(x.up is None and x.kernel_qtypes != x.qtypes for x in experts)
    laid_out = outputs(llm)
    monkeypatch.setenv("DEEPSERVE_EXPERT_LAYOUT", "load")
    at_load = outputs(LLM(model=str(gguf), dtype="float32", show_progress=False,
                          kv_cache_memory="16MiB", enable_prefix_caching=False))
    for run in (mapped, laid_out):
        for seq, ref in zip(run, at_load, strict=True):
            assert [t for t, _ in seq] == [t for t, _ in ref]
            for (_, top), (_, top_ref) in zip(seq, ref, strict=True):
                for tok, lp in top_ref.items():
                    assert abs(top[tok] - lp) < 1e-3
    monkeypatch.setenv("DEEPSERVE_EXPERT_LAYOUT", "later")
    with pytest.raises(Exception, match="DEEPSERVE_EXPERT_LAYOUT='later' is not a setting"):
        expert_layout()
