"""Loading: safetensors folders (Llama, Qwen2) written by transformers, GGUF, and errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from deepserve import LLM, DeepserveError, SamplingParams


def _reference(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoTokenizer.from_pretrained(str(path)),
            AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_safetensors_checkpoint_matches_transformers(arch, tiny_llama_dir, tiny_qwen2_dir):
    path = tiny_llama_dir if arch == "llama" else tiny_qwen2_dir
    llm = LLM(model=str(path), dtype="float32", show_progress=False, kv_cache_memory="16MiB")
    assert llm.engine.model_config.architecture == arch
    assert llm.engine.model_config.attention_bias == (arch == "qwen2")
    tok, ref = _reference(path)
    prompts = ["Hello there, how are", "A longer prompt with several more words in it to test",
               "x"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            gen = ref.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
            logits = ref(ids).logits[0, -1]
        assert out.token_ids == gen[0, ids.shape[1]:].tolist()
        ours = llm.engine.prompt_logits(ids[0].tolist())
        assert torch.allclose(ours, logits, atol=1e-3, rtol=0)


def test_default_model_is_the_packaged_gguf(llm_fp32, default_gguf):
    eng = llm_fp32.engine
    assert eng.model_path == default_gguf
    assert eng.model_name == "SmolLM2-135M-Instruct"
    cfg = eng.model_config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)


def test_gguf_path_given_explicitly(default_gguf, tmp_path):
    copy = tmp_path / "model.gguf"
    shutil.copy(default_gguf, copy)
    llm = LLM(model=str(copy), dtype="float32", show_progress=False, kv_cache_memory="16MiB")
    assert llm.engine.model_name == "model"
    assert llm.generate("Hello", SamplingParams(max_tokens=3, temperature=0))[0].token_ids


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(DeepserveError, match="does not exist"):
        LLM(model=str(tmp_path / "nope"), show_progress=False)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(DeepserveError, match=r"not a \.gguf"):
        LLM(model=str(tmp_path / "weights.bin"), show_progress=False)
    with pytest.raises(DeepserveError, match=r"no config\.json"):
        LLM(model=str(tmp_path), show_progress=False)


def test_unsupported_architecture_named(tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DeepserveError, match=r"model_type 'mamba' is not supported"):
        LLM(model=str(bad), show_progress=False)


def test_wrong_tensor_shape_names_file_and_tensor(tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DeepserveError, match=r"tensor 'model.layers.0.mlp.\w+_proj.weight' "
                                             r"has shape \(\d+, \d+\), expected .*96"):
        LLM(model=str(bad), show_progress=False)


def test_missing_tensor_is_named(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    (st,) = bad.glob("*.safetensors")
    tensors = load_file(str(st))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(st), metadata={"format": "pt"})
    with pytest.raises(DeepserveError, match=r"layers\.1\.down_proj\.weight"):
        LLM(model=str(bad), show_progress=False)


def test_gguf_layers_interleaved_straight_from_the_file(default_gguf):
    """With the SIMD kernels, 4-bit projections are written into the kernels' order
    straight from the mapped file, part by part (q, k, v; gate, up): the same bytes as
    the file's tensors, llama's q/k rows put back in rotary order, concatenated and
    interleaved."""
    from pathlib import Path

    from deepserve import kernels
    from deepserve.layers.gguf_linear import X8, interleave
    from deepserve.loader.weights import load_model, open_checkpoint

    if not kernels.load(kernels.isa()) or kernels.isa() == "portable":
        pytest.skip("the interleaved order is the SIMD builds'")
    ckpt = open_checkpoint(Path(default_gguf), "gguf")
    cfg = ckpt.model_config()
    model = load_model(ckpt, cfg, 256, torch.bfloat16, torch.device("cpu"),
                       show_progress=False, keep_blocks=True, interleave=True)
    layer = model.layers[3]
    for module, names in ((layer.qkv_proj, ["attn_q", "attn_k", "attn_v"]),
                          (layer.gate_up_proj, ["ffn_gate", "ffn_up"]),
                          (layer.down_proj, ["ffn_down"])):
        file = torch.cat([ckpt.blocks(f"blk.3.{n}.weight", cfg) for n in names])
        assert module.kernel_qtype == module.qtype + X8
        assert torch.equal(module.blocks, interleave(file, module.qtype, module.in_features))
