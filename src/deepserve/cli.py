"""Command line: deepserve serve | generate | chat | bench."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from deepserve.errors import DeepserveError
from deepserve.flags import add_dataclass_args, add_engine_args, engine_config, from_args


def _sampling(args: argparse.Namespace) -> Any:
    from deepserve.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.sampling_seed)


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")


def cmd_generate(args: argparse.Namespace) -> int:
    from deepserve.entrypoints import LLM

    llm = LLM(config=engine_config(args), show_progress=sys.stderr.isatty())
    params = _sampling(args)
    if args.chat_template:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate(args.prompt, params)[0]
    if args.json:
        print(json.dumps({"model": llm.engine.model_name, "prompt": args.prompt,
                          "text": out.text, "token_ids": out.token_ids,
                          "finish_reason": out.finish_reason,
                          "prompt_tokens": len(out.prompt_token_ids),
                          "completion_tokens": len(out.token_ids),
                          "num_cached_tokens": out.num_cached_tokens}, ensure_ascii=False))
    else:
        print(out.text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import asyncio

    from deepserve.engine.async_engine import AsyncEngine

    engine = AsyncEngine(engine_config(args), show_progress=sys.stderr.isatty())
    params = _sampling(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print(f"deepserve chat with {engine.model_name}; an empty line or Ctrl-D quits.",
          file=sys.stderr)

    async def reply(messages: list[dict[str, str]]) -> str:
        shown = 0
        text = ""
        async for out in engine.generate(messages=messages, params=params):
            text = out.text
            print(text[shown:], end="", flush=True)
            shown = len(text)
        print()
        return text

    try:
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            history.append({"role": "user", "content": line})
            try:
                answer = asyncio.run(reply(history))
            except DeepserveError as exc:
                print(f"error: {exc}", file=sys.stderr)
                history.pop()
                continue
            history.append({"role": "assistant", "content": answer})
    finally:
        engine.shutdown()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from deepserve.server.config import ServerConfig
    from deepserve.server.run import run_server

    return run_server(engine_config(args), from_args(ServerConfig, args))


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerConfig field, as for the engine."""
    from deepserve.config import parse_bytes
    from deepserve.server.config import (
        POOLINGS,
        PREFIX_CACHE_SCOPES,
        REASONING_PARSERS,
        SERVER_HELP,
        TASKS,
        ServerConfig,
    )

    group = parser.add_argument_group("server")
    group.add_argument("--plugin", dest="plugins", action="append", default=[],
                       metavar="MODULE:ATTR",
                       help="load a plugin (repeatable), e.g. "
                            "deepserve.compliance:ComplianceFilter")
    add_dataclass_args(
        group, ServerConfig, SERVER_HELP, skip=("plugins",),
        choices={"prefix_cache_scope": list(PREFIX_CACHE_SCOPES),
                 "reasoning_parser": list(REASONING_PARSERS), "task": list(TASKS),
                 "embedding_pooling": list(POOLINGS)},
        types={"max_request_bytes": lambda v: parse_bytes(v, "max_request_bytes")})


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deepserve.billing import report
    from deepserve.billing.ledger_db import is_postgres

    if not is_postgres(args.ledger) and not Path(args.ledger).is_file():
        raise DeepserveError(f"ledger {args.ledger!r} does not exist; start the server with "
                             "--ledger PATH to record usage", param="ledger")
    try:
        rep = report.build_report(args.ledger, args.since, args.until, args.by,
                                  args.gpu_hour_cost, args.node_hours, args.gpus_per_node)
    except ValueError as exc:
        raise DeepserveError(str(exc), param="by") from exc
    render = {"md": report.to_markdown, "json": report.to_json, "csv": report.to_csv}
    if args.tco:
        from deepserve.billing import tco

        inputs = tco.TCOInputs.load(args.tco)
        costs = tco.build_tco(rep, inputs)
        if args.format == "json":
            rep["tco"] = costs
        else:
            print(tco.to_markdown(costs) + "\n")
        if args.tco_plot:
            tco.plot(costs, inputs, args.tco_plot)
            print(f"wrote {args.tco_plot}", file=sys.stderr)
    print(render[args.format](rep))
    if args.plot:
        report.plot_hourly(args.ledger, args.plot, args.gpu_hour_cost, args.since, args.until)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from deepserve.gateway.app import run_gateway
    from deepserve.gateway.config import GatewayConfig

    cfg = GatewayConfig.load(args.config)
    # Flags override the file (Kubernetes passes Secrets this way).
    overrides = {k: getattr(args, k) for k in ("host", "port", "ledger", "redis", "api_keys",
                                               "admin_key", "plugins", "plugin_config")
                 if getattr(args, k)}
    if overrides:
        cfg = GatewayConfig.from_dict(_with_gateway(args.config, overrides), args.config)
    return run_gateway(cfg)


def _with_gateway(path: str, overrides: dict[str, object]) -> dict[str, object]:
    from deepserve.config import read_toml

    data = read_toml(path, "gateway config", "config")
    data["gateway"] = {**data.get("gateway", {}), **overrides}
    return data


