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


def test_compare_runs_deepserve_and_finds_llama_servers_slots(tmp_path):
    """bench compare end to end on deepserve (llama-server and vLLM CPU are not built in
    CI: their commands are checked, and a missing one is a clear error before any run)."""
    from pathlib import Path

    from deepserve.bench.compare import llama_server_cmd, vllm_cmd

    cmd = llama_server_cmd(Path("/opt/llama-server"), Path("m.gguf"), 2, 64, 9000)
    assert cmd[cmd.index("-np") + 1] == "64" and cmd[cmd.index("-c") + 1] == str(64 * 1024)
    assert cmd[cmd.index("--alias") + 1] == "bench" and cmd[cmd.index("-t") + 1] == "2"
    cmd = vllm_cmd("/venv/bin/python", "hf-folder", 32, 9001)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--max-num-seqs") + 1] == "32"

    missing = _bench("compare", "--systems", "deepserve", "llamacpp", "--llama-server",
                     str(tmp_path / "nope"), "--out", str(tmp_path))
    assert missing.returncode != 0 and "make bench-peers" in missing.stderr
    assert not list(tmp_path.glob("compare-*.json"))  # nothing ran
    no_vllm = _bench("compare", "--systems", "vllm", "--out", str(tmp_path))
    assert no_vllm.returncode != 0 and "--vllm-python" in no_vllm.stderr

    proc = _bench("compare", "--systems", "deepserve", "--concurrency", "1", "2",
                  "--num-requests", "3", "--input-len", "16", "--output-len", "8",
                  "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    (run_file,) = tmp_path.glob("compare-*.json")
    runs = json.loads(run_file.read_text())
    assert [r["meta"]["concurrency"] for r in runs] == [1, 2]
    for run in runs:
        jsonschema.validate(run, RUN_SCHEMA)
        assert run["summary"]["completed"] == run["summary"]["requests"] >= 3
        assert run["meta"]["label"].startswith("deepserve")
