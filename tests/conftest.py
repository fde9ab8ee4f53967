"""Shared fixtures: the real default model (deepserve and transformers) and tiny checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

GREEDY_TOKENS = 24


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from deepserve.loader.resolve import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def hf_model(default_gguf: Path):
    """transformers' own reading of the same GGUF, in float32: the reference."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(default_gguf.parent),
                                                 gguf_file=default_gguf.name,
                                                 dtype=torch.float32)
    model.eval()
    return tok, model


@pytest.fixture(scope="session")
def hf_greedy(hf_model):
    """Greedy continuations of every test prompt by transformers (fp32, one by one)."""
    from prompts import PROMPTS

    tok, model = hf_model
    out = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            gen = model.generate(ids, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS,
                                 do_sample=False)
            out.append(gen[0, ids.shape[1]:].tolist())
    return out


@pytest.fixture(scope="session")
def llm_fp32():
    from deepserve import LLM

    # The float32 reference: the GGUF dequantized once, computed densely.
    return LLM(dtype="float32", quantization="none", show_progress=False,
               kv_cache_memory="256MiB")


@pytest.fixture(scope="session")
def llm_bf16():
    from deepserve import LLM

    # the default configuration, in bf16 (GGUF blocks as stored)
    return LLM(dtype="bfloat16", show_progress=False, kv_cache_memory="256MiB")


def _write_tiny(path: Path, arch: str, default_gguf: Path) -> Path:
    """A small random-weight checkpoint written by transformers itself, with the default
    model's tokenizer, so the safetensors path is exercised for real."""
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(tie_word_embeddings=True, rope_theta=10000.0, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(tie_word_embeddings=False, rope_theta=1000000.0,
                                       **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    # Random init gives tiny logits; scale weights up so greedy choices are well separated.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_gguf) -> Path:
    return _write_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", default_gguf)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, default_gguf) -> Path:
    return _write_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", default_gguf)


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama_dir):
    from deepserve import LLM

    return LLM(model=str(tiny_llama_dir), dtype="float32", show_progress=False,
               kv_cache_memory="16MiB")


@pytest.fixture(params=["avx512", "avx2", "portable"])
def each_isa(request):
    """Run a kernel test on one forced instruction-set build (skipped where this CPU
    cannot run it); ``kernels.*`` calls go to that build for the test's duration."""
    from deepserve import kernels

    which = request.param
    if not kernels.available():
        pytest.skip(f"CPU kernels not built: {kernels.unavailable_reason()}")
    if which not in kernels.supported_isas():
        pytest.skip(f"this CPU cannot run the {which} build")
    assert kernels.load(which), kernels._state.get(f"reason:{which}")
    before = kernels._state.get("ops")
    kernels._state["ops"] = kernels.ops(which)
    yield which
    kernels._state["ops"] = before


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A real PostgreSQL server on loopback for the whole run (tests/services.py)."""
    from services import Postgres

    pg = Postgres()
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real Redis server on loopback for the whole run (tests/services.py)."""
    from services import Redis

    r = Redis(tmp_path_factory.mktemp("redis"))
    yield r
    r.stop()


@pytest.fixture
def amx_tiles():
    """The AMX tile kernels on for a test (skipped where this CPU, or Linux, offers none),
    and back as they were after it."""
    from deepserve import kernels

    if not kernels.available() or kernels.isa() != "avx512":
        pytest.skip("the AMX kernels are part of the avx512 build, not in use here")
    before = kernels.amx()
    if not kernels.set_amx(True):
        pytest.skip("no AMX tiles here (the CPU lacks AMX-BF16 or Linux did not grant them)")
    yield
    kernels.set_amx(before)
