"""A DeepSeek-V3-shaped model (MLA + MoE, tiny and random) behind the real server, driven
by the real `openai` client: chunked prefill, prefix caching, streaming, structured
output, forced tool calls and billing work on it as on the default model."""

from __future__ import annotations

import json
import sqlite3

import openai
import pytest
from server_utils import ServerProcess
from tiny_models import write_tiny

from deepserve import LLM, SamplingParams

LONG = "Tell me about the history of the city and its rivers, bridges and markets. " * 6


@pytest.fixture(scope="module")
def served(tmp_path_factory, default_gguf):
    folder = tmp_path_factory.mktemp("tiny-ds3")
    write_tiny(folder, "deepseek_v3", default_gguf)
    ledger = tmp_path_factory.mktemp("ledger") / "ledger.db"
    # a 32-token step budget: the long prompt is prefilled in chunks
    srv = ServerProcess("--model", str(folder), "--dtype", "float32", "--quantization", "none",
                        "--max-num-batched-tokens", "32", "--max-model-len", "512",
                        "--ledger", str(ledger), log_dir=tmp_path_factory.mktemp("logs"))
    yield srv, folder, ledger
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0].url}/v1", api_key="unused", max_retries=0)


def test_chunked_prefill_and_prefix_cache_match_offline(served, client):
    _, folder, _ = served
    name = client.models.list().data[0].id
    first = client.completions.create(model=name, prompt=LONG, max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
    again = client.completions.create(model=name, prompt=LONG, max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert again.choices[0].text == first.choices[0].text
    llm = LLM(model=str(folder), dtype="float32", quantization="none", show_progress=False,
              kv_cache_memory="16MiB")
    offline = llm.generate([LONG], SamplingParams(temperature=0, max_tokens=10,
                                                  ignore_eos=True))[0]
    assert first.choices[0].text == offline.outputs[0].text


def test_streaming_structured_output_and_tools(served, client):
    name = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 8
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "year": {"type": "integer"}},
              "required": ["city", "year"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "A city and a year, as JSON."}],
        max_tokens=60, response_format={"type": "json_schema",
                                        "json_schema": {"name": "c", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"city", "year"} and isinstance(value["year"], int)
    tools = [{"type": "function", "function": {
        "name": "add", "parameters": {"type": "object", "properties": {
            "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
            "additionalProperties": False}}}]
    r = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "add 2 and 3"}], tools=tools,
        tool_choice="required", parallel_tool_calls=False, max_tokens=60)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "add"
    assert set(json.loads(call.function.arguments)) == {"a", "b"}


def test_every_answer_is_in_the_ledger(served, client):
    _, _, ledger = served
    name = client.models.list().data[0].id
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=5)
    conn = sqlite3.connect(ledger)
    row = conn.execute("SELECT prompt_tokens, completion_tokens FROM usage WHERE "
                       "request_id = ?", (r.id,)).fetchone()
    assert row == (r.usage.prompt_tokens, r.usage.completion_tokens)


def test_a_server_lays_out_mapped_experts_after_its_warm_up(tmp_path, default_gguf,
                                                           monkeypatch):
    """DEEPSERVE_EXPERT_LAYOUT=background through the real server: ready with the
    experts as the file maps them, the layout written by a thread started after the
    warm-up and adopted between requests; greedy answers before and after agree."""
    from tiny_models import write_gguf

    from deepserve import kernels

    if not kernels.available() or kernels.isa() == "portable":
        pytest.skip("the interleaved layout is the SIMD kernels'")
    model = write_tiny(tmp_path / "moe", "qwen3_moe", default_gguf)
    gguf = write_gguf(model, "qwen3_moe", tmp_path / "moe-q4.gguf", default_gguf, 2)
    monkeypatch.setenv("DEEPSERVE_EXPERT_LAYOUT", "background")
    srv = ServerProcess("--model", str(gguf), "--dtype", "float32",
                        "--kv-cache-memory", "32MiB", log_dir=tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        name = client.models.list().data[0].id
        texts = []
        for _ in range(40):  # each request's steps adopt what the thread has finished
            texts.append(client.completions.create(
                model=name, prompt="The river", max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True}).choices[0].text)
            if "experts in the kernels' layout" in srv.log():
                break
        log = srv.log()
        assert "experts run as the file maps them" in log
        assert log.index("warm-up:") < log.index("experts in the kernels' layout")
        assert len(set(texts)) == 1, texts
    finally:
        assert srv.stop() == 0, srv.log()
