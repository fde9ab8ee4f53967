"""Server behaviour under misuse and load: auth, queue limits, disconnects, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_utils import ServerProcess

MODEL = "SmolLM2-135M-Instruct"


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess("--max-num-seqs", "32", log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    assert srv.stop() == 0, srv.log()


def test_json_schema_output_validates(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
              "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                             "population": {"type": "integer"}}}
    r = client.chat.completions.create(
        model=MODEL, temperature=0.7, seed=3, max_tokens=80,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "city", "schema": schema}})
    data = json.loads(r.choices[0].message.content)
    jsonschema.validate(data, schema)
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=300, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give me a JSON object with the keys name and "
                   "color for a cat."}])
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    bad = httpx.post(f"{server.url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema":
                                                                   {"type": "strin"}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"


def test_32_concurrent_streaming_clients(server):
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0,
                                timeout=300)

    async def one(i: int) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model=MODEL, max_tokens=24, stream=True, temperature=0.8, seed=i,
            messages=[{"role": "user", "content": f"Write a sentence about the number {i}."}])
        text, reason = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def main():
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32
    assert all(text and reason in ("stop", "length") for text, reason in results)


def test_disconnecting_clients_free_their_blocks(server):
    def wait_idle(timeout: float = 60) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if metric(server.url, "deepserve_num_requests_running") == 0 and \
                    metric(server.url, "deepserve_num_requests_waiting") == 0:
                break
            time.sleep(0.2)
        return metric(server.url, "deepserve_kv_cache_blocks_used")

    idle = wait_idle()

    def stream_then_leave(i: int) -> None:
        body = {"model": MODEL, "prompt": f"Story number {i}: once upon a time", "stream": True,
                "max_tokens": 2000, "ignore_eos": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                          timeout=60) as resp:
            for k, _ in enumerate(resp.iter_lines()):
                if k >= 6:
                    break  # leaving the block closes the connection mid-stream

    threads = [threading.Thread(target=stream_then_leave, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert wait_idle() == idle
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    srv = ServerProcess("--api-key", "sekret", "--max-num-seqs", "1", "--max-queue", "1",
                        "--shutdown-grace", "60", log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    srv.stop(signal.SIGKILL)


def test_api_key_required(small_server):
    url = f"{small_server.url}/v1/models"
    assert httpx.get(url).status_code == 401
    wrong = httpx.get(url, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url, headers={"Authorization": "Bearer sekret"}).status_code == 200
    client = openai.OpenAI(base_url=f"{small_server.url}/v1", api_key="bad", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert httpx.get(f"{small_server.url}/health").status_code == 200  # probes need no key


def test_queue_full_is_429_with_retry_after(small_server):
    headers = {"Authorization": "Bearer sekret"}
    body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": 150, "ignore_eos": True}
    statuses: list[httpx.Response] = []

    def fire() -> None:
        statuses.append(httpx.post(f"{small_server.url}/v1/completions", json=body,
                                   headers=headers, timeout=300))

    threads = [threading.Thread(target=fire) for _ in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.15)
    for t in threads:
        t.join(300)
    codes = sorted(r.status_code for r in statuses)
    assert codes.count(200) >= 2 and 429 in codes, codes
    limited = next(r for r in statuses if r.status_code == 429)
    assert limited.headers["Retry-After"] == "1"
    assert limited.json()["error"]["code"] == "queue_full"


def test_sigterm_drains_running_requests_then_exits_0(small_server):
    headers = {"Authorization": "Bearer sekret"}
    # Long enough to still be running when the second request arrives 0.5 s after
    # SIGTERM (600 tokens: several seconds at any plausible speed).
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 600, "stream": True,
            "ignore_eos": True}
    texts: list[str] = []
    with httpx.stream("POST", f"{small_server.url}/v1/completions", json=body, headers=headers,
                      timeout=120) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line)
        small_server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = httpx.post(f"{small_server.url}/v1/completions", headers=headers,
                             json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503, refused.text
        assert httpx.get(f"{small_server.url}/health").status_code == 503
        rest = [line for line in lines if line]
    events = [json.loads(x[6:]) for x in [first, *rest] if x != "data: [DONE]"]
    texts = [e["choices"][0]["text"] for e in events if e["choices"]]
    assert rest[-1] == "data: [DONE]"
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert len(texts) >= 500  # the running request ran to its end
    assert small_server.proc.wait(60) == 0
