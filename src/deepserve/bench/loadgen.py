"""An OpenAI-protocol load generator: streaming requests at a fixed concurrency or a
Poisson request rate, against any server (deepserve, llama.cpp's server, vLLM).

The client shares the CPU with the server it measures (on a 2-core machine, with the
server's compute threads), so it is kept light: aiohttp (as vLLM's benchmark client),
whose C parser took 3x less CPU per streamed token than httpx (h11, pure Python): at 64
streams 175 -> 55 us a token, time the server would otherwise have lost.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from deepserve.bench.stats import summarize
from deepserve.bench.workloads import BenchRequest


@dataclass
class RequestResult:
    """What one request did, measured on the client side."""

    ok: bool
    start: float
    e2e_s: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    text: str = ""
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        n = self.completion_tokens
        if self.ttft_s is None or not n or n < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (n - 1)


@dataclass
class LoadConfig:
    """How to drive the server."""

    base_url: str
    model: str | None = None
    api_key: str | None = None
    concurrency: int | None = 8
    request_rate: float | None = None  # requests/s, Poisson arrivals; None: closed loop
    # Arrival burstiness at that rate: 1 is Poisson; below 1, gamma-distributed gaps
    # cluster requests into bursts (as vLLM's benchmark does); above 1, steadier.
    burstiness: float = 1.0
    max_concurrency: int | None = None  # cap on in-flight requests in rate mode
    duration_s: float | None = None  # stop launching after this long
    warmup: int = 1
    temperature: float = 0.0
    ignore_eos: bool = False
    timeout_s: float = 600.0
    seed: int = 0


async def _one(client: aiohttp.ClientSession, cfg: LoadConfig, req: BenchRequest,
               model: str) -> RequestResult:
    chat = req.messages is not None
    body: dict[str, Any] = {"model": model, "max_tokens": req.max_tokens, "stream": True,
                            "stream_options": {"include_usage": True},
                            "temperature": cfg.temperature}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if chat:
        body["messages"] = req.messages
    else:
        body["prompt"] = req.prompt
    url = cfg.base_url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    start = time.perf_counter()
    result = RequestResult(ok=False, start=start, e2e_s=0.0)
    last = start
    chunks = 0
    parts: list[str] = []
    try:
        async with client.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                text = (await resp.read()).decode(errors="replace")
                result.error = f"HTTP {resp.status}: {text[:200]}"
                result.e2e_s = time.perf_counter() - start
                return result
            async for raw in resp.content:
                if not raw.startswith(b"data:"):
                    continue
                data = raw[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    u = event["usage"]
                    result.prompt_tokens = u.get("prompt_tokens")
                    result.completion_tokens = u.get("completion_tokens")
                    details = u.get("prompt_tokens_details") or {}
                    result.cached_tokens = details.get("cached_tokens")
                for choice in event.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content") if chat else \
                        choice.get("text")
                    if delta:
                        now = time.perf_counter()
                        if result.ttft_s is None:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        chunks += 1
                        parts.append(delta)
        result.e2e_s = time.perf_counter() - start
        result.text = "".join(parts)
        if result.completion_tokens is None:
            result.completion_tokens = chunks  # server sent no usage: count chunks
        result.ok = True
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        result.e2e_s = time.perf_counter() - start
    return result


async def discover_model(client: aiohttp.ClientSession, cfg: LoadConfig) -> str:
    if cfg.model:
        return cfg.model
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    async with client.get(cfg.base_url.rstrip("/") + "/v1/models", headers=headers) as resp:
        resp.raise_for_status()
        return (await resp.json())["data"][0]["id"]


async def run_load(cfg: LoadConfig, requests: list[BenchRequest]
                   ) -> tuple[list[RequestResult], float, str]:
    """Send every request; returns (results, wall seconds of the measured part, model)."""
    # As many connections as requests in flight, each request on a new one: a pooled
    # connection the server closed while idle (llama-server drops keep-alive connections
    # after 5 s, and requests queued behind a full batch wait longer) failed requests
    # with "Can not write request body" (5-7 of 64 at 32 streams).
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    # read_bufsize: a first chunk (echo, logprobs) may be one long line
    async with aiohttp.ClientSession(connector=connector, read_bufsize=2**20,
                                     timeout=aiohttp.ClientTimeout(total=cfg.timeout_s)
                                     ) as client:
        model = await discover_model(client, cfg)
        for req in requests[:cfg.warmup]:
            await _one(client, cfg, req, model)
        rng = random.Random(cfg.seed)
        results: list[RequestResult] = []
        start = time.perf_counter()
        cap = cfg.concurrency if cfg.request_rate is None else cfg.max_concurrency
        sem = asyncio.Semaphore(cap) if cap else None

        async def run(req: BenchRequest) -> None:
            if sem is None:
                results.append(await _one(client, cfg, req, model))
                return
            async with sem:
                results.append(await _one(client, cfg, req, model))

        tasks = []
        for req in requests[cfg.warmup:]:
            if cfg.duration_s is not None and time.perf_counter() - start > cfg.duration_s:
                break
            if cfg.request_rate is not None:
                tasks.append(asyncio.create_task(run(req)))
                shape = cfg.burstiness
                await asyncio.sleep(rng.gammavariate(shape, 1.0 / (cfg.request_rate * shape)))
            else:
                tasks.append(asyncio.create_task(run(req)))
        await asyncio.gather(*tasks)
        return results, time.perf_counter() - start, model


def summarize_run(results: list[RequestResult], wall_s: float,
                  slo_ttft_ms: float | None = None,
                  slo_tpot_ms: float | None = None) -> dict[str, Any]:
    """The figures users compare: latency percentiles, throughput, errors, goodput."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.completion_tokens or 0 for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)

    def ms(values: list[float]) -> dict[str, float]:
        return {k: v * 1000 for k, v in summarize(values).items()}

    good = [r for r in ok
            if (slo_ttft_ms is None or (r.ttft_s is not None and r.ttft_s * 1000 <= slo_ttft_ms))
            and (slo_tpot_ms is None or r.tpot_s is None or r.tpot_s * 1000 <= slo_tpot_ms)]
    return {
        "requests": len(results), "completed": len(ok), "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if r.error})[:5],
        "duration_s": wall_s,
        "request_throughput": len(ok) / wall_s if wall_s else 0.0,
        "output_throughput": out_tokens / wall_s if wall_s else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / wall_s if wall_s else 0.0,
        "prompt_tokens": in_tokens, "completion_tokens": out_tokens,
        "cached_prompt_tokens": sum(r.cached_tokens or 0 for r in ok),
        "ttft_ms": ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": ms([x for r in ok for x in r.itl_s]),
        "e2e_ms": ms([r.e2e_s for r in ok]),
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "goodput_requests_per_s": len(good) / wall_s if wall_s else 0.0,
        "slo_attainment": len(good) / len(results) if results else 0.0,
    }


def check_token_counts(results: list[RequestResult], tokenizer: Any) -> dict[str, Any]:
    """Compare the server's completion_tokens with the tokenizer's count of the text.

    Re-encoding decoded text can merge or split a token at a boundary, so small
    differences are expected; large ones mean the server's usage is wrong.
    """
    diffs = []
    for r in results:
        if r.ok and r.completion_tokens is not None:
            diffs.append(abs(len(tokenizer.encode(r.text, add_special_tokens=False))
                             - r.completion_tokens))
    return {"checked": len(diffs),
            "mean_abs_diff": sum(diffs) / len(diffs) if diffs else 0.0,
            "max_abs_diff": max(diffs, default=0)}


def results_to_json(results: list[RequestResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        d = asdict(r)
        d["tpot_s"] = r.tpot_s
        d.pop("text")
        rows.append(d)
    return rows
