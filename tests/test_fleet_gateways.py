"""A fleet on loopback: two real `deepserve serve` replicas on 127.0.0.2 and 127.0.0.3
(same port, as two pods behind a headless Service), gateways sharing one real
PostgreSQL ledger and one real Redis, and a gateway that finds the replicas through a
DNS name (a hosts file of the test's, bind-mounted in a private mount namespace)."""

from __future__ import annotations

import concurrent.futures
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import openai
import pytest
from server_utils import ServerProcess, free_port, wait_healthy

from deepserve.billing.ledger_db import open_db
from deepserve.billing.report import build_report

KEYS = """
[[keys]]
id = "limited"
key = "sk-limited"

[[keys]]
id = "quota"
key = "sk-quota"
token_quota = 100

[[keys]]
id = "load"
key = "sk-load"
"""


class Gateway:
    def __init__(self, tmp_path, backends: list[str], extra: str = "",
                 wrap: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp_path / f"gw-{self.port}.toml"
        cfg.write_text(f'[gateway]\nport = {self.port}\nhealth_interval_s = 0.5\n{extra}\n'
                       f'[tiers.lite]\nmodels = ["lite"]\nbackends = {backends!r}\n'
                       .replace("'", '"'))
        self.log_path = tmp_path / f"gw-{self.port}.log"
        cmd = [sys.executable, "-m", "deepserve.cli", "gateway", "--config", str(cfg)]
        self.proc = subprocess.Popen([*(wrap or []), *cmd], stdout=open(self.log_path, "w"),
                                     stderr=subprocess.STDOUT)
        if not wait_healthy(self.url, self.proc, 60):
            self.stop()
            raise RuntimeError(f"gateway not healthy:\n{self.log_path.read_text()}")

    def post(self, key: str, i: int = 0, **body) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/completions", headers={
            "Authorization": f"Bearer {key}"}, timeout=120, json={
            "model": "lite", "prompt": f"Request {i}: hello", "max_tokens": 1, **body})

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, postgres, redis_server):
    d = tmp_path_factory.mktemp("fleet")
    ledger = postgres.fresh_database(f"fleet_{uuid.uuid4().hex[:8]}")
    port = free_port()
    # One thread each: two replicas share this machine's cores.
    replicas = [ServerProcess("--served-model-name", "lite", "--max-num-seqs", "16",
                              "--num-threads", "1",
                              "--ledger", ledger, "--no-ledger-usage", "--hourly-cost", "0.2",
                              log_dir=d, host=host, port=port)
                for host in ("127.0.0.2", "127.0.0.3")]
    (d / "keys.toml").write_text(KEYS)
    yield {"dir": d, "ledger": ledger, "redis": redis_server.url, "port": port,
           "replicas": replicas, "backends": [r.url for r in replicas],
           "shared": f'ledger = "{ledger}"\nredis = "{redis_server.url}"\n'
                     f'api_keys = "{d / "keys.toml"}"\n'}
    for r in replicas:
        r.stop()


def test_a_keys_rate_limit_holds_once_across_two_gateways(fleet, redis_server):
    redis_server.flush()
    gws = [Gateway(fleet["dir"], fleet["backends"], fleet["shared"] + "rate_limit_rpm = 8\n")
           for _ in range(2)]
    try:
        codes = [gws[i % 2].post("sk-limited", i).status_code for i in range(24)]
        assert codes.count(200) == 8 and codes.count(429) == 16, codes
        assert codes[:8] == [200] * 8  # the first 8, whichever gateway took them
    finally:
        for g in gws:
            g.stop()


def test_a_token_quota_is_spent_once_across_two_gateways(fleet, redis_server):
    redis_server.flush()
    gws = [Gateway(fleet["dir"], fleet["backends"], fleet["shared"]) for _ in range(2)]
    try:
        codes = []
        for i in range(40):
            r = gws[i % 2].post("sk-quota", i, max_tokens=8, ignore_eos=True)
            codes.append(r.status_code)
            if codes[-4:] == [429] * 4:
                break
        first_refusal = codes.index(429)
        assert set(codes[first_refusal:]) == {429}, codes  # both gateways refuse from then
        db = open_db(fleet["ledger"])
        (rows, tokens), = db.query("SELECT COUNT(*), SUM(prompt_tokens + completion_tokens) "
                                   "FROM usage WHERE key_id = 'quota'")
        db.close()
        assert rows == first_refusal and tokens <= 100
        # One quota: about 100 tokens in ~13-token requests, not two gateways' worth.
        assert tokens > 100 - 2 * 13
    finally:
        for g in gws:
            g.stop()


