"""Running deepserve as a service: keys in the ledger's database, managed through the
admin API on one server and obeyed by another sharing the database (real SQLite and
real PostgreSQL), the audit table, the tenant usage API, and a gateway that starts
without torch and serves the same admin API."""

from __future__ import annotations

import concurrent.futures
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest
from server_utils import ServerProcess, free_port, wait_healthy

from deepserve.billing.ledger_db import open_db

ADMIN = "admin-" + "x" * 24
SEED = '[[keys]]\nid = "seeded"\nkey = "sk-seeded-secret"\nteam = "ops"\n'


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def complete(url: str, key: str | None, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", headers=bearer(key), timeout=60,
                      json={"prompt": "Hello", "max_tokens": 1, **body})


def admin(method: str, url: str, path: str, key: str | None = ADMIN, **kw) -> httpx.Response:
    return httpx.request(method, f"{url}/admin{path}", headers=bearer(key), timeout=30, **kw)


def within(seconds: float, probe, want: int, saying: str = "") -> httpx.Response:
    """Call ``probe`` until it answers ``want`` (with ``saying`` in the body) or
    ``seconds`` pass; the last answer."""
    deadline = time.monotonic() + seconds
    while True:
        r = probe()
        if (r.status_code == want and saying in r.text) or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def pair(request, tmp_path_factory):
    """Two servers sharing one ledger (and so its keys), started together."""
    d = tmp_path_factory.mktemp(f"admin-{request.param}")
    if request.param == "sqlite":
        ledger = str(d / "ledger.db")
    else:
        ledger = request.getfixturevalue("postgres").fresh_database(
            f"admin_{uuid.uuid4().hex[:8]}")
    (d / "keys.toml").write_text(SEED)
    args = ("--ledger", ledger, "--admin-key", ADMIN, "--api-keys", str(d / "keys.toml"),
            "--no-warmup", "--num-threads", "1", "--max-num-seqs", "8")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda _: ServerProcess(*args, log_dir=d), range(2)))
    yield servers[0], servers[1], ledger, d
    for s in servers:
        s.stop()


def test_keys_created_limited_rotated_and_revoked_on_one_server_hold_on_the_other(pair):
    a, b, ledger, _ = pair
    # created through the admin API on A: works on B within 5 s
    r = admin("POST", a.url, "/keys", json={"id": "tenant-1", "team": "red", "budget": 5})
    assert r.status_code == 201, r.text
    created = r.json()
    secret = created["key"]
    assert created["id"] == "tenant-1" and secret.startswith("sk-ds-")
    assert secret not in str(admin("GET", a.url, "/keys").json())  # shown once only
    t0 = time.monotonic()
    assert within(5, lambda: complete(b.url, secret), 200).status_code == 200
    assert time.monotonic() - t0 < 5
    # the real OpenAI client, on B, with the new key
    client = openai.OpenAI(base_url=f"{b.url}/v1", api_key=secret)
    out = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=2,
                                         messages=[{"role": "user", "content": "Hi"}])
    assert out.usage.completion_tokens >= 1

    # a lowered budget, set on B, is enforced on A
    assert admin("PATCH", b.url, "/keys/tenant-1", json={"budget": 0}).status_code == 200
    r = within(5, lambda: complete(a.url, secret), 402, "budget")
    assert r.status_code == 402 and "budget" in r.json()["error"]["message"]
    assert admin("PATCH", a.url, "/keys/tenant-1", json={"budget": None}).status_code == 200
    assert within(5, lambda: complete(b.url, secret), 200).status_code == 200

    # rotated on A: the old secret gets 401 on B, the new one works there
    rotated = admin("POST", a.url, "/keys/tenant-1/rotate").json()["key"]
    assert within(5, lambda: complete(b.url, secret), 401).status_code == 401
    assert within(5, lambda: complete(b.url, rotated), 200).status_code == 200

    # revoked on B: 401 on both, saying it was revoked, without a restart
    assert admin("POST", b.url, "/keys/tenant-1/revoke").json()["status"] == "revoked"
    for s in (a, b):
        r = within(5, lambda s=s: complete(s.url, rotated), 401, "revoked")
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    assert a.proc.poll() is None and b.proc.poll() is None  # no restart

    # every action is in the audit table, in order, with who did it and where
    db = open_db(ledger)
    try:
        rows = db.query("SELECT actor, action, key_id, detail, front FROM audit "
                        "WHERE key_id = ? ORDER BY id", ("tenant-1",))
    finally:
        db.close()
    assert [r[1] for r in rows] == ["create", "update", "update", "rotate", "revoke"]
    assert all(r[0].startswith("admin@") and r[4] == "server" for r in rows)
    assert '"budget": 0' in rows[1][3]
    api_audit = admin("GET", a.url, "/audit", params={"key_id": "tenant-1"}).json()["data"]
    assert [e["action"] for e in api_audit] == ["revoke", "rotate", "update", "update",
                                                "create"]


