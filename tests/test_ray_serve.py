"""Ray Serve on a local Ray cluster on this machine: two CPU replicas of one tier behind
the OpenAI ingress, driven by the openai client; both replicas must answer, and both
bill into one PostgreSQL ledger with key quotas shared through Redis."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import openai
import pytest
from server_utils import free_port

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'deepserve[ray]')")


AUTH = {"Authorization": "Bearer x"}
LEDGER: dict[str, str] = {}  # the app's ledger URL, set by the fixture


@pytest.fixture(scope="module")
def ray_app(postgres, redis_server, tmp_path_factory):
    from ray import serve

    from deepserve.deploy.ray_serve import RayServeConfig, run

    keys = tmp_path_factory.mktemp("ray") / "keys.toml"
    keys.write_text('[[keys]]\nid = "team"\nkey = "x"\n\n'
                    '[[keys]]\nid = "capped"\nkey = "sk-capped"\ntoken_quota = 150\n')
    ledger = postgres.fresh_database(f"ray_{free_port()}")
    redis_server.flush()
    port = free_port()
    cfg = RayServeConfig.from_dict({
        "ray": {"host": "127.0.0.1", "port": port, "ledger": ledger, "redis": redis_server.url,
                "api_keys": str(keys)},
        "tiers": {"lite": {"models": ["lite"], "min_replicas": 2, "max_replicas": 2,
                           "num_cpus": 1, "engine": {"kv_cache_memory": "64MiB",
                                                     "num_threads": 1}}}})
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        run(cfg, blocking=False)
        LEDGER["url"] = ledger
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_through_the_openai_routes(ray_app):
    client = openai.OpenAI(base_url=f"{ray_app}/v1", api_key="x", max_retries=0, timeout=300)
    assert [m.id for m in client.models.list().data] == ["lite"]

    def one(i: int) -> tuple[str, str]:
        raw = client.completions.with_raw_response.create(
            model="lite", prompt=f"Request {i}: once upon a time", max_tokens=24,
            extra_body={"ignore_eos": True})
        return raw.headers["x-deepserve-replica"], raw.parse().choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    replicas = {r for r, _ in results}
    assert len(replicas) == 2, replicas
    assert all(text for _, text in results)


def test_streaming_and_errors_pass_through(ray_app):
    client = openai.OpenAI(base_url=f"{ray_app}/v1", api_key="x", max_retries=0, timeout=300)
    stream = client.chat.completions.create(
        model="lite", max_tokens=12, stream=True, temperature=0,
        messages=[{"role": "user", "content": "Name the capital city of France."}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in text
    bad = httpx.post(f"{ray_app}/v1/chat/completions", json={
        "model": "lite", "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
        headers=AUTH, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
    unknown = httpx.post(f"{ray_app}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404


def test_tools_strictness_and_tokenize_pass_through(ray_app):
    client = openai.OpenAI(base_url=f"{ray_app}/v1", api_key="x", max_retries=0, timeout=300)
    add = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"]}}}
    r = client.chat.completions.create(
        model="lite", max_tokens=60, temperature=0, tools=[add], tool_choice="required",
        parallel_tool_calls=False, messages=[{"role": "user", "content": "Add 2 and 3."}])
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "add" and r.choices[0].finish_reason == "tool_calls"
    assert set(json.loads(call.function.arguments)) == {"a", "b"}
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument"):
        client.completions.create(model="lite", prompt="x", extra_body={"bogus": 1})
    tok = httpx.post(f"{ray_app}/tokenize", json={"model": "lite", "prompt": "Hello world"},
                     headers=AUTH, timeout=60)
    assert tok.status_code == 200 and tok.json()["count"] == 2


def test_responses_stored_in_the_shared_ledger_and_embeddings(ray_app):
    """A stored response lives in the replicas' PostgreSQL ledger: every replica reads
    it and chains from it."""
    client = openai.OpenAI(base_url=f"{ray_app}/v1", api_key="x", max_retries=0, timeout=300)
    r = client.responses.create(model="lite", input="Say hi.", max_output_tokens=3)
    seen = set()
    for _ in range(32):  # Serve picks a replica per request: until both have answered
        raw = client.responses.with_raw_response.retrieve(r.id)
        seen.add(raw.headers["x-deepserve-replica"])
        assert raw.parse().output_text == r.output_text
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen
    chained = client.responses.create(model="lite", input="Again.", previous_response_id=r.id,
                                      max_output_tokens=3)
    assert chained.usage.input_tokens > r.usage.input_tokens
    e = client.embeddings.create(model="lite", input="hello")
    assert len(e.data[0].embedding) == 576 and e.usage.prompt_tokens > 0
    assert client.models.retrieve("lite").id == "lite"


def test_replicas_bill_into_one_ledger_and_share_a_quota(ray_app):
    from deepserve.billing.ledger_db import open_db
    from deepserve.billing.report import build_report

    no_key = httpx.post(f"{ray_app}/v1/completions", json={"model": "lite", "prompt": "x"},
                        timeout=60)
    assert no_key.status_code == 401
    client = openai.OpenAI(base_url=f"{ray_app}/v1", api_key="sk-capped", max_retries=0,
                           timeout=300)

    def one(i: int) -> int:
        try:
            client.completions.create(model="lite", prompt=f"Request {i}: hello",
                                      max_tokens=10, extra_body={"ignore_eos": True})
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(one, range(24)))
    assert set(codes) == {200, 429}, codes
    db = open_db(LEDGER["url"])
    (n, tokens, replicas), = db.query(
        "SELECT COUNT(*), SUM(prompt_tokens + completion_tokens), COUNT(DISTINCT replica_id) "
        "FROM usage WHERE key_id = 'capped'")
    tiers = {t for (t,) in db.query("SELECT DISTINCT tier FROM usage")}
    team = db.query("SELECT COUNT(*) FROM usage WHERE key_id = 'team'")[0][0]
    db.close()
    # Both replicas billed the key, and together they kept to its one quota.
    assert n == codes.count(200) and tokens <= 150 and replicas == 2
    assert tiers == {"lite"} and team >= 16
    rep = build_report(LEDGER["url"])
    assert rep["replicas"] == 2 and rep["total"]["requests"] == n + team


def test_keys_changed_in_the_ledger_hold_on_every_replica(ray_app):
    """The key file seeded the ledger's key table; a key an admin creates there (the
    admin API's own code path) works on the Ray replicas within 5 s, and once revoked
    gets 401 on them, with no restart."""
    import time

    from deepserve.billing.key_table import KeyTable

    table = KeyTable(LEDGER["url"])
    try:
        assert {k.key_id for k in table.load()} >= {"team", "capped"}
        _, secret = table.create({"team": "ray"}, "ray-new", "admin@test", "test")

        def until(status: int, saying: str = "") -> httpx.Response:
            deadline = time.monotonic() + 5
            while True:
                r = httpx.post(f"{ray_app}/v1/completions", timeout=60, json={
                    "model": "lite", "prompt": "Hi", "max_tokens": 1},
                    headers={"Authorization": f"Bearer {secret}"})
                if (r.status_code == status and saying in r.text) or \
                        time.monotonic() > deadline:
                    return r
                time.sleep(0.2)

        assert until(200).status_code == 200
        table.revoke("ray-new", "admin@test", "test")
        r = until(401, "revoked")
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    finally:
        table.close()
