"""The gateway in front of real `deepserve serve` backends, driven by the openai client."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_utils import ServerProcess, free_port

CONFIG = """
[gateway]
host = "127.0.0.1"
port = {port}
policy = "model"
balancing = "{balancing}"
health_interval_s = 0.5
rate_limit_rpm = {rpm}
{extra}

[tiers.lite]
models = ["lite", "fast"]
backends = ["{lite1}", "{lite2}"]

[tiers.pro]
models = ["pro"]
backends = ["{pro}"]

[routing]
default_tier = "lite"
auto_prompt_chars = 400
auto_max_tokens = 100
task_tiers = {{ analysis = "pro", chat = "lite" }}
cascade_min_logprob = -4.0
ab_weights = {{ lite = 0.5, pro = 0.5 }}
"""


class GatewayProcess:
    def __init__(self, tmp_path, backends, balancing="cache_aware", rpm=0, extra="") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp_path / f"gateway-{self.port}.toml"
        cfg.write_text(CONFIG.format(port=self.port, balancing=balancing, rpm=rpm, extra=extra,
                                     lite1=backends[0].url, lite2=backends[1].url,
                                     pro=backends[2].url))
        self.log = open(tmp_path / f"gateway-{self.port}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "deepserve.cli", "gateway",
                                      "--config", str(cfg)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("gateway did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    logs = tmp_path_factory.mktemp("backends")
    procs = []
    # lite: the default (GGUF blocks), two replicas; pro: the same model dequantized and
    # computed at full precision (float32)
    for args in (["--served-model-name", "lite"], ["--served-model-name", "lite"],
                 ["--served-model-name", "pro", "--dtype", "float32", "--quantization", "none"]):
        procs.append(ServerProcess(*args, "--max-num-seqs", "16", log_dir=logs))
    yield procs
    for p in procs:
        p.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def gateway(backends, tmp_path_factory):
    gw = GatewayProcess(tmp_path_factory.mktemp("gw"), backends)
    yield gw
    gw.stop()


def client(gw, **headers) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0,
                         default_headers=headers, timeout=120)


def tier_of(gw, model="lite", headers=None, **body) -> str:
    body = {"model": model, "prompt": "Hello", "max_tokens": 2, **body}
    r = httpx.post(f"{gw.url}/v1/completions", json=body, headers=headers or {}, timeout=120)
    assert r.status_code == 200, r.text
    return r.headers["x-deepserve-tier"]


def test_model_policy_routes_by_name(gateway):
    assert tier_of(gateway, "lite") == "lite"
    assert tier_of(gateway, "fast") == "lite"
    assert tier_of(gateway, "pro") == "pro"
    r = httpx.post(f"{gateway.url}/v1/completions", json={"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404 and "lite" in r.json()["error"]["message"]
    assert {m.id for m in client(gateway).models.list().data} == {"lite", "fast", "pro"}


def test_auto_policy_uses_request_features(gateway):
    auto = {"x-deepserve-route": "auto"}
    assert tier_of(gateway, "auto", auto) == "lite"
    assert tier_of(gateway, "auto", auto, prompt="word " * 200) == "pro"
    assert tier_of(gateway, "auto", auto, max_tokens=150) == "pro"
    assert tier_of(gateway, "auto", {**auto, "x-deepserve-task": "analysis"}) == "pro"
    bad = httpx.post(f"{gateway.url}/v1/completions", json={"prompt": "x"},
                     headers={**auto, "x-deepserve-task": "poetry"})
    assert bad.status_code == 400 and "analysis" in bad.json()["error"]["message"]


def test_streaming_passes_through_token_by_token(gateway):
    stream = client(gateway).chat.completions.with_raw_response.create(
        model="pro", max_tokens=12, stream=True, temperature=0,
        messages=[{"role": "user", "content": "Name the capital city of France."}])
    assert stream.headers["x-deepserve-tier"] == "pro"
    assert stream.headers["x-deepserve-backend"].startswith("http://127.0.0.1:")
    chunks = list(stream.parse())
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and
              c.choices[0].delta.content]
    assert len(deltas) >= 3 and "Paris" in "".join(deltas)
    assert all(c.usage is None for c in chunks)  # not asked for: not passed on


def test_slo_policy_uses_backend_latency(gateway):
    slo = {"x-deepserve-route": "slo"}
    for _ in range(3):  # give both tiers TTFT samples in their /metrics
        tier_of(gateway, "pro")
        tier_of(gateway, "lite")
    time.sleep(1.5)  # one health/metrics scrape
    assert tier_of(gateway, "auto", {**slo, "x-deepserve-slo-ms": "100000"}) == "pro"
    assert tier_of(gateway, "auto", {**slo, "x-deepserve-slo-ms": "0.001"}) == "lite"
    r = httpx.post(f"{gateway.url}/v1/completions", json={"prompt": "x"}, headers=slo)
    assert r.status_code == 400 and "x-deepserve-slo-ms" in r.json()["error"]["message"]


def test_cascade_escalates_on_length_and_keeps_confident_answers(gateway):
    c = client(gateway, **{"x-deepserve-route": "cascade"})
    sure = c.chat.completions.with_raw_response.create(
        model="auto", max_tokens=40, temperature=0,
        messages=[{"role": "user", "content": "Name the capital city of France."}])
    assert sure.headers["x-deepserve-tier"] == "lite"
    assert sure.headers["x-deepserve-escalated"] == "no"
    assert "Paris" in sure.parse().choices[0].message.content
    assert sure.parse().choices[0].logprobs is None  # probe logprobs not leaked
    cut = c.chat.completions.with_raw_response.create(
        model="auto", max_tokens=3, temperature=0,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}])
    assert cut.headers["x-deepserve-tier"] == "pro"
    assert cut.headers["x-deepserve-escalated"] == "length"
    text = httpx.get(f"{gateway.url}/metrics").text
    esc = [s for f in text_string_to_metric_families(text) for s in f.samples
           if s.name == "deepserve_gateway_escalations_total"]
    assert sum(s.value for s in esc) >= 1


def test_ab_split_is_sticky_per_key(gateway):
    ab = {"x-deepserve-route": "ab"}
    seen = {}
    for user in [f"user-{i}" for i in range(12)]:
        tiers = {tier_of(gateway, "auto", ab, user=user) for _ in range(2)}
        assert len(tiers) == 1
        seen[user] = tiers.pop()
    assert set(seen.values()) == {"lite", "pro"}


def test_failover_when_a_replica_is_killed_mid_traffic(backends, tmp_path):
    gw = GatewayProcess(tmp_path, backends, balancing="least_loaded")
    victim = backends[1]
    try:
        def one(i: int) -> str:
            # 200 tokens: requests are still streaming when the replica dies 1 s in
            return client(gw).completions.create(model="lite", prompt=f"Count to {i}:",
                                                 max_tokens=200,
                                                 extra_body={"ignore_eos": True}).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(16)]
            time.sleep(1.0)
            victim.proc.send_signal(signal.SIGKILL)
            results = [f.result(timeout=300) for f in futures]
        assert len(results) == 16 and all(results)
        text = httpx.get(f"{gw.url}/metrics").text
        up = {s.labels["backend"]: s.value for f in text_string_to_metric_families(text)
              for s in f.samples if s.name == "deepserve_gateway_backend_up"}
        assert up[victim.url] == 0.0 and up[backends[0].url] == 1.0
    finally:
        gw.stop()


def test_cache_aware_balancing_beats_round_robin_on_shared_prefixes(backends, tmp_path):
    live = backends[0]
    if live.proc.poll() is not None:
        pytest.skip("needs the surviving lite replica")
    from deepserve.bench.workloads import shared_prefix_workload
    from deepserve.loader.resolve import default_model_path
    from deepserve.loader.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_path(), "gguf")
    # Restart the killed replica so both lite replicas serve again (stopped first: run on
    # its own, without the test that kills it, this test would otherwise orphan it).
    backends[1].stop(signal.SIGKILL)
    backends[1] = ServerProcess("--served-model-name", "lite", "--max-num-seqs", "16",
                                log_dir=tmp_path)

    def hit_rate(balancing: str, seed: int) -> float:
        gw = GatewayProcess(tmp_path, backends, balancing=balancing)
        try:
            reqs = shared_prefix_workload(tok, 12, 300, 8, 2, num_prefixes=3, seed=seed)
            hit = total = 0
            for r in reqs:
                u = client(gw).completions.create(model="lite", prompt=r.prompt,
                                                  max_tokens=2).usage
                hit += u.prompt_tokens_details.cached_tokens
                total += u.prompt_tokens
            return hit / total
        finally:
            gw.stop()

    aware = hit_rate("cache_aware", seed=101)
    rr = hit_rate("round_robin", seed=202)
    print(f"prefix-cache hit rate: cache-aware {aware:.1%}, round robin {rr:.1%}")
    assert aware > rr


def test_prompt_cache_key_keeps_a_conversation_on_one_replica(gateway, backends):
    if any(b.proc.poll() is not None for b in backends[:2]):
        pytest.skip("needs both lite replicas")
    for key in ("conv-a", "conv-b", "conv-c"):
        seen = set()
        for i in range(4):  # different prompts, one key: one replica
            r = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=120, json={
                "model": "lite", "max_tokens": 1, "prompt_cache_key": key,
                "messages": [{"role": "user", "content": f"question {i} {key}"}]})
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-deepserve-backend"])
        assert len(seen) == 1, (key, seen)


def test_rate_limit_is_429_with_retry_after(backends, tmp_path):
    if any(b.proc.poll() is not None for b in backends):
        pytest.skip("needs every backend")
    gw = GatewayProcess(tmp_path, backends, rpm=2)
    try:
        codes = [httpx.post(f"{gw.url}/v1/completions", json={"model": "lite", "prompt": "hi",
                                                               "max_tokens": 1},
                            headers={"Authorization": "Bearer k1"}, timeout=60)
                 for _ in range(3)]
        assert [c.status_code for c in codes] == [200, 200, 429]
        assert int(codes[2].headers["Retry-After"]) >= 1
        other = httpx.post(f"{gw.url}/v1/completions", json={"model": "lite", "prompt": "hi",
                                                             "max_tokens": 1},
                           headers={"Authorization": "Bearer k2"}, timeout=60)
        assert other.status_code == 200  # limits are per key
    finally:
        gw.stop()


def test_tools_strictness_and_tokenize_pass_through_the_gateway(gateway):
    add = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"]}}}
    c = client(gateway)
    r = c.chat.completions.create(model="lite", max_tokens=60, temperature=0, tools=[add],
                                  tool_choice="required", parallel_tool_calls=False,
                                  messages=[{"role": "user", "content": "Add 2 and 3."}])
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.tool_calls[0].function.name == "add"
    stream = c.chat.completions.create(model="lite", max_tokens=60, temperature=0,
                                       tools=[add], tool_choice="required", stream=True,
                                       parallel_tool_calls=False,
                                       messages=[{"role": "user", "content": "Add 2 and 3."}])
    args = "".join(d.function.arguments or "" for ch in stream for choice in ch.choices
                   for d in choice.delta.tool_calls or [])
    assert set(json.loads(args)) == {"a", "b"}
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument"):
        c.completions.create(model="pro", prompt="x", extra_body={"bogus": 1})
    tok = httpx.post(f"{gateway.url}/tokenize", json={"model": "pro", "prompt": "Hello world"},
                     timeout=60)
    assert tok.status_code == 200 and tok.json()["count"] == 2
    assert tok.headers["x-deepserve-tier"] == "pro"


def test_gateway_holds_a_requests_largest_cost_against_the_budget(backends, tmp_path):
    if any(b.proc.poll() is not None for b in backends):
        pytest.skip("needs every backend")
    keys = tmp_path / "keys.toml"
    # 250 output tokens may cost 0.00055 at the default prices: one fits, two do not.
    keys.write_text('[[keys]]\nid = "capped"\nkey = "sk-capped"\nbudget = 0.001\n')
    gw = GatewayProcess(tmp_path, backends, extra=f'api_keys = "{keys}"')
    try:
        body = {"model": "lite", "prompt": "Write:", "max_tokens": 250, "ignore_eos": True}
        auth = {"Authorization": "Bearer sk-capped"}

        def post(b=body):
            return httpx.post(f"{gw.url}/v1/completions", json=b, headers=auth, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            codes = sorted(f.result().status_code for f in [pool.submit(post) for _ in
                                                            range(2)])
        assert codes == [200, 402], codes
        over = post()  # what the first spent plus this one's hold exceeds the budget
        assert over.status_code == 402
        assert over.json()["error"]["code"] == "insufficient_quota"
        small = post({"model": "lite", "prompt": "Hi", "max_tokens": 3})
        assert small.status_code == 200, small.text  # holds are released after the bill
        # With keys, the gateway's revenue counters and docs need a key too.
        for path in ("/metrics", "/openapi.json", "/docs"):
            assert httpx.get(f"{gw.url}{path}").status_code == 401
            assert httpx.get(f"{gw.url}{path}", headers=auth).status_code == 200
        assert httpx.get(f"{gw.url}/health").status_code in (200, 503)
    finally:
        gw.stop()


def test_responses_embeddings_and_models_through_the_gateway(backends, tmp_path):
    """The Responses API (plain, streamed, over the WebSocket) and embeddings go through
    the gateway, billed in its ledger by what the backends report."""
    import sqlite3

    from websockets.sync.client import connect

    if any(b.proc.poll() is not None for b in backends):
        pytest.skip("needs every backend")
    ledger = tmp_path / "gateway.db"
    gw = GatewayProcess(tmp_path, backends, extra=f'ledger = "{ledger}"')
    try:
        c = client(gw)
        r = c.responses.create(model="pro", input="Say hi.", max_output_tokens=4,
                               metadata={"run": "gw"})
        assert r.output_text and r.model == "pro"
        events = list(c.responses.create(model="lite", input="Say hi.", stream=True,
                                         max_output_tokens=4))
        assert events[-1].type in ("response.completed", "response.incomplete")
        streamed = events[-1].response
        e = c.embeddings.create(model="lite", input=["a cat", "a dog"])
        assert len(e.data) == 2 and len(e.data[0].embedding) == 576
        assert c.models.retrieve("pro").id == "pro"
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("nope")
        ws = gw.url.replace("http://", "ws://") + "/v1/responses/ws"
        with connect(ws) as sock:
            sock.send(json.dumps({"model": "lite", "input": "Hi", "max_output_tokens": 3}))
            kinds = []
            while (msg := sock.recv()) != "[DONE]":
                kinds.append(json.loads(msg)["type"])
        assert kinds[0] == "response.created" and kinds[-1] in ("response.completed",
                                                                 "response.incomplete")
        deadline = time.time() + 10
        while time.time() < deadline:
            with sqlite3.connect(ledger) as db:
                rows = {row[0]: row[1:] for row in db.execute(
                    "SELECT request_id, endpoint, prompt_tokens, completion_tokens, "
                    "metadata FROM usage")}
            if len(rows) >= 5:
                break
            time.sleep(0.2)
        assert rows[r.id] == ("responses", r.usage.input_tokens, r.usage.output_tokens,
                              '{"run": "gw"}')
        assert rows[streamed.id][:3] == ("responses", streamed.usage.input_tokens,
                                         streamed.usage.output_tokens)
        assert [v[0] for v in rows.values()].count("embeddings") == 1
        assert sum(v[1] for v in rows.values() if v[0] == "embeddings") == \
            e.usage.prompt_tokens
    finally:
        gw.stop()


def test_a_500_the_request_caused_goes_back_without_retry_or_ejection(tmp_path, monkeypatch):
    """Two replicas that answer 500 to one kind of request: the client gets that 500 at
    once, no other replica is tried, both stay in the pool, and other requests succeed."""
    from pathlib import Path

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    pair = [ServerProcess("--served-model-name", "lite", "--no-warmup", "--plugin",
                          "plugin_examples:FailOn", log_dir=tmp_path) for _ in range(2)]
    gw = GatewayProcess(tmp_path, [pair[0], pair[1], pair[1]])
    try:
        ask = {"model": "lite", "max_tokens": 2,
               "messages": [{"role": "user", "content": "Hi"}]}
        for _ in range(5):
            bad = httpx.post(f"{gw.url}/v1/chat/completions", json=ask | {"user": "explode"},
                             timeout=60)
            assert bad.status_code == 500, bad.text
        retries = sum(float(line.split()[-1]) for line in
                      httpx.get(f"{gw.url}/metrics").text.splitlines()
                      if line.startswith("deepserve_gateway_retries_total{"))
        assert retries == 0
        health = httpx.get(f"{gw.url}/health").json()
        assert health["backends_up"] == {"lite": 2, "pro": 1}, health
        ok = httpx.post(f"{gw.url}/v1/chat/completions", json=ask, timeout=60)
        assert ok.status_code == 200, ok.text
    finally:
        gw.stop()
        for srv in pair:
            srv.stop()


def test_the_gateway_bills_what_it_delivered_and_cancels_when_the_client_leaves(
        backends, tmp_path):
    import sqlite3

    if any(b.proc.poll() is not None for b in backends):
        pytest.skip("needs every backend")
    ledger = tmp_path / "delivered.db"
    gw = GatewayProcess(tmp_path, backends, extra=f'ledger = "{ledger}"')

    def running() -> float:
        total = 0.0
        for b in backends[:2]:
            for line in httpx.get(f"{b.url}/metrics").text.splitlines():
                if line.startswith("deepserve_num_requests_running{"):
                    total += float(line.split()[-1])
        return total

    def rows() -> list[dict]:
        with sqlite3.connect(ledger) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM usage ORDER BY id")]

    try:
        long = {"model": "lite", "prompt": "Once upon a time", "max_tokens": 2000,
                "ignore_eos": True}
        # a non-streaming client that gives up after a second: the backend stops too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{gw.url}/v1/completions", json=long, timeout=1.0)
        deadline = time.time() + 5
        while running() and time.time() < deadline:
            time.sleep(0.1)
        assert running() == 0  # 2,000 tokens would take far longer
        # a streaming client that leaves after ten chunks is billed what it was sent
        with httpx.stream("POST", f"{gw.url}/v1/completions", json=long | {"stream": True},
                          timeout=60) as stream:
            got = 0
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    got += 1
                    if got == 10:
                        break
        # a whole stream: its row has start, first-token and end times in order
        whole = httpx.post(f"{gw.url}/v1/chat/completions", timeout=60, json={
            "model": "lite", "max_tokens": 5, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Hi"}]})  # sampled: no stop before 5
        assert whole.status_code == 200 and '"usage"' not in whole.text  # not asked for
        deadline = time.time() + 10
        while len(rows()) < 2 and time.time() < deadline:
            time.sleep(0.2)
        cut, done = rows()
        assert cut["finish_reason"] == "abort" and 10 <= cut["completion_tokens"] < 100
        assert done["completion_tokens"] == 5
        assert done["start_ts"] < done["first_token_ts"] <= done["end_ts"]
    finally:
        gw.stop()


def test_stream_cut_by_a_dying_backend_ends_with_an_sse_error(backends, tmp_path):
    # Runs last: it kills the only "pro" replica. The broken stream is billed the tokens
    # it delivered (the client asks for the usage in every chunk to know them too).
    import sqlite3

    ledger = tmp_path / "broken.db"
    gw = GatewayProcess(tmp_path, backends, extra=f'ledger = "{ledger}"')
    victim = backends[2]
    try:
        body = {"model": "pro", "prompt": "Count:", "max_tokens": 2000, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True,
                                                   "continuous_usage_stats": True}}
        with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=120) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [next(line for line in lines if line.startswith("data: {"))]
            victim.proc.send_signal(signal.SIGKILL)
            got += [line for line in lines if line]  # ends: no exception, no hang
        assert got[-1] == "data: [DONE]"
        err = json.loads(got[-2][6:])["error"]
        assert err["code"] == "backend_stream_broken" and victim.url in err["message"]
        delivered = [json.loads(x[6:])["usage"]["completion_tokens"] for x in got[:-2]
                     if x.startswith("data: {")]
        deadline = time.time() + 10
        rows = []
        while not rows and time.time() < deadline:
            with sqlite3.connect(ledger) as db:
                rows = db.execute("SELECT completion_tokens, finish_reason FROM usage"
                                  ).fetchall()
            time.sleep(0.1)
        assert rows == [(delivered[-1], "abort")] and delivered[-1] > 0
        # The gateway itself goes on serving the tiers that are still up.
        assert tier_of(gw, "lite") == "lite"
    finally:
        gw.stop()
        assert "Traceback" not in (tmp_path / f"gateway-{gw.port}.log").read_text()
