"""The OpenAI-compatible server as a real process, driven by the real `openai` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_utils import ServerProcess

from deepserve import SamplingParams


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # bf16 like llm_bf16, which the greedy test compares with, on any CPU
    srv = ServerProcess("--max-num-seqs", "16", "--dtype", "bfloat16",
                        log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert "/v1/chat/completions" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_chat_completion(client):
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=20,
        messages=[{"role": "user", "content": "Name the capital city of France."}])
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 20 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    extra = r.usage.model_extra
    assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == \
        r.usage.prompt_tokens


def test_greedy_http_equals_offline(client, llm_bf16):
    prompt = "def fibonacci(n):"
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt,
                                  temperature=0, max_tokens=24)
    offline = llm_bf16.generate(prompt, SamplingParams(temperature=0, max_tokens=24))[0]
    assert r.choices[0].text == offline.text
    assert r.usage.completion_tokens == len(offline.token_ids)


def test_streaming_chat_with_usage(client):
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=16, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count from one to five."}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] in ("stop", "length") and all(f is None for f in finals[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    r = openai.OpenAI(base_url=stream.response.url.join("/v1"), api_key="x")
    full = r.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0,
                                     max_tokens=16, messages=[{"role": "user", "content":
                                                               "Count from one to five."}])
    assert full.choices[0].message.content == text


def test_n_and_logprobs(client):
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Once upon a time",
                                  n=2, temperature=1.0, seed=5, max_tokens=6, logprobs=2)
    assert sorted(c.index for c in r.choices) == [0, 1]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 6
    assert all(v <= 0 for v in lp.token_logprobs)
    c = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0,
                                       max_tokens=5, logprobs=True, top_logprobs=3,
                                       messages=[{"role": "user", "content": "Hi"}])
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert len(content[0].top_logprobs) == 3
    assert content[0].top_logprobs[0].logprob >= content[0].logprob - 1e-6


def test_raw_sse_ends_with_done(server):
    body = {"prompt": "Hello", "max_tokens": 5, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("body, status, param", [
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": "not a list"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "messages"),
])
def test_errors_use_openai_body(server, body, status, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param


def test_malformed_json_is_400(server):
    r = httpx.post(f"{server.url}/v1/completions", content=b"{bad json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ["deepserve_num_requests_running", "deepserve_num_requests_waiting",
                 "deepserve_kv_cache_usage_ratio", "deepserve_prefix_cache_hit_rate",
                 "deepserve_prompt_tokens", "deepserve_generation_tokens",
                 "deepserve_time_to_first_token_seconds",
                 "deepserve_time_per_output_token_seconds",
                 "deepserve_e2e_request_latency_seconds"]:
        assert name in families, name
    gen = [s for s in families["deepserve_generation_tokens"].samples
           if s.name.endswith("_total")]
    assert gen[0].value >= 3