def test_sigkill_of_a_gateway_loses_and_doubles_no_bill(fleet, redis_server):
    redis_server.flush()
    gws = [Gateway(fleet["dir"], fleet["backends"], fleet["shared"]) for _ in range(2)]
    received: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def traffic(gw: Gateway, worker: int) -> None:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-load", max_retries=0,
                               timeout=60)
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if i % 2:
                    r = client.chat.completions.create(
                        model="lite", max_tokens=12, messages=[
                            {"role": "user", "content": f"Worker {worker} says {i}."}])
                    rid = r.id
                else:
                    chunks = list(client.completions.create(
                        model="lite", prompt=f"Story {worker}-{i}:", max_tokens=12,
                        stream=True))
                    if not any(c.choices and c.choices[0].finish_reason for c in chunks):
                        continue  # cut short: not an answer the client received
                    rid = chunks[0].id
            except (openai.APIConnectionError, openai.APIStatusError, httpx.HTTPError):
                if gw.proc.poll() is not None:
                    return  # that gateway is gone
                continue
            with lock:
                received.append(rid)

    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(traffic, gws[w % 2], w) for w in range(6)]
            time.sleep(4)
            gws[0].stop(signal.SIGKILL)
            time.sleep(3)
            stop.set()
            for f in futures:
                f.result()
        assert len(received) >= 10
        db = open_db(fleet["ledger"])
        counts = dict(db.query("SELECT request_id, COUNT(*) FROM usage WHERE key_id = 'load' "
                               "GROUP BY request_id"))
        db.close()
        missing = [r for r in received if r not in counts]
        assert not missing, f"{len(missing)} answered requests are not on the books"
        assert all(counts[r] == 1 for r in received)
        assert len(set(received)) == len(received)
    finally:
        stop.set()
        for g in gws:
            g.stop()
    # The fleet's cost: both replicas' uptime at their --hourly-cost, the gateways' at 0.
    rep = build_report(fleet["ledger"], gpu_hour_cost=2.0)
    assert rep["replicas"] >= 4 and rep["total"]["requests"] >= len(received)
    db = open_db(fleet["ledger"])
    hourly = sorted(r[0] for r in db.query("SELECT hourly_cost FROM replicas "
                                           "WHERE hardware <> 'gateway'"))
    db.close()
    assert hourly == [0.2, 0.2]
    assert rep["total"]["cost"] > 0


def _can_private_mount() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30)
    return None if probe.returncode == 0 else \
        f"no private mount namespace here ({probe.stderr.decode().strip()})"


def test_a_dns_name_reaches_every_replica_and_follows_changes(fleet, tmp_path):
    why = _can_private_mount()
    if why:
        pytest.skip(why)
    name = "replicas.deepserve.test"
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.2 {name}\n127.0.0.3 {name}\n")
    wrap = ["unshare", "-m", "sh", "-c", f'mount --bind {hosts} /etc/hosts && exec "$@"',
            "sh"]
    gw = Gateway(tmp_path, [f"http://{name}:{fleet['port']}"],
                 'balancing = "round_robin"\nresolve_interval_s = 0.5\n', wrap=wrap)
    both = set(fleet["backends"])
    try:
        seen = {gw.post("x", i).headers["x-deepserve-backend"] for i in range(8)}
        assert seen == both
        # The Service scales down to one pod: the gateway follows the name.
        with open(hosts, "r+") as f:  # rewrite in place: the bind mount keeps the inode
            f.write(f"127.0.0.1 localhost\n127.0.0.3 {name}\n")
            f.truncate()
        deadline = time.time() + 20
        while time.time() < deadline:
            seen = {gw.post("x", i).headers["x-deepserve-backend"] for i in range(4)}
            if seen == {fleet["backends"][1]}:
                break
            time.sleep(0.5)
        assert seen == {fleet["backends"][1]}
        with open(hosts, "r+") as f:
            f.write(f"127.0.0.1 localhost\n127.0.0.2 {name}\n127.0.0.3 {name}\n")
        deadline = time.time() + 20
        while time.time() < deadline:
            seen = {gw.post("x", i).headers["x-deepserve-backend"] for i in range(6)}
            if seen == both:
                break
            time.sleep(0.5)
        assert seen == both
    finally:
        gw.stop()


def test_two_servers_share_one_rate_limit_through_redis(redis_server, tmp_path):
    """Servers take --rate-limit-rpm/--redis too: a key's requests per minute hold once
    across replicas, counted with Retry-After; token use is counted for TPM."""
    redis_server.flush()
    (tmp_path / "keys.toml").write_text('[[keys]]\nid = "team"\nkey = "sk-team"\n')
    servers = [ServerProcess("--num-threads", "1", "--api-keys", str(tmp_path / "keys.toml"),
                             "--redis", redis_server.url, "--rate-limit-rpm", "5",
                             "--rate-limit-tpm", "100000", log_dir=tmp_path)
               for _ in range(2)]
    try:
        codes = []
        for i in range(12):
            r = httpx.post(f"{servers[i % 2].url}/v1/completions", timeout=60,
                           headers={"Authorization": "Bearer sk-team"},
                           json={"prompt": f"Hi {i}", "max_tokens": 2})
            codes.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert codes[:5] == [200] * 5 and codes[5:] == [429] * 7, codes
        import redis

        tpm = redis.Redis.from_url(redis_server.url, decode_responses=True).keys(
            "deepserve:tpm:*")
        assert len(tpm) == 1  # the billed tokens of the five answers, under a hashed name
    finally:
        for s in servers:
            s.stop()