def cmd_ray_serve(args: argparse.Namespace) -> int:
    try:
        from deepserve.deploy import ray_serve
    except ImportError as exc:
        raise DeepserveError("Ray Serve is not installed: pip install 'deepserve[ray]' "
                             f"(or make ray) ({exc})") from exc
    ray_serve.run(ray_serve.RayServeConfig.load(args.config))
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    from deepserve import kernels

    if kernels.available():
        tiles = ", AMX tiles for batches" if kernels.amx() else ""
        print(f"deepserve CPU kernels: ready, {kernels.isa()}{tiles} "
              f"(this CPU runs: {', '.join(kernels.supported_isas())}; {kernels.build_dir()})")
        return 0
    print(f"deepserve CPU kernels: unavailable ({kernels.unavailable_reason()}); "
          "deepserve runs on torch ops alone")
    return 1


# The subcommands whose flags come from the engine's and server's settings: building
# them imports the engine (and torch), so a parser builds them only when they run or
# when the whole help is asked for.
HEAVY = ("serve", "generate", "chat", "bench")


def command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (None for none, or for the top-level help)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--log-level")
    pre.add_argument("--log-format")
    pre.add_argument("command", nargs="?")
    known, _ = pre.parse_known_args(argv)
    return known.command


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; with ``command``, the other heavy subcommands get only their
    one-line help (``deepserve gateway`` never imports torch)."""
    parser = argparse.ArgumentParser(prog="deepserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one object per line, with a line per finished request")
    sub = parser.add_subparsers(dest="command", required=True)

    def full(name: str) -> bool:
        return command is None or command == name  # None: every flag (docs, tests)

    serve = sub.add_parser("serve", help="serve a model over the OpenAI API")
    if full("serve"):
        add_server_args(serve)
        add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="complete one prompt and print the text")
    gen.add_argument("prompt")
    gen.add_argument("--json", action="store_true", help="print a JSON object")
    gen.add_argument("--chat-template", action="store_true",
                     help="wrap the prompt as a user message in the model's chat template")
    _add_sampling_args(gen, 64)
    if full("generate"):
        add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat, streaming tokens")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(chat, 256)
    if full("chat"):
        add_engine_args(chat)
    chat.set_defaults(func=cmd_chat)

    gw = sub.add_parser("gateway", help="route between model tiers (OpenAI-compatible proxy)")
    gw.add_argument("--config", required=True, help="gateway TOML (see deepserve.gateway)")
    gw.add_argument("--host", default=None)
    gw.add_argument("--port", type=int, default=None)
    gw.add_argument("--ledger", default=None,
                    help="usage ledger: a SQLite path or a postgresql:// URL (overrides "
                         "the config's [gateway] ledger)")
    gw.add_argument("--redis", default=None,
                    help="redis:// URL: rate limits, quotas and budgets shared by every "
                         "gateway and server using it")
    gw.add_argument("--api-keys", default=None, help="TOML key file (overrides the config)")
    gw.add_argument("--admin-key", default=None,
                    help="the admin API's bearer key (overrides the config; default: "
                         "$DEEPSERVE_ADMIN_KEY)")
    gw.add_argument("--plugin", dest="plugins", action="append", default=[],
                    metavar="MODULE:ATTR", help="load a plugin (repeatable)")
    gw.add_argument("--plugin-config", default=None,
                    help="TOML with one [NAME] table of settings per plugin")
    gw.set_defaults(func=cmd_gateway)

    rs = sub.add_parser("ray-serve", help="serve tiers on a Ray cluster with Ray Serve")
    rs.add_argument("--config", required=True, help="ray TOML (see deepserve.deploy.ray_serve)")
    rs.set_defaults(func=cmd_ray_serve)

    rep = sub.add_parser("report", help="revenue, cost and margin from a usage ledger")
    rep.add_argument("--ledger", required=True,
                     help="the ledger written by serve/gateway --ledger: a SQLite path or a "
                          "postgresql:// URL")
    rep.add_argument("--since", default=None, help="ISO time (UTC) or epoch seconds")
    rep.add_argument("--until", default=None, help="ISO time (UTC) or epoch seconds")
    rep.add_argument("--by", default=None, choices=["model", "key", "tier", "hour"])
    rep.add_argument("--gpu-hour-cost", type=float, default=2.0,
                     help="price of one accelerator-hour (default 2.0, as DeepSeek's H800)")
    rep.add_argument("--node-hours", type=float, default=None,
                     help="cost from this many node-hours instead of replica uptime")
    rep.add_argument("--gpus-per-node", type=int, default=8)
    rep.add_argument("--format", default="md", choices=["md", "json", "csv"])
    rep.add_argument("--plot", default=None, help="write a per-hour PNG here")
    rep.add_argument("--tco", default=None,
                     help="TOML of cloud and on-premises costs: adds the total cost of "
                          "ownership for this traffic (format: deepserve/billing/tco.py)")
    rep.add_argument("--tco-plot", default=None, help="with --tco: cost against daily "
                                                      "volume, as a PNG")
    rep.set_defaults(func=cmd_report)

    kern = sub.add_parser("kernels", help="build deepserve's C++ CPU kernels now and report")
    kern.set_defaults(func=cmd_kernels)

    if full("bench"):
        from deepserve.bench.cli import add_bench_parser

        add_bench_parser(sub)
    else:
        sub.add_parser("bench", help="benchmarks: offline, serve, sweep, compare, report")
    return parser


_LIGHT = ("gateway", "ray-serve", "report", "kernels")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = command_of(argv)
    parser = build_parser(command if command in HEAVY or command in _LIGHT else "")
    args = parser.parse_args(argv)
    from deepserve.logs import configure

    configure(args.log_level, args.log_format)
    try:
        return args.func(args)
    except DeepserveError as exc:
        print(f"deepserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