def test_seeded_keys_expiry_models_and_rate_limits(pair):
    a, b, _, _ = pair
    # the key file seeded the table: that key works on both and is listed
    assert complete(a.url, "sk-seeded-secret").status_code == 200
    listed = {k["id"]: k for k in admin("GET", b.url, "/keys").json()["data"]}
    assert listed["seeded"]["team"] == "ops" and listed["seeded"]["status"] == "active"
    # an expired key: 401 saying it expired
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    old = admin("POST", a.url, "/keys", json={"id": "old", "expires_at": past}).json()
    r = within(5, lambda: complete(b.url, old["key"]), 401, "expired")
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "key_expired"
    # a key for other models only: 403 naming what it may use
    other = admin("POST", a.url, "/keys", json={"models": ["pro"]}).json()
    r = within(5, lambda: complete(b.url, other["key"]), 403)
    assert r.status_code == 403 and "'pro'" in r.json()["error"]["message"]
    # the key's own requests-per-minute limit
    slow = admin("POST", a.url, "/keys", json={"rpm": 2}).json()["key"]
    codes = [complete(a.url, slow).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_admin_api_refuses_bad_input_and_tenants(pair):
    a, _, _, _ = pair
    tenant = admin("POST", a.url, "/keys", json={"id": "plain"}).json()["key"]
    r = admin("GET", a.url, "/keys", key=tenant)
    assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
    assert admin("GET", a.url, "/keys", key=None).status_code == 401
    assert admin("GET", a.url, "/keys", key="wrong-key").status_code == 401
    r = admin("POST", a.url, "/keys", json={"id": "x", "budjet": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "budjet"
    r = admin("PATCH", a.url, "/keys/plain", json={"rpm": -1})
    assert r.status_code == 400 and "rpm" in r.json()["error"]["message"]
    r = admin("POST", a.url, "/keys", json={"id": "plain"})
    assert r.status_code == 409 and "exists" in r.json()["error"]["message"]
    r = admin("POST", a.url, "/keys", json={"id": "bad id!"})
    assert r.status_code == 400
    assert admin("PATCH", a.url, "/keys/nobody", json={"rpm": 1}).status_code == 404
    r = admin("GET", a.url, "/spend", params={"group_by": "planet"})
    assert r.status_code == 400
    # the admin routes are in the OpenAPI document
    paths = httpx.get(f"{a.url}/openapi.json", headers=bearer(ADMIN), timeout=30).json()["paths"]
    assert {"/admin/keys", "/admin/keys/{key_id}", "/admin/keys/{key_id}/rotate",
            "/admin/keys/{key_id}/revoke", "/admin/spend", "/admin/report", "/admin/tco",
            "/admin/audit", "/v1/usage"} <= set(paths)


def test_a_tenant_sees_only_its_own_usage_and_admins_see_spend_by_team(pair):
    a, b, _, _ = pair
    one = admin("POST", a.url, "/keys", json={"team": "blue", "budget": 1.0}).json()
    two = admin("POST", a.url, "/keys", json={"team": "green"}).json()
    assert within(5, lambda: complete(b.url, two["key"]), 200).status_code == 200
    for _ in range(2):
        assert within(5, lambda: complete(a.url, one["key"]), 200).status_code == 200
    mine = httpx.get(f"{b.url}/v1/usage", headers=bearer(one["key"]), timeout=30).json()
    assert mine["key_id"] == one["id"] and mine["team"] == "blue"
    assert sum(d["requests"] for d in mine["daily"]) == 2
    today = mine["daily"][-1]
    assert today["date"] == datetime.now(UTC).strftime("%Y-%m-%d")
    assert today["input_cache_hit_tokens"] + today["input_cache_miss_tokens"] > 0
    assert today["output_tokens"] == 2 and today["cost"] > 0
    assert mine["remaining_budget"] == pytest.approx(1.0 - mine["spent"])
    assert mine["spent"] == pytest.approx(mine["total_cost"])
    theirs = httpx.get(f"{a.url}/v1/usage", headers=bearer(two["key"]), timeout=30).json()
    assert sum(d["requests"] for d in theirs["daily"]) == 1
    assert httpx.get(f"{a.url}/v1/usage", timeout=30).status_code == 401
    assert httpx.get(f"{a.url}/v1/usage", params={"days": 0}, headers=bearer(two["key"]),
                     timeout=30).status_code == 400
    spend = admin("GET", b.url, "/spend", params={"group_by": "team", "days": 7}).json()
    teams = {s["name"]: s for s in spend["series"]}
    assert teams["blue"]["requests"] == 2 and teams["green"]["requests"] == 1
    report = admin("GET", a.url, "/report", params={"by": "key"}).json()
    assert {g["group"] for g in report["groups"]} >= {one["id"], two["id"]}
    tco = admin("POST", a.url, "/tco", json={
        "capacity": {"output_tokens_per_s": 500}, "cloud": {"hourly_price": 1.5},
        "on_prem": {"servers": 1, "purchase_price": 20000}}).json()
    assert tco["tco"] and tco["report"]["total"]["requests"] >= 3
    stats = admin("GET", a.url, "/stats").json()
    assert stats["front"] == "server" and stats["generated_tokens"] >= 1


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_the_gateway_starts_without_torch_and_serves_the_admin_and_usage_apis(tmp_path):
    import subprocess

    ledger = str(tmp_path / "ledger.db")
    # the replica behind it bills nothing itself and needs no key (the gateway checks)
    backend = ServerProcess("--ledger", ledger, "--no-ledger-usage", "--no-warmup",
                            "--num-threads", "1", "--max-num-seqs", "4", log_dir=tmp_path)
    port = free_port()
    cfg = tmp_path / "gw.toml"
    (tmp_path / "keys.toml").write_text(SEED)
    cfg.write_text(f'[gateway]\nport = {port}\nledger = "{ledger}"\n'
                   f'api_keys = "{tmp_path / "keys.toml"}"\n'
                   f'[tiers.lite]\nmodels = ["lite"]\nbackends = ["{backend.url}"]\n')
    log = open(tmp_path / "gw.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "deepserve.cli", "gateway", "--config",
                             str(cfg), "--admin-key", ADMIN], stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy(url, proc, 60), (tmp_path / "gw.log").read_text()
        maps = _maps(proc.pid)
        assert "libtorch" not in maps and "torch/lib" not in maps
        k = admin("POST", url, "/keys", json={"id": "via-gateway", "models": ["lite"]}).json()
        r = httpx.post(f"{url}/v1/completions", headers=bearer(k["key"]), timeout=60,
                       json={"model": "lite", "prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 200, r.text
        used = httpx.get(f"{url}/v1/usage", headers=bearer(k["key"]), timeout=30).json()
        assert used["key_id"] == "via-gateway"
        assert sum(d["requests"] for d in used["daily"]) == 1
        assert admin("GET", url, "/keys", key=k["key"]).status_code == 403
        assert admin("GET", url, "/keys", key="sk-seeded-secret").status_code == 403
        assert admin("POST", url, "/keys", json={"idd": 1}).status_code == 400
        assert admin("POST", url, "/keys/via-gateway/revoke").status_code == 200
        r = httpx.post(f"{url}/v1/completions", headers=bearer(k["key"]), timeout=60,
                       json={"model": "lite", "prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
        assert admin("GET", url, "/stats").json()["front"] == "gateway"
        page = httpx.get(f"{url}/console", follow_redirects=True, timeout=30)
        assert page.status_code == 200 and "deepserve" in page.text
        assert httpx.get(f"{url}/console/app.js", timeout=30).status_code == 200
        assert "libtorch" not in _maps(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
        backend.stop()
