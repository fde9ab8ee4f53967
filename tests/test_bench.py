"""The benchmark tools against a real deepserve server and the real engine (small counts)."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
from server_utils import ServerProcess

from deepserve.bench.report import RUN_SCHEMA


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    srv.stop()


def _bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepserve.cli", "bench", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("mode", [["--concurrency", "4"], ["--request-rate", "20"]])
def test_load_generator_metrics_are_sane(server, tmp_path, mode):
    proc = _bench("serve", "--base-url", server.url, "--num-requests", "8", "--input-len", "32",
                  "--output-len", "12", "--ignore-eos", "--slo-ttft-ms", "100000",
                  "--out", str(tmp_path), *mode)
    assert proc.returncode == 0, proc.stderr
    (run_file,) = tmp_path.glob("serve-*.json")
    run = json.loads(run_file.read_text())
    jsonschema.validate(run, RUN_SCHEMA)
    s = run["summary"]
    assert s["requests"] == 8 and s["completed"] == 8 and s["errors"] == 0
    for r in run["requests"]:
        assert 0 < r["ttft_s"] < r["e2e_s"]
        assert r["completion_tokens"] == 12  # the server's usage, ignore_eos honoured
        assert r["prompt_tokens"] > 0
        assert len(r["itl_s"]) <= 11
    assert s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]
    assert s["ttft_ms"]["p50"] <= s["ttft_ms"]["p99"]
    assert s["output_throughput"] > 0 and s["goodput_requests_per_s"] > 0
    assert s["token_count_check"]["checked"] == 8
    assert s["token_count_check"]["mean_abs_diff"] <= 2
    png = next(tmp_path.glob("serve-*_latency.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| conc" in proc.stdout or "| rate" in proc.stdout


def test_shared_prefix_workload_hits_the_prefix_cache(server, tmp_path):
    proc = _bench("serve", "--base-url", server.url, "--workload", "shared-prefix",
                  "--num-requests", "6", "--prefix-len", "200", "--input-len", "16",
                  "--output-len", "4", "--concurrency", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    run = json.loads(next(tmp_path.glob("serve-*.json")).read_text())
    cached = [r["cached_tokens"] for r in run["requests"]]
    assert all(c >= 160 for c in cached), cached


def test_sweep_and_compare_report(server, tmp_path):
    proc = _bench("sweep", "--base-url", server.url, "--rates", "5", "50", "--workload", "chat",
                  "--num-requests", "4", "--output-len", "8", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    sweep = json.loads(next(tmp_path.glob("sweep-*.json")).read_text())
    assert [r["meta"]["request_rate"] for r in sweep] == [5, 50]
    for run in sweep:
        jsonschema.validate(run, RUN_SCHEMA)
    assert next(tmp_path.glob("sweep-*.png")).stat().st_size > 1000
    rep = _bench("report", "--compare", str(next(tmp_path.glob("sweep-*.json"))))
    assert rep.returncode == 0 and rep.stdout.count("rate ") == 2


def test_offline_bench_reports_throughput_and_overhead(tmp_path):
    proc = _bench("offline", "--num-requests", "4", "--input-len", "16", "--output-len", "8",
                  "--kv-cache-memory", "64MiB", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next(tmp_path.glob("offline-*.json")).read_text())
    assert result["output_tokens"] == 32 and result["output_throughput"] > 0
    assert 0 <= result["overhead_share"] < 1
    assert abs(sum(result["step_time_shares"].values()) - 1) < 1e-6
    assert result["peak_rss_mib"] > 0
