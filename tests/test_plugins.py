"""Plugins in real server and gateway processes: one found by its entry point (an
installed distribution's metadata), others by --plugin; the compliance filter refuses
with 400 and the ledger records why; a rewrite reaches the engine; a broken plugin is
skipped; the gateway runs the same hooks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from server_utils import ServerProcess, free_port, wait_healthy

from deepserve.billing.ledger_db import open_db
from deepserve.errors import DeepserveError
from deepserve.plugins import load_plugins

TESTS = Path(__file__).resolve().parent
CONFIG = """
[compliance]
rules = [{{ name = "nightingale", pattern = "(?i)project nightingale" }}]
patterns = ['\\b\\d{{4}}-\\d{{4}}-\\d{{4}}-\\d{{4}}\\b']

[audit]
path = "{audit}"

[cap]
max_tokens = 3
"""


@pytest.fixture(scope="module")
def plugged(tmp_path_factory, monkeypatch_module):
    d = tmp_path_factory.mktemp("plugins")
    # An installed distribution that declares the audit plugin as an entry point.
    dist = d / "site" / "deepserve_audit_example-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: deepserve-audit-example\n"
                                   "Version: 0.1\n")
    (dist / "entry_points.txt").write_text("[deepserve.plugins]\n"
                                           "audit = plugin_examples:AuditLog\n")
    monkeypatch_module.setenv("PYTHONPATH", f"{d / 'site'}:{TESTS}")
    (d / "plugins.toml").write_text(CONFIG.format(audit=d / "audit.jsonl"))
    srv = ServerProcess("--served-model-name", "lite", "--ledger", str(d / "ledger.db"),
                        "--plugin-config",
                        str(d / "plugins.toml"), "--plugin",
                        "deepserve.compliance:ComplianceFilter", "--plugin",
                        "plugin_examples:CapTokens", "--plugin", "plugin_examples:Broken",
                        log_dir=d)
    yield d, srv
    srv.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_the_compliance_filter_refuses_and_the_ledger_records_why(plugged):
    d, srv = plugged
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="lite", messages=[
            {"role": "user", "content": "Tell me about Project Nightingale."}])
    body = err.value.body
    assert body["code"] == "compliance_rejected" and "'nightingale'" in body["message"]
    card = httpx.post(f"{srv.url}/v1/completions", json={
        "prompt": "My card is 4111-1111-1111-1111", "max_tokens": 2}, timeout=60)
    assert card.status_code == 400 and "patterns[0]" in card.json()["error"]["message"]
    db = open_db(d / "ledger.db")
    rows = db.query("SELECT plugin, reason, path, front FROM refusals ORDER BY id")
    usage = db.query("SELECT COUNT(*) FROM usage")[0][0]
    db.close()
    assert [(r[0], r[2], r[3]) for r in rows] == [
        ("compliance", "/v1/chat/completions", "server"),
        ("compliance", "/v1/completions", "server")]
    assert "nightingale" in rows[0][1] and usage == 0  # refused: nothing billed


def test_rewrites_audits_and_usage_hooks_run_and_a_broken_plugin_is_skipped(plugged):
    d, srv = plugged
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="lite", max_tokens=50, extra_body={
        "ignore_eos": True}, messages=[{"role": "user", "content": "Count to ten."}])
    assert r.usage.completion_tokens == 3  # the cap plugin rewrote max_tokens
    stream = client.completions.create(model="lite", prompt="Once", max_tokens=40, stream=True,
                                       extra_body={"ignore_eos": True})
    assert sum(1 for c in stream if c.choices and c.choices[0].text) <= 3
    lines = [json.loads(x) for x in (d / "audit.jsonl").read_text().splitlines()]
    assert {"event": "response", "front": "server", "path": "/v1/chat/completions",
            "key_id": None, "status": 200, "id": r.id} in lines
    assert any(x["event"] == "usage" and x["request_id"] == r.id and
               x["completion_tokens"] == 3 for x in lines)
    assert "plugin broken failed in before_request; skipped" in srv.log()
    assert "plugins: audit, compliance, cap, broken" in srv.log()


def test_the_gateway_runs_the_same_hooks(plugged, tmp_path):
    d, srv = plugged
    port = free_port()
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[gateway]\nport = {port}\nledger = "{tmp_path / "gw.db"}"\n'
                   f'plugins = ["deepserve.compliance:ComplianceFilter"]\n'
                   f'plugin_config = "{d / "plugins.toml"}"\n'
                   f'[tiers.lite]\nmodels = ["lite"]\nbackends = ["{srv.url}"]\n')
    gw = subprocess.Popen([sys.executable, "-m", "deepserve.cli", "gateway", "--config",
                           str(cfg)], stdout=open(tmp_path / "gw.log", "w"),
                          stderr=subprocess.STDOUT)
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}", gw, 60), (tmp_path / "gw.log").read_text()
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": "lite", "messages": [{"role": "user", "content": "project NIGHTINGALE"}]})
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "compliance_rejected"
        ok = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": "lite", "prompt": "Hello", "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        gw.terminate()
        gw.wait(30)
    db = open_db(tmp_path / "gw.db")
    assert db.query("SELECT plugin, front FROM refusals") == [("compliance", "gateway")]
    db.close()
    lines = [json.loads(x) for x in (d / "audit.jsonl").read_text().splitlines()]
    assert not any("NIGHTINGALE" in json.dumps(x) for x in lines)  # never reached the server


def test_bad_plugin_specs_and_rules_are_clear_errors(tmp_path):
    with pytest.raises(DeepserveError, match="is not module:attr"):
        load_plugins(["nocolon"], None, "server")
    with pytest.raises(DeepserveError, match="cannot be loaded"):
        load_plugins(["deepserve.nope:X"], None, "server")
    bad = tmp_path / "p.toml"
    bad.write_text('[compliance]\npatterns = ["(unclosed"]\n')
    with pytest.raises(DeepserveError, match="not a valid regular expression"):
        load_plugins(["deepserve.compliance:ComplianceFilter"], str(bad), "server")
    with pytest.raises(DeepserveError, match="has no rules"):
        load_plugins(["deepserve.compliance:ComplianceFilter"], None, "server")
